"""Profile store benchmark: how long a read takes with a warm in-process cache and with a cold one
(through Redis; through the upstream profile service on loopback), and how many upstream calls
request coalescing saves under concurrent load.

    .venv/bin/python bench/profiles.py
    .venv/bin/python bench/profiles.py --requests 10000 --profiles 1000 --concurrency 100 --delay-ms 5

The upstream runs in a child process (uvicorn on 127.0.0.1), so that it does not share the store's
event loop; Redis is TESSERA_TEST_REDIS_URL or redis://127.0.0.1:6379/0, under a prefix of this
run's own that is deleted at the end. Prints its numbers; asserts nothing."""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server.profiles import HttpSource, ProfileStore  # noqa: E402

REDIS_URL = os.environ.get("TESSERA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


# -- the upstream, in a child process ----------------------------------------------------------------


def upstream_app(delay_ms: float) -> Callable[..., Awaitable[None]]:
    """``GET /profiles/{id}`` answers traits at once; ``GET /slow/profiles/{id}`` after ``delay_ms``
    (a real profile service is not on loopback). Ids starting with ``missing-`` are 404."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        slow = path.startswith("/slow/")
        user_id = path.rsplit("/", 1)[-1]
        if slow:
            await asyncio.sleep(delay_ms / 1000)  # the simulated service's own latency
        status, body = (
            (404, b'{"error":"not found"}')
            if user_id.startswith("missing-")
            else (200, orjson.dumps({"traits": {"tier": "gold", "ltv": 1200, "id": user_id}}))
        )
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


def serve_upstream(port: int, delay_ms: float) -> None:
    import uvicorn

    uvicorn.run(
        upstream_app(delay_ms), host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="off"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_upstream(delay_ms: float) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    child = subprocess.Popen(
        [sys.executable, __file__, "--serve-upstream", str(port), "--delay-ms", str(delay_ms)], cwd=ROOT
    )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:  # a benchmark may wait for its server to come up
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return child, port
        except OSError:
            time.sleep(0.05)
    child.kill()
    sys.exit("the upstream did not start")


# -- measuring -----------------------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


def latency_line(name: str, samples_ns: Sequence[int]) -> str:
    us = [s / 1000 for s in samples_ns]
    return (
        f"{name:<44} n={len(us):>7,}  p50 {percentile(us, 0.50):>8.1f} µs  p99 {percentile(us, 0.99):>8.1f} µs"
        f"  p99.9 {percentile(us, 0.999):>8.1f} µs"
    )


async def timed_reads(store: ProfileStore, ids: Sequence[str]) -> list[int]:
    samples: list[int] = []
    clock = time.perf_counter_ns
    for user_id in ids:
        started = clock()
        await store.get(user_id)
        samples.append(clock() - started)
    return samples


@dataclass
class Bench:
    url: str  # of the fast upstream: http://127.0.0.1:PORT/profiles/{userId}
    slow_url: str
    redis: aioredis.Redis
    prefix: str

    def store(self, *, slow: bool = False, redis: bool = False, **options: Any) -> ProfileStore:
        source = HttpSource(self.slow_url if slow else self.url, timeout=10.0)
        settings: dict[str, Any] = {"budget": None, "ttl": 30.0, "stale": 300.0, **options}
        if redis:
            settings.update(redis=self.redis, prefix=self.prefix)
        return ProfileStore(source, **settings)


async def warm(bench: Bench, reads: int) -> None:
    store = bench.store()
    ids = [f"u-{n}" for n in range(1000)]
    for user_id in ids:
        await store.get(user_id)
    sequence = [ids[n % len(ids)] for n in range(reads)]
    await timed_reads(store, sequence[:10_000])  # warm the interpreter's caches too
    samples = await timed_reads(store, sequence)
    started = time.perf_counter()
    for user_id in sequence:
        await store.get(user_id)
    elapsed = time.perf_counter() - started
    empty = []
    for _ in range(10_000):
        before = time.perf_counter_ns()
        empty.append(time.perf_counter_ns() - before)
    print(latency_line("warm, in-process LRU hit", samples))
    print(
        f"{'':<44} {reads / elapsed:,.0f} reads/s untimed; timer overhead ~{percentile(empty, 0.5) / 1000:.2f} µs;"
        f" upstream calls {store.stats.upstream_calls:,} for {store.stats.requests:,} reads"
    )
    await store.close()


async def cold(bench: Bench, n: int) -> None:
    ids = [f"u-cold-{secrets.token_hex(4)}-{i}" for i in range(n)]

    # Through the upstream, no Redis: every read is one HTTP call on loopback
    store = bench.store()
    await timed_reads(store, [f"u-warmup-{i}" for i in range(200)])  # connections and code paths
    samples = await timed_reads(store, ids)
    print(latency_line("cold, upstream on loopback (no Redis)", samples))
    await store.close()

    # Redis misses, then the upstream (and a Redis write, after the answer)
    filler = bench.store(redis=True)
    await timed_reads(filler, [f"u-warmup-r-{i}" for i in range(200)])
    samples = await timed_reads(filler, ids)
    await filler.drain()
    print(latency_line("cold, Redis miss -> upstream", samples))
    await filler.close()

    # Another instance, cold in process: every read is a Redis hit
    reader = bench.store(redis=True)
    await timed_reads(reader, [f"u-warmup-r-{i}" for i in range(200)])
    samples = await timed_reads(reader, ids)
    print(latency_line("cold in process, Redis hit", samples))
    print(f"{'':<44} redis hits {reader.stats.redis_hits:,}, upstream calls {reader.stats.upstream_calls:,}")
    await reader.close()


def workload(requests: int, profiles: int, skew: float | None, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    ids = [f"u-load-{n}" for n in range(profiles)]
    if skew is None:
        return [rng.choice(ids) for _ in range(requests)]
    weights = [1 / (rank + 1) ** skew for rank in range(profiles)]
    return rng.choices(ids, weights=weights, k=requests)


async def run_load(store: ProfileStore, sequence: Sequence[str], concurrency: int) -> float:
    position = 0

    async def worker() -> None:
        nonlocal position
        while position < len(sequence):
            user_id = sequence[position]
            position += 1
            await store.get(user_id)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started


async def coalescing(bench: Bench, requests: int, profiles: int, concurrency: int, delay_ms: float) -> None:
    print(
        f"\n{requests:,} requests over {profiles:,} profiles, concurrency {concurrency}, "
        f"upstream answering after {delay_ms:g} ms, cold start, no Redis (saved: calls not made / requests):"
    )
    print(
        f"{'':<34}{'upstream calls':>16}{'coalesced':>11}{'LRU hits':>10}{'saved':>8}"
        f"{'calls w/o coalescing':>22}{'wall':>9}"
    )
    for label, skew in (("uniform", None), ("zipf s=1.1", 1.1)):
        sequence = workload(requests, profiles, skew)
        distinct = len(set(sequence))
        for mode, options in (
            ("cache + coalescing", {}),
            ("coalescing only (TTL 0)", {"ttl": 0.0, "stale": 0.0, "negative_ttl": 0.0}),
            ("cache, 50 ms budget", {"budget": 0.05}),
        ):
            store = bench.store(slow=True, **options)
            elapsed = await run_load(store, sequence, concurrency)
            s = store.stats
            saved = 1 - s.upstream_calls / requests
            # Each coalesced request would otherwise have made a call of its own.
            print(
                f"  {label:<11} {mode:<22}{s.upstream_calls:>14,}{s.coalesced:>11,}{s.local_hits:>10,}"
                f"{saved:>8.1%}{s.upstream_calls + s.coalesced:>22,}{elapsed * 1000:>7.0f}ms"
                + (f"  ({s.budget_timeouts:,} answered without a profile at the budget)" if s.budget_timeouts else "")
            )
            await store.drain()
            await store.close()
        print(f"  {label:<11} {'(distinct profiles asked for)':<22}{distinct:>14,}")


async def main(args: argparse.Namespace) -> None:
    child, port = start_upstream(args.delay_ms)
    redis = aioredis.Redis.from_url(REDIS_URL)
    prefix = f"tessera-bench:{secrets.token_hex(6)}:"
    bench = Bench(
        url=f"http://127.0.0.1:{port}/profiles/{{userId}}",
        slow_url=f"http://127.0.0.1:{port}/slow/profiles/{{userId}}",
        redis=redis,
        prefix=prefix,
    )
    try:
        await redis.ping()
        loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
        print(f"python {sys.version.split()[0]}, event loop: {loop}, {os.cpu_count()} CPUs\n")
        await warm(bench, args.warm_reads)
        await cold(bench, args.cold_reads)
        await coalescing(bench, args.requests, args.profiles, args.concurrency, args.delay_ms)
    finally:
        keys = [key async for key in redis.scan_iter(match=f"{prefix}*", count=1000)]
        for start in range(0, len(keys), 1000):
            await redis.unlink(*keys[start : start + 1000])
        await redis.aclose()
        child.terminate()
        child.wait(10)


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warm-reads", type=int, default=200_000)
    parser.add_argument("--cold-reads", type=int, default=2_000)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--profiles", type=int, default=1_000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--delay-ms", type=float, default=5.0, help="the slow upstream's latency")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop", help="as uvicorn would pick")
    parser.add_argument("--serve-upstream", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_upstream:
        serve_upstream(args.serve_upstream, args.delay_ms)
        return
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(main(args))
    else:
        asyncio.run(main(args))


if __name__ == "__main__":
    cli()
