"""Management of a space's configuration: create, update and delete entities and blocks, publish
versions, import and export bundles. Every write validates the whole resulting configuration,
commits in one transaction (or not at all), then announces the new content version on the bus."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from content.bundle import (
    CONFIG_KINDS,
    DEFAULT_LOCALES,
    ConfigDocs,
    Entity,
    block_locale,
    check_bundle_shape,
    check_config,
    check_event,
    check_profile,
)
from content.errors import InvalidContent, Problem
from schema.ports import (
    BlockState,
    BlockVersionState,
    ConflictError,
    ExperimentReport,
    ImportReport,
    NotFoundError,
)
from server.experiments import ExperimentResults
from server.ingest import Ingestor
from server.settings import Clock
from server.store import (
    BlockRecord,
    BlockRepository,
    BlockVersion,
    ConfigRepository,
    ProfileRepository,
    SpaceRepository,
)

ENTITY_KINDS = tuple(k for k in CONFIG_KINDS if k != "blocks")
_SINGULAR = {
    "placements": "placement",
    "segments": "segment",
    "scores": "score",
    "flags": "flag",
    "experiments": "experiment",
    "blocks": "block",
}
DATA_BATCH = 1000


def _without_status(doc: Mapping[str, Any]) -> dict[str, Any]:
    """Status is state, not content: drafts and versions are stored without it."""
    return {k: v for k, v in doc.items() if k != "status"}


def _with_locale(doc: Mapping[str, Any], locale: str) -> dict[str, Any]:
    """A block's locale is part of its identity (the store keys drafts and versions by it), so a
    block saved without one is stored in the default locale of that moment, written out: a later
    change of the default locale does not move it."""
    return {**doc, "locale": locale}


def _block_state(record: BlockRecord) -> BlockState:
    return BlockState(
        key=record.key,
        locale=record.locale,
        draft=record.draft,
        published_version=record.published_version,
        latest_version=record.latest_version,
        published_at=record.published_at,
        updated_at=record.updated_at,
    )


def _version_state(version: BlockVersion) -> BlockVersionState:
    return BlockVersionState(
        key=version.key,
        locale=version.locale,
        version=version.version,
        document=version.document,
        published_at=version.published_at,
    )


class _Config:
    """The stored configuration, loaded inside a write transaction, with pending changes."""

    def __init__(
        self,
        locales: Mapping[str, Any],
        entities: dict[str, dict[str, Mapping[str, Any]]],
        blocks: dict[tuple[str, str], BlockRecord],
    ) -> None:
        self.locales: Mapping[str, Any] = locales
        self.locales_path = "locales (stored)"
        self.entities = entities  # kind -> key -> document
        self.paths: dict[tuple[str, str], str] = {}  # (kind, key) -> path of a changed entity
        self.blocks = blocks
        self.block_docs: dict[tuple[str, str], Mapping[str, Any]] = {k: r.draft for k, r in blocks.items()}
        self.block_paths: dict[tuple[str, str], str] = {}
        self.problems: list[Problem] = []  # found while putting (a key given twice in one input)

    @property
    def default_locale(self) -> str:
        return str(self.locales.get("default") or DEFAULT_LOCALES["default"])

    def put(self, kind: str, doc: Mapping[str, Any], path: str) -> None:
        key = doc.get("key") if isinstance(doc, Mapping) else None
        ident = key if isinstance(key, str) else f"#{path}"
        if (kind, ident) in self.paths:  # given twice in this input: the first would never be checked
            self.problems.append(Problem(f"{path}.key", f"duplicate key '{key}' (also at {self.paths[(kind, ident)]})"))
        self.entities[kind][ident] = doc
        self.paths[(kind, ident)] = path

    def put_block(self, doc: Mapping[str, Any], path: str) -> tuple[str, str]:
        key = doc.get("key") if isinstance(doc, Mapping) else None
        ident = (
            key if isinstance(key, str) else f"#{path}",
            block_locale(doc, self.default_locale) if isinstance(doc, Mapping) else "",
        )
        if ident in self.block_paths:  # given twice in this input: the first would never be checked
            where = f"'{ident[0]}' in locale '{ident[1]}'"
            self.problems.append(Problem(f"{path}.key", f"duplicate key {where} (also at {self.block_paths[ident]})"))
        self.block_docs[ident] = doc
        self.block_paths[ident] = path
        return ident

    def docs(self) -> ConfigDocs:
        config = ConfigDocs(locales=Entity(self.locales_path, self.locales))
        for kind in ENTITY_KINDS:
            config.of(kind).extend(
                Entity(self.paths.get((kind, key), f"{kind}['{key}']"), doc) for key, doc in self.entities[kind].items()
            )
        config.blocks.extend(
            Entity(self.block_paths.get(ident, f"blocks['{ident[0]}' in {ident[1]}]"), doc)
            for ident, doc in self.block_docs.items()
        )
        return config

    def check(self) -> None:
        problems = self.problems + check_config(self.docs())
        if problems:
            raise InvalidContent(problems)

    def check_live_versions(self) -> None:
        """Check the live versions of blocks against the (changed) configuration: they were valid
        when published, but a delete can take away what they refer to while the draft no longer
        does. Run after :meth:`check`, so that every problem is a live version's."""
        config = self.docs()
        config.blocks = [
            Entity(f"blocks['{key}' in {locale}] (live version {record.published_version})", record.published)
            for (key, locale), record in self.blocks.items()
            if record.published is not None
        ]
        problems = check_config(config)
        if problems:
            raise InvalidContent(problems)


class Admin:
    """The admin service (``schema.ports.AdminService``)."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        *,
        clock: Clock,
        announce: Callable[[int], Awaitable[None]],
        profiles_changed: Callable[[list[str]], Awaitable[None]] | None = None,
        ingest: Ingestor | None = None,
        experiments: ExperimentResults | None = None,
    ) -> None:
        """``announce(version)`` runs after a change commits: the server refreshes its own snapshot
        and tells the other instances on the bus. ``profiles_changed(user_ids)`` runs after profiles
        are written, so that every instance drops its cached copies."""
        self._sessions = sessions
        self._clock = clock
        self._announce = announce
        self._profiles_changed = profiles_changed
        self._ingest = ingest
        self._experiments = experiments

    # -- plumbing ---------------------------------------------------------------------------------

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[AsyncSession]:
        async with self._sessions() as session:
            yield session

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[tuple[AsyncSession, list[int]]]:
        """One transaction that holds the space's write lock (the version row) from its start.
        It commits, bumping the version, only when the body reported a change; otherwise (and on
        any error) everything rolls back."""
        changed: list[int] = []
        async with self._sessions() as session:
            try:
                version = await SpaceRepository(session, clock=self._clock).bump_version()
                yield session, changed
            except BaseException:
                await session.rollback()
                raise
            if not changed:
                await session.rollback()
                return
            await session.commit()
        await self._announce(version)

    async def _load(self, session: AsyncSession) -> _Config:
        repo = ConfigRepository(session, clock=self._clock)
        entities: dict[str, dict[str, Mapping[str, Any]]] = {
            kind: {d["key"]: d for d in await repo.list(kind)} for kind in ENTITY_KINDS
        }
        blocks = {(r.key, r.locale): r for r in await BlockRepository(session, clock=self._clock).list()}
        return _Config(await SpaceRepository(session, clock=self._clock).locales(), entities, blocks)

    async def _default_locale(self, session: AsyncSession) -> str:
        locales = await SpaceRepository(session, clock=self._clock).locales()
        return str(locales.get("default") or DEFAULT_LOCALES["default"])

    # -- entities -----------------------------------------------------------------------------------

    async def entities(self, kind: str) -> list[Mapping[str, Any]]:
        async with self._read() as session:
            return list(await ConfigRepository(session, clock=self._clock).list(kind))

    async def entity(self, kind: str, key: str) -> Mapping[str, Any] | None:
        async with self._read() as session:
            return await ConfigRepository(session, clock=self._clock).get(kind, key)

    async def save(self, kind: str, document: Mapping[str, Any], *, mode: str) -> Mapping[str, Any]:
        """``mode`` is create (fails if it exists), update (merges over the stored document; a
        null value removes a field) or upsert (replaces)."""
        key = document.get("key")
        what = f"{_SINGULAR[kind]} '{key}'"
        async with self._write() as (session, changed):
            config = await self._load(session)
            existing = config.entities[kind].get(key) if isinstance(key, str) else None
            if mode == "create" and existing is not None:
                raise ConflictError(what)
            if mode == "update":
                if existing is None:
                    raise NotFoundError(what)
                document = {**existing, **document}
            document = {k: v for k, v in document.items() if v is not None}
            config.put(kind, document, "input")
            config.check()
            if await ConfigRepository(session, clock=self._clock).upsert(kind, document):
                changed.append(1)
        return document

    async def delete(self, kind: str, key: str) -> bool:
        async with self._write() as (session, changed):
            config = await self._load(session)
            if key not in config.entities[kind]:
                raise NotFoundError(f"{_SINGULAR[kind]} '{key}'")
            del config.entities[kind][key]
            try:
                config.check()  # a reference from elsewhere to what is deleted is reported, at its path
                config.check_live_versions()
            except InvalidContent as exc:
                unknown = f"unknown {_SINGULAR[kind]} '{key}'"
                still = f"refers to {_SINGULAR[kind]} '{key}', which cannot be deleted while it is used"
                raise InvalidContent(
                    [Problem(p.path, still if p.message.startswith(unknown) else p.message) for p in exc.problems]
                ) from exc
            await ConfigRepository(session, clock=self._clock).delete(kind, key)
            changed.append(1)
        return True

    async def locales(self) -> Mapping[str, Any]:
        async with self._read() as session:
            return await SpaceRepository(session, clock=self._clock).locales()

    async def set_locales(self, locales: Any) -> Mapping[str, Any]:
        async with self._write() as (session, changed):
            config = await self._load(session)
            config.locales, config.locales_path = locales, "input"
            config.check()
            space = SpaceRepository(session, clock=self._clock)
            if isinstance(locales, Mapping) and await space.set_locales(dict(locales)):
                changed.append(1)
        return dict(locales)

    # -- blocks -------------------------------------------------------------------------------------

    async def blocks(self) -> list[BlockState]:
        async with self._read() as session:
            return [_block_state(r) for r in await BlockRepository(session, clock=self._clock).list()]

    async def block(self, key: str, locale: str | None) -> BlockState | None:
        async with self._read() as session:
            locale = locale or await self._default_locale(session)
            record = await BlockRepository(session, clock=self._clock).get(key, locale)
        return _block_state(record) if record else None

    async def save_block(self, document: Mapping[str, Any], *, mode: str) -> BlockState:
        """Save a block's draft (``create``, ``update`` or ``upsert``, as :meth:`save`)."""
        document = _without_status(document)
        async with self._write() as (session, changed):
            config = await self._load(session)
            ident = (str(document.get("key")), block_locale(document, config.default_locale))
            what = f"block '{ident[0]}' in locale '{ident[1]}'"
            existing = config.blocks.get(ident)
            if mode == "create" and existing is not None:
                raise ConflictError(what)
            if mode == "update":
                if existing is None:
                    raise NotFoundError(what)
                document = {**existing.draft, **document}
            document = _with_locale({k: v for k, v in document.items() if v is not None}, ident[1])
            config.put_block(document, "input")
            config.check()
            repo = BlockRepository(session, clock=self._clock)
            if await repo.save_draft(document):
                changed.append(1)
            record = await repo.get(*ident)
        assert record is not None
        return _block_state(record)

    async def delete_block(self, key: str, locale: str | None) -> bool:
        async with self._write() as (session, changed):
            locale = locale or await self._default_locale(session)
            if not await BlockRepository(session, clock=self._clock).delete(key, locale):
                raise NotFoundError(f"block '{key}' in locale '{locale}'")
            changed.append(1)
        return True

    async def publish_block(self, key: str, locale: str | None) -> BlockVersionState:
        """Publish the block's draft as a new immutable version (a draft equal to the live version
        is not published again)."""
        async with self._write() as (session, changed):
            locale = locale or await self._default_locale(session)
            repo = BlockRepository(session, clock=self._clock)
            record = await repo.get(key, locale)
            if record is None:
                raise NotFoundError(f"block '{key}' in locale '{locale}'")
            if record.published is not None and record.published == record.draft:
                number = record.published_version
                assert number is not None
            else:
                number = await repo.publish(key, locale, self._clock())
                changed.append(1)
            version = await repo.version(key, locale, number)
        assert version is not None
        return _version_state(version)

    async def unpublish_block(self, key: str, locale: str | None) -> bool:
        async with self._write() as (session, changed):
            locale = locale or await self._default_locale(session)
            repo = BlockRepository(session, clock=self._clock)
            if await repo.get(key, locale) is None:
                raise NotFoundError(f"block '{key}' in locale '{locale}'")
            if await repo.unpublish(key, locale):
                changed.append(1)
        return bool(changed)

    async def block_versions(self, key: str, locale: str | None) -> list[BlockVersionState]:
        async with self._read() as session:
            locale = locale or await self._default_locale(session)
            return [_version_state(v) for v in await BlockRepository(session, clock=self._clock).versions(key, locale)]

    # -- bundles ------------------------------------------------------------------------------------

    async def import_bundle(self, bundle: Any, *, dry_run: bool = False) -> ImportReport:
        """Upsert everything in ``bundle``. Configuration is all-or-nothing (InvalidContent lists
        every problem); profiles and events are accepted record by record (``rejected``)."""
        problems = check_bundle_shape(bundle)
        if problems:
            raise InvalidContent(problems)
        async with self._sessions() as session:
            try:
                # First: bumping the version takes the space's write lock.
                version = await SpaceRepository(session, clock=self._clock).bump_version()
                report = ImportReport(dry_run=dry_run, version=version - 1)
                config = await self._load(session)
                if "locales" in bundle:
                    config.locales, config.locales_path = bundle["locales"], "locales"
                for kind in ENTITY_KINDS:
                    for index, doc in enumerate(bundle.get(kind) or ()):
                        config.put(kind, doc, f"{kind}[{index}]")
                seen_blocks = [
                    (config.put_block(doc, f"blocks[{index}]"), doc)
                    for index, doc in enumerate(bundle.get("blocks") or ())
                ]
                config.check()
                changed = await self._apply(session, bundle, config, seen_blocks, report)
            except BaseException:
                await session.rollback()
                raise
            if dry_run or not changed:
                await session.rollback()
            else:
                await session.commit()
                report.version = version
        if changed and not dry_run:
            await self._announce(version)
        await self._import_data(bundle, report)
        return report

    async def _apply(
        self,
        session: AsyncSession,
        bundle: Mapping[str, Any],
        config: _Config,
        blocks: Sequence[tuple[tuple[str, str], Mapping[str, Any]]],
        report: ImportReport,
    ) -> bool:
        def count(bucket: dict[str, int], kind: str) -> None:
            bucket[kind] = bucket.get(kind, 0) + 1

        changed = False
        space = SpaceRepository(session, clock=self._clock)
        if "locales" in bundle and await space.set_locales(dict(bundle["locales"])):
            changed = True
        repo = ConfigRepository(session, clock=self._clock)
        for kind in ENTITY_KINDS:
            for doc in bundle.get(kind) or ():
                existed = await repo.get(kind, doc["key"]) is not None
                if await repo.upsert(kind, doc):
                    changed = True
                    count(report.updated if existed else report.created, kind)
                else:
                    count(report.unchanged, kind)
        blocks_repo = BlockRepository(session, clock=self._clock)
        for ident, doc in blocks:
            record = config.blocks.get(ident)
            content = _with_locale(_without_status(doc), ident[1])
            publish = doc.get("status") == "published"
            if publish and record is not None and record.published == content:
                count(report.unchanged, "blocks")  # live already; a pending draft is left alone
                continue
            if not publish and record is not None and record.published is None and record.draft == content:
                count(report.unchanged, "blocks")
                continue
            await blocks_repo.save_draft(content)
            if publish:
                await blocks_repo.publish(ident[0], ident[1], self._clock())
            elif record is not None and record.published is not None:
                await blocks_repo.unpublish(*ident)
            changed = True
            count(report.updated if record is not None else report.created, "blocks")
        return changed

    async def _import_data(self, bundle: Mapping[str, Any], report: ImportReport) -> None:
        for kind, importer in (("profiles", self.import_profiles), ("events", self.import_events)):
            records = list(bundle.get(kind) or ())
            for start in range(0, len(records), DATA_BATCH):
                batch = [(f"{kind}[{i}]", r) for i, r in enumerate(records[start : start + DATA_BATCH], start)]
                written, rejected = await importer(batch, dry_run=report.dry_run)
                setattr(report, kind, getattr(report, kind) + written)
                report.rejected.extend(rejected)

    async def import_profiles(
        self, records: Sequence[tuple[str, Any]], *, dry_run: bool = False
    ) -> tuple[int, list[Problem]]:
        """Upsert a batch of (path, profile) records; returns (written, problems of rejected ones)."""
        valid, rejected = [], []
        for path, record in records:
            problems = check_profile(record, path)
            if problems:
                rejected.extend(problems)
            else:
                valid.append(
                    {"userId": record["userId"], "traits": record.get("traits") or {}, "consent": record.get("consent")}
                )
        if dry_run or not valid:
            return len(valid) if dry_run else 0, rejected
        async with self._sessions() as session, session.begin():
            written = await ProfileRepository(session, clock=self._clock).upsert_many(valid)
        if self._profiles_changed is not None:
            await self._profiles_changed([p["userId"] for p in valid])
        return written, rejected

    async def import_events(
        self, records: Sequence[tuple[str, Any]], *, dry_run: bool = False
    ) -> tuple[int, list[Problem]]:
        """Store a batch of (path, event) records exactly as tracked events are stored (duplicates by
        id dropped, viewers without consent skipped); returns (new events, problems of rejected ones)."""
        rejected: list[Problem] = []
        valid = []
        for path, record in records:
            problems = check_event(record, path)
            if problems:
                rejected.extend(problems)
            else:
                valid.append((path, record))
        if dry_run or not valid:
            return len(valid) if dry_run else 0, rejected
        if self._ingest is None:
            raise RuntimeError("the admin service was built without an ingestor")
        report = await self._ingest.track(valid, strict=True)
        return report.stored, rejected + report.rejected

    async def experiment_results(self, key: str) -> ExperimentReport | None:
        if self._experiments is None:
            raise RuntimeError("the admin service was built without experiment results")
        return await self._experiments.report(key)

    async def delete_viewer_data(self, *, user_id: str | None, anonymous_id: str | None) -> Mapping[str, int]:
        """Remove a viewer everywhere: profile, events, identities, state, memberships, caches."""
        if self._ingest is None:
            raise RuntimeError("the admin service was built without an ingestor")
        removed = await self._ingest.forget(user_id=user_id or None, anonymous_id=anonymous_id or None)
        return {
            "profiles": removed.profiles,
            "events": removed.events,
            "stateEvents": removed.state_events,
            "identities": removed.identities,
        }

    async def export_bundle(self) -> dict[str, Any]:
        """Everything but profiles and events: what is live, and drafts never published."""
        async with self._read() as session:
            locales = await SpaceRepository(session, clock=self._clock).locales()
            bundle: dict[str, Any] = {"version": 1, "locales": locales}
            for kind in ENTITY_KINDS:
                bundle[kind] = list(await ConfigRepository(session, clock=self._clock).list(kind))
            bundle["blocks"] = [
                {**r.published, "status": "published"} if r.published is not None else {**r.draft, "status": "draft"}
                for r in await BlockRepository(session, clock=self._clock).list()
            ]
        return bundle
