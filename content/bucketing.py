"""Bucketing for rollouts and experiments, exactly as spec/rules.md defines it (a public contract)."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal

import mmh3

BUCKETS = 10_000


def bucket(salt: str, unit: str) -> int:
    """``murmur3_x86_32(utf8(salt + "/" + unit), seed=0) mod 10000``, unsigned."""
    return int(mmh3.hash((salt + "/" + unit).encode("utf-8"), 0, signed=False)) % BUCKETS


def rollout_threshold(percentage: float | int | Decimal) -> int:
    """``round(P * 100)``, computed in decimal so that 0.29 gives 29, not 28."""
    return int((Decimal(str(percentage)) * 100).to_integral_value())


def in_rollout(salt: str, unit: str | None, percentage: float | int | Decimal) -> bool:
    """Whether ``unit`` is inside a rollout of ``percentage`` (0-100). No unit: only at 100."""
    threshold = rollout_threshold(percentage)
    if unit is None:
        return threshold >= BUCKETS
    return bucket(salt, unit) < threshold


def arm_thresholds(weights: Sequence[int]) -> list[int]:
    """The exclusive upper bucket of each arm: ``floor(10000 * (w1 + ... + wi) / total)``."""
    total = sum(weights)
    thresholds = []
    running = 0
    for weight in weights:
        running += weight
        thresholds.append(BUCKETS * running // total)
    return thresholds


def pick_arm(experiment: str, unit: str, weights: Sequence[int]) -> int:
    """Index of the arm the unit falls in (the first arm with ``bucket < threshold``)."""
    b = bucket(experiment, unit)
    for index, threshold in enumerate(arm_thresholds(weights)):
        if b < threshold:
            return index
    return len(weights) - 1  # unreachable: the last threshold is always 10000
