"""Experiment results: conversion per arm, uplift over the first arm (the control), a two-sided
two-proportion z-test, a 95% confidence interval of the difference, and a sample-ratio-mismatch
check (chi-square against the configured weights). Pure arithmetic on counts."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from content.rules import properties_matcher

Z_95 = 1.959963984540054  # the 97.5th percentile of the standard normal distribution
SRM_THRESHOLD = 0.001


@dataclass(frozen=True, slots=True)
class ArmCounts:
    key: str
    weight: int
    exposed: int
    converted: int


@dataclass(frozen=True, slots=True)
class ArmResult:
    key: str
    weight: int
    exposed: int
    converted: int
    rate: float | None  # converted / exposed
    uplift: float | None  # relative to the first arm: (rate - control) / control
    difference: float | None  # rate - control rate
    p_value: float | None  # two-sided, pooled two-proportion z-test against the first arm
    ci_low: float | None  # 95% interval of the difference (unpooled standard error)
    ci_high: float | None


@dataclass(frozen=True, slots=True)
class Analysis:
    arms: tuple[ArmResult, ...]
    exposed: int
    srm_chi_square: float | None
    srm_p_value: float | None

    @property
    def sample_ratio_mismatch(self) -> bool:
        """The split is not what the weights say (p < 0.001): the results cannot be trusted."""
        return self.srm_p_value is not None and self.srm_p_value < SRM_THRESHOLD


def normal_two_sided_p(z: float) -> float:
    return math.erfc(abs(z) / math.sqrt(2))


def analyse(arms: Sequence[ArmCounts]) -> Analysis:
    """Results of every arm against the first one."""
    if not arms:
        return Analysis((), 0, None, None)
    control = arms[0]
    control_rate = control.converted / control.exposed if control.exposed else None
    results = []
    for index, arm in enumerate(arms):
        rate = arm.converted / arm.exposed if arm.exposed else None
        if index == 0 or rate is None or control_rate is None:
            results.append(ArmResult(arm.key, arm.weight, arm.exposed, arm.converted, rate, *(None,) * 5))
            continue
        difference = rate - control_rate
        uplift = difference / control_rate if control_rate else None
        pooled = (arm.converted + control.converted) / (arm.exposed + control.exposed)
        se_pooled = math.sqrt(pooled * (1 - pooled) * (1 / arm.exposed + 1 / control.exposed))
        p_value = normal_two_sided_p(difference / se_pooled) if se_pooled > 0 else None
        se = math.sqrt(rate * (1 - rate) / arm.exposed + control_rate * (1 - control_rate) / control.exposed)
        results.append(
            ArmResult(
                arm.key,
                arm.weight,
                arm.exposed,
                arm.converted,
                rate,
                uplift,
                difference,
                p_value,
                difference - Z_95 * se,
                difference + Z_95 * se,
            )
        )
    total = sum(a.exposed for a in arms)
    chi_square, srm_p = sample_ratio(arms)
    return Analysis(tuple(results), total, chi_square, srm_p)


def sample_ratio(arms: Sequence[ArmCounts]) -> tuple[float | None, float | None]:
    """Pearson's chi-square of the exposures against the weights, and its p-value (k - 1 degrees)."""
    total = sum(a.exposed for a in arms)
    weights = sum(a.weight for a in arms)
    if total == 0 or len(arms) < 2 or weights <= 0:
        return None, None
    chi_square = 0.0
    for arm in arms:
        expected = total * arm.weight / weights
        chi_square += (arm.exposed - expected) ** 2 / expected
    return chi_square, chi_square_survival(chi_square, len(arms) - 1)


def chi_square_survival(x: float, degrees: int) -> float:
    """P(X >= x) for a chi-square variable: the regularised upper incomplete gamma Q(k/2, x/2)."""
    if x <= 0:
        return 1.0
    return _gamma_q(degrees / 2, x / 2)


def _gamma_q(a: float, x: float) -> float:
    # Numerical Recipes' gammq: the series for x < a + 1, the continued fraction (Lentz) otherwise.
    log_prefix = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1:
        term = total = 1.0 / a
        n = a
        for _ in range(10_000):
            n += 1
            term *= x / n
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return max(0.0, 1.0 - total * math.exp(log_prefix))
    tiny = 1e-300
    b = x + 1 - a
    c = 1 / tiny
    d = 1 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        delta = d * c
        h *= delta
        if abs(delta - 1) < 1e-15:
            break
    return math.exp(log_prefix) * h


def goals(goal: Any) -> tuple[Mapping[str, Any], ...]:
    """An experiment's goal conditions: one event condition or a list of them (bundle.md)."""
    if goal is None:
        return ()
    return tuple(goal) if isinstance(goal, list) else (goal,)


def goal_matcher(goal: Any) -> Callable[[str, Mapping[str, Any]], bool]:
    """Whether an event (type, properties) reaches the goal: it matches any goal condition's type and
    ``where``. (A conversion is such an event after the viewer's first exposure.)"""
    tests = [(g["event"], properties_matcher(g.get("where"))) for g in goals(goal)]

    def reaches(type_: str, properties: Mapping[str, Any]) -> bool:
        return any(type_ == t and (match is None or match(properties)) for t, match in tests)

    return reaches
