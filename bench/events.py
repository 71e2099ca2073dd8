"""Events benchmark: a real server (uvicorn, Redis mode) and a real ``tessera worker`` on loopback, fed
through the Segment-compatible ``/v1/batch``. Reports

1. events accepted per second through ``/v1/batch`` (several concurrent clients): for anonymous
   visitors (no consent lookup), for known users seen for the first time (each consent lookup reads
   the database) and for the same users again (the profile cache answers), then how fast the worker
   works off the stream behind them;
2. the time from ``/v1/track`` returning to the membership change being announced on the bus;
3. how late time-driven flips are announced (``{"event": "x", "within": "2s"}``: membership ends
   exactly 2 s after the event).

    .venv/bin/python bench/events.py
    .venv/bin/python bench/events.py --events 100000 --batch 500 --clients 8 --profile /tmp/server.prof

PostgreSQL (TESSERA_TEST_DATABASE_URL's server) gets a database of this run's own, dropped at the end;
Redis (TESSERA_TEST_REDIS_URL) a key prefix of its own, deleted at the end. The client runs on the
same machine as everything else. Prints its numbers; asserts nothing."""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import pstats
import secrets
import signal
import socket
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import orjson
import redis.asyncio as aioredis
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server import migrate  # noqa: E402
from server.bus import RedisBus  # noqa: E402
from server.db import create_engine, session_factory  # noqa: E402
from server.keys import create_key  # noqa: E402
from server.store import ProfileRepository  # noqa: E402
from server.worker import GROUP, SEGMENTS_CHANNEL  # noqa: E402

DATABASE_URL = os.environ.get("TESSERA_TEST_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("TESSERA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
BIN = Path(sys.executable).parent

SEGMENTS = [
    {"key": "viewers", "name": "Viewers", "rule": {"event": "view"}},
    {"key": "engaged", "name": "Engaged", "rule": {"event": "view", "count": {"gte": 5}, "within": "1h"}},
    {"key": "pricing", "name": "Pricing", "rule": {"event": "view", "where": {"page": "/pricing"}}},
    {"key": "recent-x", "name": "Recent x", "rule": {"event": "x", "within": "2s"}},
]
IMPORT = "mutation($b: JSON!) { importBundle(bundle: $b) { ok errors { path message } } }"


def percentile(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def iso_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- the world: a database, a Redis prefix, the server and the worker -------------------------------


@dataclass
class World:
    base_url: str
    redis: aioredis.Redis
    prefix: str
    ingest_key: str
    processes: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(f"{self.ingest_key}:".encode()).decode()}


@asynccontextmanager
async def database() -> AsyncIterator[str]:
    server_url = make_url(DATABASE_URL)
    name = f"tessera_bench_{secrets.token_hex(4)}"
    admin = create_async_engine(server_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    async with admin.connect() as connection:
        await connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        url = server_url.set(database=name).render_as_string(hide_password=False)
        await migrate.upgrade(url)
        yield url
    finally:
        async with admin.connect() as connection:
            await connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.dispose()


async def prepare(url: str, users: int) -> tuple[str, str]:
    """An admin and an ingest key, and a profile for each of ``users`` known users; the keys."""
    engine = create_engine(url)
    try:
        async with session_factory(engine)() as session, session.begin():
            admin = (await create_key(session, scope="admin", name="bench")).raw
            ingest = (await create_key(session, scope="ingest", name="bench")).raw
            profiles = ProfileRepository(session)
            for start in range(0, users, 1000):
                await profiles.upsert_many(
                    [
                        {"userId": f"u-{i}", "traits": {"tier": "gold" if i % 3 else "silver"}, "consent": None}
                        for i in range(start, min(users, start + 1000))
                    ]
                )
    finally:
        await engine.dispose()
    return admin, ingest


async def start(command: list[str], env: dict[str, str], *, log: Path) -> asyncio.subprocess.Process:
    handle = log.open("wb")
    return await asyncio.create_subprocess_exec(*command, env=env, stdout=handle, stderr=handle)


async def stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.send_signal(signal.SIGINT)  # uvicorn and the worker shut down cleanly (cProfile writes)
        try:
            await asyncio.wait_for(process.wait(), timeout=20)
        except TimeoutError:
            process.kill()
            await process.wait()


@asynccontextmanager
async def world(args: argparse.Namespace) -> AsyncIterator[World]:
    prefix = f"tessera-bench:{secrets.token_hex(4)}:"
    redis = aioredis.Redis.from_url(REDIS_URL)
    logs = Path(args.logs)
    await asyncio.to_thread(logs.mkdir, parents=True, exist_ok=True)
    async with database() as url:
        admin_key, ingest_key = await prepare(url, args.users)
        env = {
            **os.environ,
            "TESSERA_DATABASE_URL": url,
            "TESSERA_REDIS_URL": REDIS_URL,
            "TESSERA_REDIS_PREFIX": prefix,
        }
        port = free_port()
        server_command = [
            str(BIN / "uvicorn"), "server.app:create_app", "--factory", "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "warning", "--no-access-log", "--workers", str(args.server_processes),
        ]  # fmt: skip
        if args.profile:
            profiled = [sys.executable, "-m", "cProfile", "-o", args.profile, "-m", "uvicorn"]
            server_command = profiled + server_command[1:]
        w = World(f"http://127.0.0.1:{port}", redis, prefix, ingest_key)
        try:
            w.processes["server"] = await start(server_command, env, log=logs / "server.log")
            async with httpx.AsyncClient(base_url=w.base_url) as client:
                for _ in range(300):
                    with contextlib.suppress(httpx.TransportError):
                        if (await client.get("/healthz", timeout=1)).status_code == 200:
                            break
                    await asyncio.sleep(0.1)
                bundle = {"version": 1, "locales": {"default": "en-US"}, "segments": SEGMENTS}
                reply = await client.post(
                    "/admin/graphql",
                    json={"query": IMPORT, "variables": {"b": bundle}},
                    headers={"Authorization": f"Bearer {admin_key}"},
                )
                assert reply.json()["data"]["importBundle"]["ok"], reply.text
            for i in range(args.workers):
                worker_command = [str(BIN / "tessera"), "worker", "--name", f"bench-{i}"]
                if args.profile_worker and i == 0:
                    worker_command = [sys.executable, "-m", "cProfile", "-o", args.profile_worker, *worker_command]
                w.processes[f"worker-{i}"] = await start(worker_command, env, log=logs / f"worker-{i}.log")
            # The workers are ready when the consumer group has them all (they join on their first read).
            stream = prefix + "events"
            for _ in range(300 if args.workers else 0):
                with contextlib.suppress(aioredis.ResponseError):
                    if len(await redis.xinfo_consumers(stream, GROUP)) >= args.workers:
                        break
                await asyncio.sleep(0.1)
            yield w
        finally:
            for process in w.processes.values():
                await stop(process)
            keys = [key async for key in redis.scan_iter(match=f"{prefix}*", count=1000)]
            if keys:
                await redis.unlink(*keys)
            await redis.aclose()


# -- (1) throughput ----------------------------------------------------------------------------------


def make_batches(events: int, size: int, viewers: int, id_field: str, id_prefix: str) -> list[bytes]:
    """Batch bodies of ``size`` track messages, shaped like analytics-python's, for ``events``
    events spread round-robin over ``viewers`` viewers (``userId`` or ``anonymousId``)."""
    pages = ["/", "/pricing", "/docs", "/blog", "/signup"]
    bodies = []
    for start in range(0, events, size):
        messages = []
        for n in range(start, min(events, start + size)):
            messages.append(
                {
                    "type": "track",
                    "event": "view",
                    id_field: f"{id_prefix}{n % viewers}",
                    "messageId": str(uuid.uuid4()),
                    "timestamp": iso_now(),
                    "properties": {"page": pages[n % len(pages)], "referrer": "https://example.com/"},
                    "context": {"library": {"name": "analytics-python", "version": "2.4.0"}, "ip": "10.0.0.1"},
                    "integrations": {},
                }
            )
        bodies.append(orjson.dumps({"batch": messages, "sentAt": iso_now()}))
    return bodies


@dataclass
class Run:
    elapsed: float = 0.0
    accepted: int = 0
    retried: int = 0  # answers of 5xx or 429, retried after a pause as Segment's clients do
    latencies: list[float] = field(default_factory=list)


async def throughput(w: World, bodies: list[bytes], clients: int) -> Run:
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    run = Run()
    headers = {**w.auth, "Content-Type": "application/json"}

    async def client_loop() -> None:
        async with httpx.AsyncClient(base_url=w.base_url, headers=headers, timeout=60) as client:
            while not queue.empty():
                body = queue.get_nowait()
                while True:
                    t0 = time.perf_counter()
                    response = await client.post("/v1/batch", content=body)
                    run.latencies.append(time.perf_counter() - t0)
                    if response.status_code < 500 and response.status_code != 429:
                        break
                    run.retried += 1
                    await asyncio.sleep(0.2)
                response.raise_for_status()
                answer = response.json()
                run.accepted += answer["accepted"]
                if answer["rejected"]:
                    print("  rejected:", answer["rejected"][:2])

    started = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(clients)))
    run.elapsed = time.perf_counter() - started
    return run


async def backlog(w: World) -> int:
    """Events in the stream that the workers have not acknowledged yet."""
    groups = await w.redis.xinfo_groups(w.prefix + "events")
    group = next(g for g in groups if g["name"] in (GROUP, GROUP.encode()))
    return int(group["pending"]) + int(group.get("lag") or 0)


async def worker_rate(w: World, seconds: float) -> tuple[float, int]:
    """(events/s the workers acknowledge, over up to ``seconds``; the backlog left)."""
    started, first = time.perf_counter(), await backlog(w)
    left = first
    while left and time.perf_counter() - started < seconds:
        await asyncio.sleep(0.25)
        left = await backlog(w)
    return (first - left) / (time.perf_counter() - started), left


async def skip_backlog(w: World) -> None:
    """Move the consumer group past everything in the stream (acknowledging what is pending), so
    that the latency phases measure a worker that keeps up rather than the backlog ahead of it."""
    stream = w.prefix + "events"
    await w.redis.xgroup_setid(stream, GROUP, "$")
    while pending := await w.redis.xpending_range(stream, GROUP, min="-", max="+", count=1000):
        await w.redis.xack(stream, GROUP, *(p["message_id"] for p in pending))


# -- (2) and (3): announcements on the bus -----------------------------------------------------------


class Announcements:
    """Receives the segments channel; resolves the futures waiting for (unit, entered|left, segment)."""

    def __init__(self) -> None:
        self.waiting: dict[tuple[str, str, str], asyncio.Future[tuple[float, float]]] = {}

    def expect(self, unit: str, change: str, segment: str) -> asyncio.Future[tuple[float, float]]:
        future: asyncio.Future[tuple[float, float]] = asyncio.get_running_loop().create_future()
        self.waiting[(unit, change, segment)] = future
        return future

    async def listen(self, bus: RedisBus) -> None:
        async with bus.subscribe(SEGMENTS_CHANNEL) as messages:
            async for message in messages:
                now = (time.perf_counter(), time.time())
                for change in ("entered", "left"):
                    for segment in message.get(change) or ():
                        future = self.waiting.pop((message["unit"], change, segment), None)
                        if future is not None and not future.done():
                            future.set_result(now)


async def announce_latency(w: World, announcements: Announcements, viewers: int) -> list[float]:
    latencies = []
    async with httpx.AsyncClient(base_url=w.base_url, headers=w.auth) as client:
        # First a probe, answered once the worker is done with what it held when the backlog was skipped.
        probe = announcements.expect("u:probe", "entered", "viewers")
        (await client.post("/v1/track", json={"userId": "probe", "event": "view"})).raise_for_status()
        await asyncio.wait_for(probe, timeout=60)
        for i in range(viewers):
            user = f"lat-{i}-{secrets.token_hex(3)}"
            announced = announcements.expect(f"u:{user}", "entered", "viewers")
            response = await client.post("/v1/track", json={"userId": user, "event": "view", "messageId": user})
            returned = time.perf_counter()
            response.raise_for_status()
            at, _ = await asyncio.wait_for(announced, timeout=10)
            latencies.append(at - returned)
    return latencies


async def flip_lateness(w: World, announcements: Announcements, viewers: int) -> list[float]:
    pending = []
    async with httpx.AsyncClient(base_url=w.base_url, headers=w.auth) as client:
        for i in range(viewers):
            user = f"flip-{i}-{secrets.token_hex(3)}"
            now = datetime.now(UTC)
            happened = now.replace(microsecond=now.microsecond // 1000 * 1000)  # the store keeps ms
            flip_at = happened.timestamp() + 2.0  # within 2s: a member while now - 2s < t, so until t + 2s
            left = announcements.expect(f"u:{user}", "left", "recent-x")
            message = {"userId": user, "event": "x", "messageId": user, "timestamp": happened.isoformat()}
            (await client.post("/v1/track", json=message)).raise_for_status()
            pending.append((left, flip_at))
            await asyncio.sleep(1.5 / viewers)  # spread the flip instants over 1.5 s
    lateness = []
    for left, flip_at in pending:
        _, wall = await asyncio.wait_for(left, timeout=15)
        lateness.append(wall - flip_at)
    return lateness


# -- main ----------------------------------------------------------------------------------------------


def ms(values: Sequence[float]) -> str:
    return (
        f"p50 {statistics.median(values) * 1000:.1f} ms, p99 {percentile(values, 0.99) * 1000:.1f} ms, "
        f"max {max(values) * 1000:.1f} ms (n={len(values)})"
    )


async def run(args: argparse.Namespace) -> None:
    print(
        f"setup: {os.cpu_count()} cores; server: uvicorn x{args.server_processes}; workers: {args.workers}; "
        f"clients: {args.clients}; batches of {args.batch}"
    )
    async with world(args) as w:
        phases = [
            ("anonymous visitors (no consent lookup)", args.events, args.users, "anonymousId", "a-"),
            ("known users, first sight (cold consent lookups)", args.users, args.users, "userId", "u-"),
            ("known users again (cached consent lookups)", args.events, args.users, "userId", "u-"),
        ]
        for title, events, viewers, id_field, id_prefix in phases:
            bodies = make_batches(events, args.batch, viewers, id_field, id_prefix)
            size = sum(len(b) for b in bodies) / len(bodies)
            run = await throughput(w, bodies, args.clients)
            print(
                f"(1) /v1/batch, {title}: {run.accepted:,} events in {run.elapsed:.2f} s = "
                f"{run.accepted / run.elapsed:,.0f} events/s accepted; request {ms(run.latencies)}; "
                f"body {size / 1024:.0f} KB; {run.retried} requests answered 5xx and retried"
            )
        if not args.workers:
            print("no worker: (2) and (3) need one")
            return
        rate, left = await worker_rate(w, args.drain_seconds)
        print(f"    the worker acknowledged {rate:,.0f} events/s afterwards; {left:,} still behind it were skipped")
        await skip_backlog(w)

        bus = RedisBus(w.redis, w.prefix)
        await bus.start()
        announcements = Announcements()
        listener = asyncio.create_task(announcements.listen(bus))
        try:
            latencies = await announce_latency(w, announcements, args.viewers)
            print(f"(2) /v1/track returned -> membership change announced on the bus: {ms(latencies)}")
            late = await flip_lateness(w, announcements, args.flips)
            print(f"(3) time-driven flip announced after its instant: {ms(late)}")
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
            await bus.close()
    for what, path in (("server", args.profile), ("worker", args.profile_worker)):
        if path:
            print(f"\n{what} profile ({path}), by own time:")
            pstats.Stats(path).sort_stats("tottime").print_stats(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=100_000, help="events per throughput phase")
    parser.add_argument("--batch", type=int, default=250, help="messages per /v1/batch request")
    parser.add_argument("--clients", type=int, default=4, help="concurrent HTTP clients")
    parser.add_argument("--users", type=int, default=20_000, help="distinct viewers (with profiles) in phase 1")
    parser.add_argument("--drain-seconds", type=float, default=15.0, help="how long to watch the worker catch up")
    parser.add_argument("--viewers", type=int, default=300, help="viewers for the announcement latency")
    parser.add_argument("--flips", type=int, default=100, help="viewers for the flip lateness")
    parser.add_argument("--workers", type=int, default=1, help="`tessera worker` processes (0: none)")
    parser.add_argument("--server-processes", type=int, default=1, help="uvicorn --workers")
    parser.add_argument("--profile", default=None, help="run the server under cProfile, writing here")
    parser.add_argument("--profile-worker", default=None, help="run the first worker under cProfile, writing here")
    parser.add_argument("--logs", default="/tmp/tessera-bench-logs", help="where the processes' output goes")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
