"""The ``tessera`` command (server/cli.py), run as users run it: a subprocess with TESSERA_DATABASE_URL
set, against the real PostgreSQL and SQLite databases."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fixtures_app import by_key, running_app
from sqlalchemy.ext.asyncio import AsyncSession

from server import models
from server.cli import DEMO_BUNDLE
from server.db import create_engine, session_factory
from server.keys import hash_key
from server.store import ApiKeyRepository, EventRepository, ProfileRepository, SpaceRepository

TESSERA = Path(sys.executable).with_name("tessera")
COMMAND_TIMEOUT = 120.0  # a bound on a hung subprocess, not a wait for anything


@dataclass
class Result:
    code: int
    out: str
    err: str


def tessera_env(database_url: str | None, **settings: str) -> dict[str, str]:
    """The environment of a user's shell with only this test's TESSERA_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
    if database_url is not None:
        env["TESSERA_DATABASE_URL"] = database_url
    env.update({f"TESSERA_{k.upper()}": v for k, v in settings.items()})
    return env


async def tessera(*args: str | Path, database_url: str | None, cwd: Path, **settings: str) -> Result:
    """Run ``tessera ARGS...`` to completion (with no TESSERA_DATABASE_URL when ``database_url`` is None)."""
    if not TESSERA.exists():
        pytest.fail(f"the tessera console script is missing at {TESSERA}: install the project (make install)")
    process = await asyncio.create_subprocess_exec(
        TESSERA,
        *map(str, args),
        cwd=cwd,
        env=tessera_env(database_url, **settings),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), COMMAND_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return Result(process.returncode, out.decode(), err.decode())


@asynccontextmanager
async def session_on(url: str) -> AsyncIterator[AsyncSession]:
    engine = create_engine(url)
    try:
        async with session_factory(engine)() as session:
            yield session
    finally:
        await engine.dispose()


async def content_version(url: str) -> int:
    async with session_on(url) as session:
        return await SpaceRepository(session).content_version()


async def row_counts(url: str) -> dict[str, int]:
    """Rows in every table but the space row, which the migration makes."""
    async with session_on(url) as session:
        counts = {}
        for table in models.Base.metadata.sorted_tables:
            result = await session.execute(sa.select(sa.func.count()).select_from(table))
            counts[table.name] = result.scalar_one()
        return counts


def demo_bundle() -> dict[str, Any]:
    bundle: dict[str, Any] = json.loads(DEMO_BUNDLE.read_text())
    return bundle


def write_json(path: Path, document: Any) -> Path:
    path.write_text(json.dumps(document))
    return path


# --- migrate -------------------------------------------------------------------------------------


async def test_migrate_builds_a_fresh_sqlite_file_and_is_repeatable(tmp_path: Path) -> None:
    path = tmp_path / "data" / "tessera.db"
    url = f"sqlite+aiosqlite:///{path}"

    first = await tessera("migrate", database_url=url, cwd=tmp_path)
    again = await tessera("migrate", database_url=url, cwd=tmp_path)

    assert (first.code, again.code) == (0, 0), first.err + again.err
    assert "latest schema" in first.out
    with sqlite3.connect(path) as connection:
        tables = {name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {table.name for table in models.Base.metadata.sorted_tables} <= tables
    assert await content_version(url) == 0


async def test_migrate_uses_the_embedded_file_in_the_working_directory_by_default(tmp_path: Path) -> None:
    result = await tessera("migrate", database_url=None, cwd=tmp_path)

    assert result.code == 0, result.err
    assert (tmp_path / "tessera.db").exists()
    assert await content_version(f"sqlite+aiosqlite:///{tmp_path / 'tessera.db'}") == 0


async def test_migrate_on_postgresql_never_prints_the_password(empty_postgres_url: str, tmp_path: Path) -> None:
    # The test server trusts local connections, so any password is accepted, and none may be shown.
    url = empty_postgres_url.replace("://postgres@", "://postgres:s3cret-pw@")
    assert "s3cret-pw" in url, "the test PostgreSQL URL is expected to name the user postgres"

    result = await tessera("migrate", database_url=url, cwd=tmp_path)

    assert result.code == 0, result.err
    assert "s3cret-pw" not in result.out + result.err
    assert await content_version(empty_postgres_url) == 0


# --- keys ----------------------------------------------------------------------------------------


async def test_keys_create_list_and_revoke(db_url: str, tmp_path: Path) -> None:
    created = await tessera(
        "keys", "create", "--scope", "delivery", "--name", "storefront", database_url=db_url, cwd=tmp_path
    )

    assert created.code == 0, created.err
    lines = created.out.splitlines()
    assert len(lines) == 1, "the key is printed alone, once"
    raw = lines[0]
    assert raw.startswith("tess_delivery_")
    async with session_on(db_url) as session:
        [record] = await ApiKeyRepository(session).list()
        found = await ApiKeyRepository(session).find_by_hash(hash_key(raw))
    assert found == record
    assert (record.scope, record.name, record.revoked_at) == ("delivery", "storefront", None)

    listed = await tessera("keys", "list", database_url=db_url, cwd=tmp_path)

    assert listed.code == 0, listed.err
    assert raw not in listed.out
    assert listed.out.split("\t")[:4] == [str(record.id), "delivery", f"{record.prefix}...", "active"]

    revoked = await tessera("keys", "revoke", str(record.id), database_url=db_url, cwd=tmp_path)
    listed_after = await tessera("keys", "list", database_url=db_url, cwd=tmp_path)
    revoked_again = await tessera("keys", "revoke", str(record.id), database_url=db_url, cwd=tmp_path)

    assert revoked.code == 0, revoked.err
    assert f"revoked key {record.id}" in revoked.out
    assert "\trevoked " in listed_after.out
    assert revoked_again.code != 0
    assert f"no active key with id {record.id}" in revoked_again.err


async def test_keys_create_refuses_an_unknown_scope(db_url: str, tmp_path: Path) -> None:
    result = await tessera("keys", "create", "--scope", "root", database_url=db_url, cwd=tmp_path)

    assert result.code == 2
    assert "'root' is not one of" in result.err
    assert result.out == ""
    assert (await row_counts(db_url))["api_keys"] == 0


DELIVERY_QUERY = '{ placement(key: "home-hero") { key } }'


async def test_a_key_created_by_the_cli_works_at_once_on_a_running_server(db_url: str, tmp_path: Path) -> None:
    async with running_app(db_url) as app:
        before = await app.graphql(DELIVERY_QUERY, key="tess_delivery_not-made-yet")
        assert before.status == 401

        created = await tessera("keys", "create", "--scope", "delivery", database_url=db_url, cwd=tmp_path)
        assert created.code == 0, created.err
        raw = created.out.strip()

        app.services.keys.forget()  # the one-second memory of the failed try above, which a user would wait out
        reply = await app.graphql(DELIVERY_QUERY, key=raw)
        assert (reply.status, reply.errors) == (200, [])
        assert reply.data == {"placement": None}

        # A key that the server has never been asked about needs no wait at all.
        second = await tessera("keys", "create", "--scope", "preview", database_url=db_url, cwd=tmp_path)
        assert second.code == 0, second.err
        reply = await app.graphql(DELIVERY_QUERY, key=second.out.strip())
        assert (reply.status, reply.errors) == (200, [])

        async with session_on(db_url) as session:
            records = await ApiKeyRepository(session).list()
        key_id = next(r.id for r in records if r.name == "" and r.scope == "delivery")
        revoked = await tessera("keys", "revoke", str(key_id), database_url=db_url, cwd=tmp_path)
        assert revoked.code == 0, revoked.err
        app.services.keys.forget()  # what the key cache TTL does on its own
        reply = await app.graphql(DELIVERY_QUERY, key=raw)
        assert reply.status == 401
        assert reply.codes() == ["UNAUTHENTICATED"]


# --- import and export ---------------------------------------------------------------------------


async def test_import_a_bundle_prints_counts(db_url: str, tmp_path: Path) -> None:
    result = await tessera("import", DEMO_BUNDLE, database_url=db_url, cwd=tmp_path)

    assert result.code == 0, result.err
    assert "imported content version 1" in result.out
    assert "created 3 placements, 6 segments, 1 scores, 2 flags, 1 experiments, 8 blocks;" in result.out
    assert "3 profiles" in result.out
    counts = await row_counts(db_url)
    assert (counts["placements"], counts["segments"], counts["flags"], counts["profiles"]) == (3, 6, 2, 3)
    assert await content_version(db_url) == 1


async def test_import_twice_changes_nothing(db_url: str, tmp_path: Path) -> None:
    first = await tessera("import", DEMO_BUNDLE, database_url=db_url, cwd=tmp_path)
    exported = await tessera("export", database_url=db_url, cwd=tmp_path)
    counts = await row_counts(db_url)

    second = await tessera("import", DEMO_BUNDLE, database_url=db_url, cwd=tmp_path)

    assert (first.code, second.code) == (0, 0), first.err + second.err
    assert "created nothing; updated nothing; unchanged 3 placements," in second.out
    assert await content_version(db_url) == 1
    assert await row_counts(db_url) == counts  # no new block versions, no duplicates
    assert (await tessera("export", database_url=db_url, cwd=tmp_path)).out == exported.out


def invalid_bundle() -> dict[str, Any]:
    """The demo bundle with one thing wrong in each of several places."""
    bundle = demo_bundle()
    bundle["placements"][1]["limit"] = "three"
    bundle["segments"][0]["rule"] = {"trait": "tier", "op": "equals", "value": "gold"}
    bundle["flags"][1]["rollout"] = 150
    bundle["blocks"][2]["placements"] = [{"key": "no-such-placement"}]
    bundle["blocks"][0]["variants"][1]["when"] = {"segment": "no-such-segment"}
    return bundle


async def test_an_invalid_bundle_lists_every_error_and_imports_nothing(db_url: str, tmp_path: Path) -> None:
    bundle = write_json(tmp_path / "bad.json", invalid_bundle())
    before = await row_counts(db_url)

    result = await tessera("import", bundle, database_url=db_url, cwd=tmp_path)

    assert result.code == 1
    assert "nothing imported, 5 problem(s)" in result.err
    for path in (
        "placements[1].limit",
        "segments[0].rule.op",
        "flags[1].rollout",
        "blocks[2].placements[0].key",
        "blocks[0].variants[1].when.segment",
    ):
        assert f"  {path}: " in result.err, path
    assert await row_counts(db_url) == before
    assert await content_version(db_url) == 0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param(b'{"version": 1, "blocks": [', "not valid JSON", id="not-json"),
        pytest.param(b'{"version": 2}', "version", id="unknown-version"),
        pytest.param(b"[1, 2]", "problem(s)", id="not-an-object"),
    ],
)
async def test_a_file_that_is_no_bundle_is_refused(db_url: str, tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bundle.json"
    path.write_bytes(content)

    result = await tessera("import", path, database_url=db_url, cwd=tmp_path)

    assert result.code == 1
    assert message in result.err
    assert await content_version(db_url) == 0


async def test_import_without_anything_to_import_is_a_usage_error(db_url: str, tmp_path: Path) -> None:
    result = await tessera("import", database_url=db_url, cwd=tmp_path)

    assert result.code == 2
    assert "give a BUNDLE file, --profiles or --events" in result.err


def ndjson(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


async def test_import_ndjson_stores_good_records_and_reports_bad_ones_by_line(db_url: str, tmp_path: Path) -> None:
    profiles = ndjson(
        tmp_path / "profiles.ndjson",
        [
            '{"userId": "u-1", "traits": {"tier": "gold"}}',
            '{"userId": "u-2", "traits": {"tier": "silver"}, "consent": {"personalization": false}}',
            '{"userId": "u-3", "traits": ',  # malformed
            "",  # blank lines are skipped, but still counted
            '{"traits": {"tier": "gold"}}',  # invalid: no userId
            '{"userId": "u-4"}',
        ],
    )
    events = ndjson(
        tmp_path / "events.ndjson",
        [
            '{"id": "e-1", "type": "page_view", "userId": "u-1", "at": "2026-11-01T10:00:00Z"}',
            '{"id": "e-2", "type": "add_to_cart", "anonymousId": "a-9", "at": "2026-11-01T10:05:00Z",'
            ' "properties": {"sku": "sku-1"}}',
            '{"id": "e-3", "type": "page_view", "at": "2026-11-01T10:00:00Z"}',  # invalid: nobody
            "not json at all",  # malformed
            '{"id": "e-1", "type": "page_view", "userId": "u-1", "at": "2026-11-01T10:00:00Z"}',  # a duplicate
        ],
    )

    result = await tessera("import", "--profiles", profiles, "--events", events, database_url=db_url, cwd=tmp_path)

    assert result.code == 1
    assert f"{profiles}: wrote 3 profiles; 2 rejected" in result.out
    assert f"{events}: wrote 2 new events; 2 rejected" in result.out
    assert "profiles.ndjson:3: not JSON" in result.err
    assert "profiles.ndjson:5.userId: " in result.err
    assert "events.ndjson:3.userId: " in result.err
    assert "events.ndjson:4: not JSON" in result.err
    async with session_on(db_url) as session:
        assert await ProfileRepository(session).count() == 3
        assert await EventRepository(session).count() == 2
        assert await ProfileRepository(session).get("u-2") == ({"tier": "silver"}, {"personalization": False})
        assert await ProfileRepository(session).get("u-3") is None


async def test_import_ndjson_twice_stores_each_record_once(db_url: str, tmp_path: Path) -> None:
    events = ndjson(
        tmp_path / "events.ndjson",
        [f'{{"id": "e-{i}", "type": "page_view", "userId": "u-1", "at": "2026-11-01T10:00:00Z"}}' for i in range(5)],
    )

    first = await tessera("import", "--events", events, database_url=db_url, cwd=tmp_path)
    second = await tessera("import", "--events", events, database_url=db_url, cwd=tmp_path)

    assert (first.code, second.code) == (0, 0), first.err + second.err
    assert "wrote 5 new events; 0 rejected" in first.out
    assert "wrote 0 new events; 0 rejected" in second.out
    async with session_on(db_url) as session:
        assert await EventRepository(session).count() == 5


async def test_export_round_trips(db_url: str, tmp_path: Path, empty_sqlite_url: str) -> None:
    imported = await tessera("import", DEMO_BUNDLE, database_url=db_url, cwd=tmp_path)
    assert imported.code == 0, imported.err

    to_stdout = await tessera("export", database_url=db_url, cwd=tmp_path)
    to_file = await tessera("export", "-o", tmp_path / "exported.json", database_url=db_url, cwd=tmp_path)

    assert (to_stdout.code, to_file.code) == (0, 0), to_stdout.err + to_file.err
    exported = json.loads(to_stdout.out)
    assert json.loads((tmp_path / "exported.json").read_text()) == exported
    assert by_key(exported) == by_key(demo_bundle())
    assert "profiles" not in exported  # data is not configuration

    # Into a database of its own, and out again: the same bundle.
    migrated = await tessera("migrate", database_url=empty_sqlite_url, cwd=tmp_path)
    reimported = await tessera("import", tmp_path / "exported.json", database_url=empty_sqlite_url, cwd=tmp_path)
    again = await tessera("export", database_url=empty_sqlite_url, cwd=tmp_path)
    assert (migrated.code, reimported.code, again.code) == (0, 0, 0), migrated.err + reimported.err + again.err
    assert json.loads(again.out) == exported
