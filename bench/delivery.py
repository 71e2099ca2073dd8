"""Delivery benchmark: how fast the engine decides, and how fast the server answers over HTTP.

    .venv/bin/python bench/delivery.py                 # engine only: snapshot build, decisions/s
    .venv/bin/python bench/delivery.py --http          # also a real server (uvicorn, SQLite) under load

Uses the shared deterministic workload (../shared/workload/gen_bundle.py: 2,000 blocks, 200
segments, 30 flags, 10,000 viewers). Prints its numbers; asserts nothing."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
GENERATOR = ROOT.parent / "shared" / "workload" / "gen_bundle.py"
sys.path.insert(0, str(ROOT))

from content.bundle import CONFIG_KINDS, ConfigDocs, Entity, check_config  # noqa: E402
from content.decide import Evaluation  # noqa: E402
from content.snapshot import BlockSource, Snapshot  # noqa: E402
from content.viewer import make_viewer  # noqa: E402

NOW = datetime(2026, 11, 20, 12, tzinfo=UTC)
QUERY = (
    "query($p: String!, $v: ViewerInput) { placement(key: $p, viewer: $v) "
    "{ key blocks { key variant fields decision { reason trace } } } }"
)


def generate(out: Path, profiles: int) -> None:
    if not GENERATOR.exists():
        sys.exit(f"the shared workload generator is missing: {GENERATOR}")
    subprocess.run(
        [sys.executable, str(GENERATOR), "--out", str(out), "--profiles", str(profiles), "--events", "1000"],
        check=True,
        stdout=subprocess.DEVNULL,
    )


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


def bench_engine(out: Path) -> None:
    bundle = json.loads((out / "bundle.json").read_text())
    started = time.perf_counter()
    config = ConfigDocs(locales=Entity("locales", bundle["locales"]))
    for kind in CONFIG_KINDS:
        config.of(kind).extend(Entity(f"{kind}[{i}]", d) for i, d in enumerate(bundle.get(kind, [])))
    problems = check_config(config)
    validated = time.perf_counter()
    snapshot = Snapshot.build(
        version=1,
        locales=bundle["locales"],
        placements=bundle["placements"],
        segments=bundle["segments"],
        scores=bundle["scores"],
        flags=bundle["flags"],
        experiments=[],
        blocks=[BlockSource(b["key"], b["locale"], b, b, 1, NOW) for b in bundle["blocks"]],
    )
    built = time.perf_counter()
    print(f"validate whole bundle: {(validated - started) * 1000:.0f} ms ({len(problems)} problems)")
    print(f"build snapshot (2,000 blocks, 200 segments): {(built - validated) * 1000:.0f} ms")

    profiles = {}
    with (out / "profiles.ndjson").open() as handle:
        for line in handle:
            record = json.loads(line)
            profiles[record["userId"]] = record
    viewers = [json.loads(line) for line in (out / "viewers.ndjson").open()]
    latencies = []
    started = time.perf_counter()
    for item in viewers:
        v = item["viewer"]
        t0 = time.perf_counter()
        viewer = make_viewer(at=NOW, user_id=v.get("userId"), anonymous_id=v.get("anonymousId"),
                             device=v["device"], country=v["country"], timezone=v["timezone"])
        profile = profiles.get(v.get("userId") or "")
        evaluation = Evaluation(
            snapshot,
            viewer,
            traits=profile["traits"] if profile else None,
            consent=profile["consent"]["personalization"] if profile else True,
        )
        evaluation.placement(item["placement"])
        latencies.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - started
    print(
        f"engine placement decisions: {len(viewers) / elapsed:,.0f}/s on one core; "
        f"p50 {percentile(latencies, 0.5) * 1e6:.0f} us, p99 {percentile(latencies, 0.99) * 1e6:.0f} us"
    )
    segments_started = time.perf_counter()
    for item in viewers[:2000]:
        v = item["viewer"]
        profile = profiles.get(v.get("userId") or "")
        viewer = make_viewer(at=NOW, user_id=v.get("userId"), anonymous_id=v.get("anonymousId"))
        Evaluation(snapshot, viewer, traits=profile["traits"] if profile else None).segments()
    per = (time.perf_counter() - segments_started) / 2000
    print(f"all 200 segments for one viewer: {per * 1e6:.0f} us")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prepare_server(out: Path) -> tuple[dict[str, str], str]:
    """A fresh SQLite database with the workload and its profiles; returns (env, delivery key)."""
    tessera = str(Path(sys.executable).parent / "tessera")
    work = Path(tempfile.mkdtemp(prefix="tessera-bench-"))
    env = {**os.environ, "TESSERA_DATABASE_URL": f"sqlite+aiosqlite:///{work / 'bench.db'}"}
    env.pop("TESSERA_REDIS_URL", None)
    subprocess.run([tessera, "migrate"], env=env, check=True, stdout=subprocess.DEVNULL)
    subprocess.run([tessera, "import", str(out / "bundle.json")], env=env, check=True, stdout=subprocess.DEVNULL)
    subprocess.run(
        [tessera, "import", "--profiles", str(out / "profiles.ndjson")],
        env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    key = subprocess.run(
        [tessera, "keys", "create", "--scope", "delivery"], env=env, check=True, capture_output=True, text=True
    ).stdout.strip()
    return env, key


async def bench_http(out: Path, requests: int, concurrency: int) -> None:
    tessera = str(Path(sys.executable).parent / "tessera")
    env, key = await asyncio.to_thread(prepare_server, out)
    port = free_port()
    server = await asyncio.create_subprocess_exec(
        tessera, "serve", "--no-migrate", "--port", str(port), env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {key}"}) as client:
            for _ in range(200):
                try:
                    if (await client.get("/healthz", timeout=0.5)).status_code == 200:
                        break
                except httpx.TransportError:
                    await asyncio.sleep(0.1)
            viewers = [json.loads(line) for line in (out / "viewers.ndjson").open()]
            bodies: list[dict[str, Any]] = [
                {"query": QUERY, "variables": {"p": v["placement"], "v": v["viewer"]}} for v in viewers
            ]
            latencies: list[float] = []
            queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
            for i in range(requests):
                queue.put_nowait(bodies[i % len(bodies)])

            async def worker() -> None:
                while not queue.empty():
                    body = queue.get_nowait()
                    t0 = time.perf_counter()
                    response = await client.post("/graphql", json=body)
                    response.raise_for_status()
                    latencies.append(time.perf_counter() - t0)

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            elapsed = time.perf_counter() - started
        print(
            f"HTTP placement queries (uvicorn, 1 worker, client on the same 2 cores, concurrency {concurrency}): "
            f"{requests / elapsed:,.0f} req/s; p50 {statistics.median(latencies) * 1000:.1f} ms, "
            f"p99 {percentile(latencies, 0.99) * 1000:.1f} ms"
        )
    finally:
        server.terminate()
        await asyncio.wait_for(server.wait(), timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--http", action="store_true", help="also benchmark a real server over HTTP")
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--profiles", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tessera-workload-") as tmp:
        out = Path(tmp)
        generate(out, args.profiles)
        bench_engine(out)
        if args.http:
            asyncio.run(bench_http(out, args.requests, args.concurrency))


if __name__ == "__main__":
    main()
