"""The ``tessera`` command: serve, migrate, import and export bundles, and manage API keys."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

import click
import orjson

from content.errors import InvalidContent, Problem
from server.settings import Settings, system_clock

T = TypeVar("T")
DEMO_BUNDLE = Path(__file__).parent / "demo" / "bundle.json"
NDJSON_BATCH = 1000


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop where it is installed (uvicorn[standard] brings it; the server runs on it too)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - platforms without uvloop
        return asyncio.run(coroutine)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {kind}" for kind, n in counts.items()) or "nothing"


def _print_problems(problems: list[Problem], limit: int = 200) -> None:
    for problem in problems[:limit]:
        click.echo(f"  {problem}", err=True)
    if len(problems) > limit:
        click.echo(f"  ... and {len(problems) - limit} more", err=True)


class _Tools:
    """What a CLI command needs: the store, and an announcer that tells running servers."""

    def __init__(self, settings: Settings) -> None:
        import redis.asyncio as aioredis

        from server.admin import Admin
        from server.db import create_engine, session_factory
        from server.profiles import PROFILES_CHANNEL
        from server.snapshots import CONTENT_CHANNEL

        self.engine = create_engine(settings.database_url)
        self.sessions = session_factory(engine=self.engine)
        self.redis = aioredis.Redis.from_url(settings.redis_url) if settings.redis_url else None
        prefix = settings.redis_prefix

        async def announce(version: int) -> None:
            # Servers poll the version too; with Redis they hear it within milliseconds.
            if self.redis is not None:
                await self.redis.publish(prefix + "bus:" + CONTENT_CHANNEL, orjson.dumps({"version": version}))

        async def profiles_changed(user_ids: list[str]) -> None:
            if self.redis is not None:
                # The shared copies first, so that no instance re-reads a stale one after the message.
                await self.redis.delete(*(prefix + "profile:" + user_id for user_id in user_ids))
                message = orjson.dumps({"userIds": user_ids})
                await self.redis.publish(prefix + "bus:" + PROFILES_CHANNEL, message)

        from server.events import LocalEventStore, RedisEventStore
        from server.ingest import Ingestor
        from server.profiles import DatabaseSource, ProfileStore

        profiles = ProfileStore(DatabaseSource(self.sessions), budget=None)

        async def consents(user_id: str) -> bool:
            profile = await profiles.get(user_id, wait=True)
            return profile is None or profile.consent

        events: LocalEventStore | RedisEventStore
        if self.redis is not None:
            events = RedisEventStore(self.redis, prefix, retention=settings.retention, clock=system_clock)
        else:  # the database only: a running server follows the events table
            events = LocalEventStore(self.sessions, retention=settings.retention, clock=system_clock, keep_state=False)
        self.ingest = Ingestor(
            events,
            self.sessions,
            limits=settings.limits,
            clock=system_clock,
            consents=consents,
            profiles_changed=profiles_changed,
            prefetch=profiles.prefetch,
        )
        self.admin = Admin(
            self.sessions,
            clock=system_clock,
            announce=announce,
            profiles_changed=profiles_changed,
            ingest=self.ingest,
        )

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()
        await self.engine.dispose()


def _with_tools(settings: Settings, work: Callable[[_Tools], Awaitable[T]]) -> T:
    async def main() -> T:
        tools = _Tools(settings)
        try:
            return await work(tools)
        finally:
            await tools.close()

    return _run(main())


@click.group()
@click.version_option(package_name="tessera")
def main() -> None:
    """Tessera: personalised content blocks over GraphQL.

    Configuration comes from the environment: TESSERA_DATABASE_URL (default: the embedded SQLite
    file ./tessera.db) and TESSERA_REDIS_URL (default: none, in-process cache and bus)."""


@main.command()
@click.option("--host", default=None, help="Default: TESSERA_HOST or 127.0.0.1.")
@click.option("--port", default=None, type=int, help="Default: TESSERA_PORT or 8000.")
@click.option("--migrate/--no-migrate", default=True, show_default=True, help="Migrate the database first.")
def serve(host: str | None, port: int | None, migrate: bool) -> None:
    """Serve the delivery API on /graphql and the admin API on /admin/graphql."""
    import uvicorn

    from server.app import create_app
    from server.migrate import upgrade

    settings = Settings()
    if migrate:
        _run(upgrade(settings.database_url))
    uvicorn.run(create_app(settings), host=host or settings.host, port=port or settings.port, log_level="info")


@main.command()
@click.option("--name", default=None, help="This consumer's name in the group (default: host-pid).")
def worker(name: str | None) -> None:
    """Evaluate segments from the event stream and announce membership changes (needs Redis).

    Run as many as you like: they share the stream through a consumer group, and the events of a
    worker that dies are taken over by the others. Time-driven flips are scheduled in Redis and
    evaluated by whichever worker takes them."""
    import logging

    from server.app import build_services
    from server.worker import StreamWorker

    settings = Settings()
    if settings.redis_url is None:
        raise click.UsageError("tessera worker needs TESSERA_REDIS_URL; the embedded `tessera serve` evaluates itself")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def run() -> None:
        services = build_services(settings.model_copy(update={"worker": False}))
        assert services.redis is not None
        consumer = StreamWorker(
            services.redis,
            settings.redis_prefix,
            evaluator=services.evaluator,
            sessions=services.sessions,
            clock=system_clock,
            consumer=name,
            claim_idle_ms=settings.worker_claim_idle_ms,
        )
        await services.bus.start()
        await services.snapshots.start()
        click.echo(f"worker {consumer.consumer} following {consumer.stream}")
        try:
            await asyncio.gather(consumer.run(), services.evaluator.run_flips())
        finally:
            await services.snapshots.close()
            await services.bus.close()
            await services.redis.aclose()
            await services.engine.dispose()

    with contextlib.suppress(KeyboardInterrupt):
        _run(run())


@main.command()
def migrate() -> None:
    """Bring the database schema up to date (alembic upgrade head)."""
    from sqlalchemy.engine import make_url

    from server.migrate import upgrade

    settings = Settings()
    _run(upgrade(settings.database_url))
    shown = make_url(settings.database_url).render_as_string(hide_password=True)  # never print a password
    click.echo(f"database is at the latest schema: {shown}")


def _ndjson(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield number, orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                yield number, _BadLine(str(exc))


class _BadLine:
    def __init__(self, message: str) -> None:
        self.message = message


def _count_lines(path: Path) -> int:
    with path.open("rb") as handle:
        return sum(1 for line in handle if line.strip())


async def _import_ndjson(tools: _Tools, path: Path, kind: str, dry_run: bool) -> tuple[int, list[Problem]]:
    """Stream a file in batches; each rejected line is reported by its number."""
    written, rejected = 0, []
    importer = tools.admin.import_profiles if kind == "profiles" else tools.admin.import_events
    records = _ndjson(path)
    with click.progressbar(length=_count_lines(path), label=f"{kind} from {path.name}", file=sys.stderr) as bar:
        while batch := list(itertools.islice(records, NDJSON_BATCH)):
            good = []
            for number, record in batch:
                if isinstance(record, _BadLine):
                    rejected.append(Problem(f"{path.name}:{number}", f"not JSON: {record.message}"))
                else:
                    good.append((f"{path.name}:{number}", record))
            count, problems = await importer(good, dry_run=dry_run)
            written += count
            rejected.extend(problems)
            bar.update(len(batch))
    return written, rejected


@main.command("import")
@click.argument("bundle", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--profiles", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="NDJSON profiles.")
@click.option("--events", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="NDJSON events.")
@click.option("--dry-run", is_flag=True, help="Validate and count; write nothing.")
def import_(bundle: Path | None, profiles: Path | None, events: Path | None, dry_run: bool) -> None:
    """Import a bundle (all-or-nothing for configuration) and/or NDJSON profiles and events."""
    if bundle is None and profiles is None and events is None:
        raise click.UsageError("give a BUNDLE file, --profiles or --events")

    document: Any = None
    if bundle is not None:
        try:
            document = orjson.loads(bundle.read_bytes())
        except orjson.JSONDecodeError as exc:
            click.echo(f"{bundle}: not valid JSON: {exc}", err=True)
            sys.exit(1)

    async def work(tools: _Tools) -> int:
        status = 0
        if bundle is not None:
            try:
                report = await tools.admin.import_bundle(document, dry_run=dry_run)
            except InvalidContent as exc:
                click.echo(f"{bundle}: nothing imported, {len(exc.problems)} problem(s):", err=True)
                _print_problems(exc.problems)
                return 1
            what = "would import" if dry_run else "imported"
            click.echo(
                f"{bundle}: {what} content version {report.version}; created {_counts(report.created)}; "
                f"updated {_counts(report.updated)}; unchanged {_counts(report.unchanged)}; "
                f"{report.profiles} profiles, {report.events} new events"
            )
            if report.rejected:
                click.echo(f"{len(report.rejected)} record(s) rejected:", err=True)
                _print_problems(report.rejected)
                status = 1
        for path, kind in ((profiles, "profiles"), (events, "events")):
            if path is None:
                continue
            written, rejected = await _import_ndjson(tools, path, kind, dry_run)
            noun = "new events" if kind == "events" else "profiles"
            click.echo(f"{path}: {'would write' if dry_run else 'wrote'} {written} {noun}; {len(rejected)} rejected")
            if rejected:
                _print_problems(rejected)
                status = 1
        return status

    sys.exit(_with_tools(Settings(), work))


@main.command()
@click.option("-o", "--output", type=click.File("w"), default="-", help="Default: standard output.")
def export(output: IO[str]) -> None:
    """Export the configuration as a bundle (everything but profiles and events)."""

    async def work(tools: _Tools) -> dict[str, Any]:
        return await tools.admin.export_bundle()

    json.dump(_with_tools(Settings(), work), output, indent=2, ensure_ascii=False)
    output.write("\n")


@main.group()
def keys() -> None:
    """Create, list and revoke API keys."""


@keys.command("create")
@click.option("--scope", required=True, type=click.Choice(["delivery", "preview", "admin", "ingest"]))
@click.option("--name", default="", help="A label to recognise the key by.")
def keys_create(scope: str, name: str) -> None:
    """Create a key and print it. It is shown once: only its hash is stored."""
    from server.keys import create_key

    async def work(tools: _Tools) -> str:
        async with tools.sessions() as session, session.begin():
            made = await create_key(session, scope=scope, name=name)
        return made.raw

    click.echo(_with_tools(Settings(), work))


@keys.command("list")
def keys_list() -> None:
    """List keys (their prefixes, never the keys)."""
    from server.store import ApiKeyRecord, ApiKeyRepository

    async def work(tools: _Tools) -> list[ApiKeyRecord]:
        async with tools.sessions() as session:
            return await ApiKeyRepository(session).list()

    for record in _with_tools(Settings(), work):
        state = f"revoked {record.revoked_at:%Y-%m-%d}" if record.revoked_at else "active"
        click.echo(f"{record.id}\t{record.scope}\t{record.prefix}...\t{state}\t{record.name}")


@keys.command("revoke")
@click.argument("key_id", type=int)
def keys_revoke(key_id: int) -> None:
    """Revoke a key by its id (running servers stop accepting it within their key cache TTL)."""
    from server.store import ApiKeyRepository

    async def work(tools: _Tools) -> bool:
        async with tools.sessions() as session, session.begin():
            return await ApiKeyRepository(session).revoke(key_id, system_clock())

    if not _with_tools(Settings(), work):
        raise click.ClickException(f"no active key with id {key_id}")
    click.echo(f"revoked key {key_id}")


@main.command()
def demo() -> None:
    """Migrate, import the demo shop and print fresh demo keys (what `make run` does first)."""
    from server.keys import create_key
    from server.migrate import upgrade
    from server.store import ApiKeyRepository

    settings = Settings()
    _run(upgrade(settings.database_url))

    bundle = orjson.loads(DEMO_BUNDLE.read_bytes())

    async def work(tools: _Tools) -> dict[str, str]:
        report = await tools.admin.import_bundle(bundle)
        click.echo(f"demo shop imported (content version {report.version})")
        made = {}
        async with tools.sessions() as session, session.begin():
            repo = ApiKeyRepository(session)
            for record in await repo.list():  # one set of demo keys at a time
                if record.name.startswith("demo-") and record.revoked_at is None:
                    await repo.revoke(record.id, system_clock())
            for scope in ("delivery", "preview", "admin", "ingest"):
                made[scope] = (await create_key(session, scope=scope, name=f"demo-{scope}")).raw
        return made

    made = _with_tools(settings, work)
    click.echo("demo keys (shown once; `make run` makes new ones each time):")
    for scope, raw in made.items():
        click.echo(f"  {scope:<9} {raw}")
