"""Small builders of bundles and documents for the HTTP-level tests of the delivery and admin APIs,
and the few admin calls that set up a test's "given"."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mmh3

if TYPE_CHECKING:
    from fixtures_app import RunningApp

DEMO_BUNDLE_PATH = Path(__file__).parents[2] / "server" / "demo" / "bundle.json"
_DEMO_BUNDLE: dict[str, Any] = json.loads(DEMO_BUNDLE_PATH.read_text())
LOCALES = {"default": "en-US", "fallbacks": {"de-AT": "de-DE", "de-DE": "en-US"}}


def demo_bundle() -> dict[str, Any]:
    """server/demo/bundle.json, a fresh copy each call."""
    return copy.deepcopy(_DEMO_BUNDLE)


def bundle(**kinds: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return {"version": 1, "locales": LOCALES, **{kind: list(docs) for kind, docs in kinds.items()}}


def placement(key: str, **doc: Any) -> dict[str, Any]:
    return {"key": key, "name": key.title(), **doc}


def segment(key: str, rule: Mapping[str, Any], **doc: Any) -> dict[str, Any]:
    return {"key": key, "name": key.title(), "rule": rule, **doc}


def trait(path: str, op: str, value: Any) -> dict[str, Any]:
    return {"trait": path, "op": op, "value": value}


def context(field: str, op: str, value: Any) -> dict[str, Any]:
    return {"context": field, "op": op, "value": value}


def flag(key: str, **doc: Any) -> dict[str, Any]:
    """An enabled flag, on for everyone unless ``doc`` says otherwise."""
    return {"key": key, "enabled": True, **doc}


def placed(key: str, priority: int | None = None) -> dict[str, Any]:
    return {"key": key} if priority is None else {"key": key, "priority": priority}


def block(key: str, **doc: Any) -> dict[str, Any]:
    """A published en-US block of type ``hero`` whose default fields are ``{"title": key}``."""
    return {"key": key, "type": "hero", "locale": "en-US", "status": "published", "fields": {"title": key}, **doc}


def variant(key: str, **doc: Any) -> dict[str, Any]:
    """A variant whose fields are ``{"title": key}`` unless ``doc`` says otherwise."""
    return {"key": key, "fields": {"title": key}, **doc}


def experiment_variant(key: str, experiment: str, weights: Mapping[str, int], **doc: Any) -> dict[str, Any]:
    """A variant holding ``experiment``; each arm's fields are ``{"title": arm}``."""
    arms = [{"key": arm, "weight": weight, "fields": {"title": arm}} for arm, weight in weights.items()]
    return {"key": key, "experiment": experiment, "arms": arms, **doc}


def bucket(salt: str, unit: str) -> int:
    """rules.md's bucketing written out again, so that the tests do not trust content.bucketing."""
    return int(mmh3.hash(f"{salt}/{unit}".encode(), 0, signed=False)) % 10_000


def expected_arm(experiment: str, unit: str, weights: Mapping[str, int]) -> str:
    """The first arm i with bucket < floor(10000 * (w1 + ... + wi) / (w1 + ... + wn))."""
    b, total, running = bucket(experiment, unit), sum(weights.values()), 0
    for arm, weight in weights.items():
        running += weight
        if b < 10_000 * running // total:
            return arm
    raise AssertionError("the last arm's threshold is 10000")


# -- admin calls --------------------------------------------------------------------------------

IMPORT = """
mutation Import($bundle: JSON!, $dryRun: Boolean) {
  importBundle(bundle: $bundle, dryRun: $dryRun) {
    ok dryRun version created updated unchanged profiles events
    rejected { path message code }
    errors { path message code }
  }
}
"""


async def import_bundle(app: RunningApp, document: Mapping[str, Any], *, dry_run: bool = False) -> dict[str, Any]:
    """Import ``document`` through the admin API; the answer of importBundle (checked or not)."""
    reply = await app.admin(IMPORT, {"bundle": document, "dryRun": dry_run})
    assert reply.status == 200, reply.body
    assert reply.errors == [], reply.errors
    result: dict[str, Any] = reply.data["importBundle"]
    return result


async def given(app: RunningApp, document: Mapping[str, Any]) -> dict[str, Any]:
    """A space holding ``document`` (which must be valid)."""
    result = await import_bundle(app, document)
    assert result["ok"], result["errors"]
    return result


async def export_bundle(app: RunningApp) -> dict[str, Any]:
    reply = await app.admin("{ exportBundle }")
    assert reply.status == 200, reply.body
    assert reply.errors == [], reply.body
    exported: dict[str, Any] = reply.data["exportBundle"]
    return exported


async def mutate(app: RunningApp, mutation: str, variables: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Run one admin mutation that returns a payload; the payload (ok, result, errors)."""
    reply = await app.admin(mutation, variables)
    assert reply.status == 200, reply.body
    assert reply.errors == [], reply.body
    (payload,) = reply.data.values()
    assert isinstance(payload, dict)
    return payload
