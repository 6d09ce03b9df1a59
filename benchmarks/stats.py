"""Medians, ranges and honest ratios over interleaved benchmark rounds (shared, noisy machines).

A benchmark runs every case once per round, the cases of a round one after the other (the order rotated from round
to round), so slow phases of the machine hit every case alike. Each case then has one value per round; we report
the median and the min-max range, and a ratio between two cases is only a ranking when their ranges do not
overlap::

    >>> a, b = Spread.of([2.0, 2.2, 2.1]), Spread.of([3.0, 3.3, 2.9])
    >>> a.show(), ratio_cell(b, a)
    ('2.10 (2.00-2.20)', '1.43')
    >>> ratio_cell(Spread.of([2.1, 2.4, 2.0]), a)
    '1.00 (noise)'
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Spread:
    """One measure over rounds: median, smallest and largest value."""

    median: float
    lo: float
    hi: float
    n: int = 1

    @classmethod
    def of(cls, values: Iterable[float]) -> Spread:
        """The spread of ``values`` (at least one)."""
        data = sorted(float(v) for v in values)
        if not data:
            raise ValueError("Spread.of needs at least one value, got none")
        return cls(statistics.median(data), data[0], data[-1], len(data))

    def overlaps(self, other: Spread) -> bool:
        """Whether the two ranges overlap: the measurements do not rank the two cases."""
        return self.lo <= other.hi and other.lo <= self.hi

    def show(self, digits: int = 2) -> str:
        """``median (min-max)``, or the value alone after one round."""
        if self.n == 1:
            return f"{self.median:.{digits}f}"
        return f"{self.median:.{digits}f} ({self.lo:.{digits}f}-{self.hi:.{digits}f})"


def ratio_cell(value: Spread, ref: Spread, digits: int = 2) -> str:
    """``value / ref`` of the medians, marked ``(noise)`` when the ranges overlap (and there were rounds)."""
    if ref.median <= 0:
        return "-"
    text = f"{value.median / ref.median:.{digits}f}"
    if value is not ref and min(value.n, ref.n) > 1 and value.overlaps(ref):
        text += " (noise)"
    return text


def spread_of(runs: Sequence[dict[str, Any]], field: str) -> Spread | None:
    """The spread of ``field`` over per-round result dicts; ``None`` when a round did not measure it."""
    values = [run.get(field) for run in runs]
    if any(v is None for v in values):
        return None
    return Spread.of(values)  # type: ignore[arg-type]


def medians(runs: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """The median of every field of per-round result dicts (``None`` where any round lacks it)."""
    out: dict[str, float | None] = {}
    for field in runs[0]:
        spread = spread_of(runs, field)
        out[field] = None if spread is None else spread.median
    return out


def rotated(items: Sequence[T], round_index: int) -> list[T]:
    """``items`` starting at a different place each round, so no case always runs first or last."""
    if not items:
        return []
    shift = round_index % len(items)
    return list(items[shift:]) + list(items[:shift])
