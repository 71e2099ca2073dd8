"""Experiment statistics on a fixed table, worked by hand (issue 4)."""

from __future__ import annotations

import math

import pytest

from content.experiments import ArmCounts, analyse, chi_square_survival, sample_ratio


def test_results_agree_with_a_hand_computed_z_test() -> None:
    # Given control 1000 exposed / 100 converted and treatment 1000 / 130
    result = analyse([ArmCounts("control", 50, 1000, 100), ArmCounts("bold", 50, 1000, 130)])
    control, bold = result.arms

    # Then, by hand: rates 0.10 and 0.13; difference 0.03; uplift 30%
    assert (control.rate, bold.rate) == (0.1, 0.13)
    assert bold.difference == pytest.approx(0.03)
    assert bold.uplift == pytest.approx(0.30)
    # pooled p = 230/2000 = 0.115; se = sqrt(0.115 * 0.885 * (2/1000)) = 0.0142671...
    # z = 0.03 / 0.0142671 = 2.10274; two-sided p = erfc(2.10274 / sqrt 2) = 0.035489...
    assert bold.p_value == pytest.approx(0.035489, abs=2e-6)
    # unpooled se = sqrt(0.1*0.9/1000 + 0.13*0.87/1000) = sqrt(0.0002031) = 0.0142513...
    # 95% interval: 0.03 -/+ 1.959964 * 0.0142513 = [0.0020681, 0.0579319]
    assert bold.ci_low == pytest.approx(0.0020681, abs=1e-6)
    assert bold.ci_high == pytest.approx(0.0579319, abs=1e-6)
    # the control has nothing to be compared with
    assert (control.uplift, control.p_value, control.ci_low) == (None, None, None)
    # 1000 / 1000 against 50 / 50: no mismatch
    assert result.srm_chi_square == 0.0
    assert result.srm_p_value == 1.0
    assert not result.sample_ratio_mismatch


def test_a_sample_ratio_mismatch_is_detected() -> None:
    # Given a 50/50 experiment that exposed 1000 and 1150 viewers
    chi_square, p_value = sample_ratio([ArmCounts("a", 1, 1000, 0), ArmCounts("b", 1, 1150, 0)])

    # Then chi-square = 2 * 75^2 / 1075 = 10.4651...; with one degree p = erfc(sqrt(10.4651 / 2)) = 0.001217
    assert chi_square == pytest.approx(10.465116, abs=1e-6)
    assert p_value == pytest.approx(math.erfc(math.sqrt(chi_square / 2)))
    # just above the 0.001 threshold; 1000 vs 1160 is below it
    assert not analyse([ArmCounts("a", 1, 1000, 0), ArmCounts("b", 1, 1150, 0)]).sample_ratio_mismatch
    assert analyse([ArmCounts("a", 1, 1000, 0), ArmCounts("b", 1, 1160, 0)]).sample_ratio_mismatch


def test_uneven_weights_are_the_expectation() -> None:
    # 1:3 weights, 250 and 750 exposed: exactly as configured
    chi_square, p_value = sample_ratio([ArmCounts("a", 1, 250, 0), ArmCounts("b", 3, 750, 0)])
    assert (chi_square, p_value) == (0.0, 1.0)


@pytest.mark.parametrize(
    ("x", "degrees", "expected"),
    [
        (3.841459, 1, 0.05),  # the textbook critical values
        (5.991465, 2, 0.05),
        (7.814728, 3, 0.05),
        (13.815511, 2, 0.001),
        (16.266236, 3, 0.001),
        (0.0, 4, 1.0),
    ],
)
def test_chi_square_survival_matches_the_tables(x: float, degrees: int, expected: float) -> None:
    assert chi_square_survival(x, degrees) == pytest.approx(expected, rel=1e-5)


def test_no_exposures_give_no_rates() -> None:
    result = analyse([ArmCounts("a", 1, 0, 0), ArmCounts("b", 1, 0, 0)])
    assert [a.rate for a in result.arms] == [None, None]
    assert result.srm_p_value is None
