"""The generator's default workload (../shared/workload/gen_bundle.py: 2,000 blocks, 200 segments, 30
flags) imports through the admin service on PostgreSQL and on SQLite, exports back equal, and imports
again as a no-op; its profiles and events import through the CLI. Timings are printed (run with -s)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixtures_app import by_key
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from server.admin import Admin
from server.settings import system_clock
from server.store import EventRepository, ProfileRepository, SpaceRepository

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
GENERATOR = SHARED / "workload" / "gen_bundle.py"
TESSERA = Path(sys.executable).with_name("tessera")
PROFILES, EVENTS = 300, 3000  # small: the bundle is the point here


@pytest.fixture(scope="module")
def workload(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default bundle, with few profiles and events; generated once for the module."""
    if not GENERATOR.exists():
        pytest.fail(f"the workload generator is missing: expected {GENERATOR} (the shared directory next to the repo)")
    out = tmp_path_factory.mktemp("workload")
    arguments = ["--out", out, "--profiles", str(PROFILES), "--events", str(EVENTS), "--viewers", "10"]
    subprocess.run(
        [sys.executable, GENERATOR, *arguments],  # the defaults: 2,000 blocks, 200 segments, 30 flags
        check=True,
        capture_output=True,
        timeout=300,
    )
    return out


class Announcements:
    def __init__(self) -> None:
        self.versions: list[int] = []

    async def __call__(self, version: int) -> None:
        self.versions.append(version)


async def test_the_default_workload_imports_exports_equal_and_reimports_as_a_no_op(
    workload: Path, db_url: str, session_maker: async_sessionmaker[AsyncSession]
) -> None:
    backend = db_url.split(":", 1)[0]
    bundle = json.loads((workload / "bundle.json").read_text())
    assert (len(bundle["blocks"]), len(bundle["segments"]), len(bundle["flags"])) == (2000, 200, 30)
    announced = Announcements()
    admin = Admin(session_maker, clock=system_clock, announce=announced)

    started = time.perf_counter()
    report = await admin.import_bundle(bundle)
    imported_in = time.perf_counter() - started

    assert report.created == {"placements": 50, "segments": 200, "scores": 1, "flags": 30, "blocks": 2000}
    assert (report.updated, report.unchanged, report.rejected) == ({}, {}, [])
    assert announced.versions == [report.version] == [1]

    started = time.perf_counter()
    exported = await admin.export_bundle()
    exported_in = time.perf_counter() - started

    assert by_key(exported) == by_key(bundle)

    started = time.perf_counter()
    again = await admin.import_bundle(bundle)
    reimported_in = time.perf_counter() - started

    assert (again.created, again.updated) == ({}, {})
    assert again.unchanged == report.created
    assert announced.versions == [1], "a second import announced a change"
    async with session_maker() as session:
        assert await SpaceRepository(session).content_version() == 1
    assert await admin.export_bundle() == exported

    print(
        f"\n[workload/{backend}] import {imported_in:.2f} s, export {exported_in:.2f} s, "
        f"second import {reimported_in:.2f} s (2,000 blocks, 200 segments, 30 flags)"
    )


async def test_the_workload_profiles_and_events_import_through_the_cli(
    workload: Path, db_url: str, session_maker: async_sessionmaker[AsyncSession], tmp_path: Path
) -> None:
    if not TESSERA.exists():
        pytest.fail(f"the tessera console script is missing at {TESSERA}: install the project (make install)")
    backend = db_url.split(":", 1)[0]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
    env["TESSERA_DATABASE_URL"] = db_url
    profiles, events = workload / "profiles.ndjson", workload / "events.ndjson"

    started = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        TESSERA,
        "import",
        "--profiles",
        profiles,
        "--events",
        events,
        cwd=tmp_path,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 300)  # a bound on a hung process
    took = time.perf_counter() - started

    # The events of viewers whose profile withholds consent are accepted but not stored (rules.md)
    withheld_users = {
        p["userId"]
        for p in map(json.loads, profiles.read_text().splitlines())
        if p.get("consent", {}).get("personalization") is False
    }
    stored = sum(1 for e in map(json.loads, events.read_text().splitlines()) if e["userId"] not in withheld_users)
    assert withheld_users, "the workload has some viewers without consent"
    assert process.returncode == 0, err.decode()
    assert f"{profiles}: wrote {PROFILES} profiles; 0 rejected" in out.decode()
    assert f"{events}: wrote {stored} new events; 0 rejected" in out.decode()
    async with session_maker() as session:
        assert await ProfileRepository(session).count() == PROFILES
        assert await EventRepository(session).count() == stored
    print(f"\n[workload/{backend}] CLI import of {PROFILES} profiles and {EVENTS} events {took:.2f} s")
