"""Frontier interpolation in log L0, matched L0 and power-law fits (common/evals/frontier.py)."""

import math

import pytest

from common.evals.frontier import interpolate_log_l0, matched_l0, power_law_fit


def test_interpolation_is_linear_in_log_l0() -> None:
    # y = log10(L0) is a straight line in log L0, so interpolation is exact anywhere inside.
    l0 = [100.0, 1.0, 10.0]  # unsorted on purpose
    y = [2.0, 0.0, 1.0]
    assert interpolate_log_l0(l0, y, 10.0) == pytest.approx(1.0)
    assert interpolate_log_l0(l0, y, math.sqrt(10.0)) == pytest.approx(0.5)
    assert interpolate_log_l0(l0, y, 50.0) == pytest.approx(math.log10(50.0))


def test_interpolation_differs_from_linear_in_l0() -> None:
    # Between L0 = 1 and 100, at L0 = 10: log-midpoint gives the average, linear L0 would not.
    assert interpolate_log_l0([1.0, 100.0], [1.0, 0.0], 10.0) == pytest.approx(0.5)


def test_no_extrapolation() -> None:
    with pytest.raises(ValueError, match="outside"):
        interpolate_log_l0([2.0, 8.0], [1.0, 0.5], 16.0)
    with pytest.raises(ValueError, match="positive"):
        interpolate_log_l0([0.0, 8.0], [1.0, 0.5], 4.0)


def test_matched_l0_is_geometric_midpoint_of_overlap() -> None:
    frontiers = {"a": [2.0, 10.0, 60.0], "b": [5.0, 40.0, 300.0]}
    assert matched_l0(frontiers) == pytest.approx(math.sqrt(5.0 * 60.0))
    with pytest.raises(ValueError, match="overlap"):
        matched_l0({"a": [1.0, 2.0], "b": [3.0, 4.0]})


def test_power_law_fit_recovers_exponent() -> None:
    n = [576, 1152, 2304, 4608]
    y = [3.0 * v**-0.25 for v in n]
    a, b = power_law_fit(n, y)
    assert a == pytest.approx(3.0, rel=1e-9)
    assert b == pytest.approx(-0.25, abs=1e-12)
    with pytest.raises(ValueError):
        power_law_fit([576, 576], [0.1, 0.2])
