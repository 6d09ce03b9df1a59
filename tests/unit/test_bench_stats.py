"""Benchmark statistics: a ratio ranks two cases only when their ranges over rounds do not overlap."""

from __future__ import annotations

import pytest

from benchmarks.stats import Spread, medians, ratio_cell, rotated


def test_spread_is_median_and_range_over_rounds():
    spread = Spread.of([3.0, 1.0, 2.5])
    assert (spread.median, spread.lo, spread.hi, spread.n) == (2.5, 1.0, 3.0, 3)
    assert spread.show() == "2.50 (1.00-3.00)"
    assert Spread.of([1.234]).show() == "1.23"  # one round: no range to show


def test_ratio_is_marked_noise_only_when_ranges_overlap():
    ours, theirs = Spread.of([1.0, 1.1, 1.2]), Spread.of([1.15, 1.3, 1.4])
    assert ratio_cell(theirs, ours) == "1.18 (noise)"
    assert ratio_cell(Spread.of([1.3, 1.4, 1.5]), ours) == "1.27"
    assert ratio_cell(Spread.of([1.2]), Spread.of([1.0])) == "1.20"  # one round each: nothing to compare ranges of


def test_medians_of_per_round_fields_keep_unmeasured_fields_empty():
    runs = [{"s": 1.0, "server_cpu": None}, {"s": 3.0, "server_cpu": 2.0}, {"s": 2.0, "server_cpu": 1.0}]
    assert medians(runs) == {"s": 2.0, "server_cpu": None}


def test_each_round_starts_with_a_different_case():
    cases = ["a", "b", "c"]
    assert [rotated(cases, i)[0] for i in range(4)] == ["a", "b", "c", "a"]
    assert sorted(rotated(cases, 2)) == cases


def test_an_empty_spread_is_refused():
    with pytest.raises(ValueError, match="at least one value"):
        Spread.of([])
