"""Composable retention policies: which committed checkpoints to keep.

A policy is pure: it takes the committed checkpoints (:class:`CheckpointInfo`: name, step, save time, score and
priority) and returns the set of names to keep; everything else may be deleted. Policies combine with ``|``: a
checkpoint is kept if any of them keeps it.

``Checkpoint(to_save, url, keep=BestN(3) | LatestN(1) | EveryNSteps(10_000))`` uses a policy in place of
``n_saved``: before a save, the policy runs on the kept checkpoints plus the new one, and the save is skipped if the
new one would not be kept; after the save is stored, whatever the policy no longer keeps is deleted.
``ckptcloud prune URL --keep-best 3 --keep-latest 1 ...`` builds the same policies.

Example:
    >>> from ckptcloud.policies import BestN, CheckpointInfo, EveryNSteps, LatestN
    >>> policy = BestN(1) | LatestN(1) | EveryNSteps(100)
    >>> policy
    BestN(1) | LatestN(1) | EveryNSteps(100)
    >>> runs = [(100, 0.5), (150, 0.9), (170, 0.4)]
    >>> saved = [CheckpointInfo(f"model_{step}.pt", step=step, time=step, score=score) for step, score in runs]
    >>> sorted(policy(saved))
    ['model_100.pt', 'model_150.pt', 'model_170.pt']
    >>> sorted((BestN(1) | LatestN(1))(saved))
    ['model_150.pt', 'model_170.pt']
"""

from __future__ import annotations

import math
import numbers
import time as _time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, ClassVar

__all__ = [
    "AnyOf",
    "BestN",
    "CheckpointInfo",
    "EveryNSeconds",
    "EveryNSteps",
    "KeepSince",
    "KeepSteps",
    "LatestN",
    "Policy",
]


def _real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class CheckpointInfo:
    """One committed checkpoint, as policies see it.

    Args:
        name: its filename.
        step: the global step it was saved at (``None`` when unknown, e.g. a score-only filename).
        time: when it was saved, in unix seconds (``None`` when unknown).
        score: its score (``None`` for checkpoints saved without one).
        priority: how ``Checkpoint`` ranks it (what ``n_saved`` compares); by default the score, else the step.

    Example:
        >>> CheckpointInfo("model_3.pt", step=3, time=1700000000.0).priority
        3
        >>> CheckpointInfo("model_3_acc=0.5000.pt", step=3, score=0.5).priority
        0.5
    """

    name: str
    step: int | None = None
    time: float | None = None
    score: float | None = None
    priority: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"CheckpointInfo `name` should be a non-empty str, but given {self.name!r}")
        if self.step is not None and (isinstance(self.step, bool) or not isinstance(self.step, numbers.Integral)):
            raise TypeError(f"CheckpointInfo `step` should be an int or None, but given {self.step!r} ({self.name})")
        for field in ("time", "score", "priority"):
            value = getattr(self, field)
            if value is not None and not _real(value):
                raise TypeError(
                    f"CheckpointInfo `{field}` should be a real number or None, but given {value!r} ({self.name})"
                )
        if self.priority is None:
            object.__setattr__(self, "priority", self.score if self.score is not None else self.step)


def _count(policy: str, argument: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{policy}: argument `{argument}` should be an integer >= 1, but given {value!r}")
    return int(value)


def _newest_first(info: CheckpointInfo) -> tuple[Any, ...]:
    """Sort key for ties: the later save time, then the higher step, then the name (so the result is deterministic)."""
    return (
        info.time is not None,
        info.time if info.time is not None else 0.0,
        info.step is not None,
        info.step if info.step is not None else 0,
        info.name,
    )


class Policy(ABC):
    """A retention policy: ``policy(checkpoints)`` returns the names of the checkpoints to keep.

    Subclasses implement :meth:`keep`; ``needs`` names the :class:`CheckpointInfo` fields they rank by (a checkpoint
    missing one of them is never kept by that policy; ``ckptcloud prune`` leaves such checkpoints alone).

    Example:
        >>> class KeepNamed(Policy):
        ...     needs = frozenset()
        ...     def keep(self, checkpoints):
        ...         return {c.name for c in checkpoints if c.name.startswith("final")}
        >>> sorted(KeepNamed()([CheckpointInfo("final.pt"), CheckpointInfo("model_1.pt", step=1)]))
        ['final.pt']
    """

    needs: ClassVar[frozenset[str]] = frozenset()

    @abstractmethod
    def keep(self, checkpoints: Sequence[CheckpointInfo]) -> set[str]:
        """The names of the checkpoints this policy keeps."""

    def __call__(self, checkpoints: Iterable[CheckpointInfo]) -> frozenset[str]:
        """Validate ``checkpoints`` (CheckpointInfo objects with distinct names) and return the names to keep."""
        items = list(checkpoints)
        seen: set[str] = set()
        for item in items:
            if not isinstance(item, CheckpointInfo):
                raise TypeError(f"{self!r}: checkpoints should be CheckpointInfo objects, but given {item!r}")
            if item.name in seen:
                raise ValueError(f"{self!r}: checkpoint names should be distinct, but {item.name!r} appears twice")
            seen.add(item.name)
        return frozenset(self.keep(items))

    def __or__(self, other: Any) -> AnyOf:
        return AnyOf(self, other)

    def __ror__(self, other: Any) -> AnyOf:
        return AnyOf(other, self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class AnyOf(Policy):
    """Keeps a checkpoint if any of its policies keeps it; ``a | b`` builds one.

    Example:
        >>> BestN(3) | LatestN(1)
        BestN(3) | LatestN(1)
        >>> AnyOf(BestN(3), LatestN(1)) == BestN(3) | LatestN(1)
        True
    """

    def __init__(self, *policies: Policy) -> None:
        flat: list[Policy] = []
        for policy in policies:
            if not isinstance(policy, Policy):
                raise TypeError(
                    "retention policies combine with `|` only with other policies (BestN, LatestN, EveryNSteps, "
                    f"EveryNSeconds, KeepSince, KeepSteps), but given {type(policy).__name__} {policy!r}"
                )
            flat.extend(policy.policies if isinstance(policy, AnyOf) else [policy])
        if not flat:
            raise ValueError("AnyOf: give at least one policy, e.g. AnyOf(BestN(3), LatestN(1))")
        self.policies: tuple[Policy, ...] = tuple(flat)

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset().union(*(policy.needs for policy in self.policies))

    def keep(self, checkpoints: Sequence[CheckpointInfo]) -> set[str]:
        return set().union(*(policy.keep(checkpoints) for policy in self.policies))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AnyOf) and self.policies == other.policies

    def __hash__(self) -> int:
        return hash(self.policies)

    def __repr__(self) -> str:
        return " | ".join(repr(policy) for policy in self.policies)


@dataclass(frozen=True, repr=False)
class BestN(Policy):
    """Keeps the ``n`` checkpoints with the highest priority: the score (or, for checkpoints saved without a score,
    the step, as ``n_saved`` ranks them). On a tie the newer checkpoint is kept.

    Example:
        >>> a = CheckpointInfo("a.pt", step=1, time=1, score=0.9)
        >>> b = CheckpointInfo("b.pt", step=2, time=2, score=0.9)
        >>> infos = [a, b]
        >>> sorted(BestN(1)(infos))
        ['b.pt']
    """

    n: int
    needs: ClassVar[frozenset[str]] = frozenset({"priority"})

    def __post_init__(self) -> None:
        _count("BestN", "n", self.n)

    def keep(self, checkpoints: Sequence[CheckpointInfo]) -> set[str]:
        ranked = sorted(
            (c for c in checkpoints if c.priority is not None),
            key=lambda c: (c.priority, *_newest_first(c)),
            reverse=True,
        )
        return {c.name for c in ranked[: self.n]}

    def __repr__(self) -> str:
        return f"BestN({self.n})"


@dataclass(frozen=True, repr=False)
class LatestN(Policy):
    """Keeps the ``n`` latest checkpoints: the highest step, then the latest save time (checkpoints without a step
    rank below those with one, and among themselves by time).

    Example:
        >>> sorted(LatestN(2)([CheckpointInfo(f"m_{s}.pt", step=s) for s in (5, 30, 10)]))
        ['m_10.pt', 'm_30.pt']
    """

    n: int
    needs: ClassVar[frozenset[str]] = frozenset({"step"})

    def __post_init__(self) -> None:
        _count("LatestN", "n", self.n)

    def keep(self, checkpoints: Sequence[CheckpointInfo]) -> set[str]:
        ranked = sorted(
            checkpoints,
            key=lambda c: (c.step is not None, c.step if c.step is not None else 0, *_newest_first(c)),
            reverse=True,
        )
        return {c.name for c in ranked[: self.n]}

    def __repr__(self) -> str:
        return f"LatestN({self.n})"


@dataclass(frozen=True, repr=False)
class EveryNSteps(Policy):
    """Keeps every checkpoint whose step is a multiple of ``k`` (``step % k == 0``).

    Example:
        >>> sorted(EveryNSteps(1000)([CheckpointInfo(f"m_{s}.pt", step=s) for s in (500, 1000, 1500, 2000)]))
        ['m_1000.pt', 'm_2000.pt']
    """

    k: int
    needs: ClassVar[frozenset[str]] = frozenset({"step"})

    def __post_init__(self) -> None:
        _count("EveryNSteps", "k", self.k)

    def keep(self, checkpoints: Sequence[CheckpointInfo]) -> set[str]:
        return {c.name for c in checkpoints if c.step is not None and c.step % self.k == 0}

    def __repr__(self) -> str:
        return f"EveryNSteps({self.k})"


def _seconds(policy: str, argument: str, value: Any, *, allow_zero: bool) -> float:
    seconds = value.total_seconds() if isinstance(value, timedelta) else value
    ok = _real(seconds) and math.isfinite(seconds) and (seconds >= 0 if allow_zero else seconds > 0)
    if not ok:
        expected = "a timedelta or a number of seconds" + (" >= 0" if allow_zero else " > 0")
        raise ValueError(f"{policy}: argument `{argument}` should be {expected}, but given {value!r}")
    return float(seconds)


@dataclass(frozen=True, repr=False)
class EveryNSeconds(Policy):
    """Keeps at most one checkpoint per ``seconds`` interval, oldest first: walking by save time, it keeps the first
    checkpoint, then each one saved at least ``seconds`` after the last one it kept. ``seconds`` may be a number or a
    ``timedelta``.

    Example:
        >>> infos = [CheckpointInfo(f"m_{t}.pt", step=t, time=t) for t in (0, 1800, 3600, 4000, 7300)]
        >>> kept = EveryNSeconds(3600)(infos)
        >>> [info.name for info in infos if info.name in kept]
        ['m_0.pt', 'm_3600.pt', 'm_7300.pt']
    """

    seconds: float
    needs: ClassVar[frozenset[str]] = frozenset({"time"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "seconds", _seconds("EveryNSeconds", "seconds", self.seconds, allow_zero=False))

    def keep(self, checkpoints: Sequence[CheckpointInfo]) -> set[str]:
        kept: set[str] = set()
        last: float | None = None
        for c in sorted((c for c in checkpoints if c.time is not None), key=lambda c: _newest_first(c)):
            assert c.time is not None
            if last is None or c.time >= last + self.seconds:
                kept.add(c.name)
                last = c.time
        return kept

    def __repr__(self) -> str:
        return f"EveryNSeconds({self.seconds:g})"


class KeepSince(Policy):
    """Keeps every checkpoint saved within ``window`` of now (``time >= now() - window``).

    Args:
        window: a ``timedelta`` (or a number of seconds), >= 0.
        now: the clock, in unix seconds (default ``time.time``); pass a fixed one in tests.

    Example:
        >>> from datetime import timedelta
        >>> policy = KeepSince(timedelta(hours=1), now=lambda: 10_000.0)
        >>> sorted(policy([CheckpointInfo("old.pt", time=5_000.0), CheckpointInfo("new.pt", time=9_000.0)]))
        ['new.pt']
    """

    needs: ClassVar[frozenset[str]] = frozenset({"time"})

    def __init__(self, window: timedelta | float, now: Callable[[], float] | None = None) -> None:
        self.seconds = _seconds("KeepSince", "window", window, allow_zero=True)
        if now is not None and not callable(now):
            raise TypeError(f"KeepSince: argument `now` should be a callable returning unix seconds, given {now!r}")
        self.now: Callable[[], float] = now if now is not None else _time.time

    def keep(self, checkpoints: Sequence[CheckpointInfo]) -> set[str]:
        cutoff = self.now() - self.seconds
        return {c.name for c in checkpoints if c.time is not None and c.time >= cutoff}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, KeepSince) and (self.seconds, self.now) == (other.seconds, other.now)

    def __hash__(self) -> int:
        return hash((self.seconds, self.now))

    def __repr__(self) -> str:
        return f"KeepSince({timedelta(seconds=self.seconds)!r})"


class KeepSteps(Policy):
    """Keeps the checkpoints saved at the given steps.

    Example:
        >>> KeepSteps({5000, 1000})
        KeepSteps({1000, 5000})
        >>> sorted(KeepSteps({1000})([CheckpointInfo("m_1000.pt", step=1000), CheckpointInfo("m_2.pt", step=2)]))
        ['m_1000.pt']
    """

    needs: ClassVar[frozenset[str]] = frozenset({"step"})

    def __init__(self, steps: Iterable[int]) -> None:
        if isinstance(steps, (str, bytes)) or not isinstance(steps, Iterable):
            raise TypeError(f"KeepSteps: argument `steps` should be a set of integers, but given {steps!r}")
        values = list(steps)
        bad = [s for s in values if isinstance(s, bool) or not isinstance(s, numbers.Integral)]
        if bad:
            raise TypeError(f"KeepSteps: argument `steps` should hold integers only, but given {bad[0]!r} in it")
        if not values:
            raise ValueError("KeepSteps: argument `steps` should name at least one step, but given an empty set")
        self.steps: frozenset[int] = frozenset(int(s) for s in values)

    def keep(self, checkpoints: Sequence[CheckpointInfo]) -> set[str]:
        return {c.name for c in checkpoints if c.step is not None and c.step in self.steps}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, KeepSteps) and self.steps == other.steps

    def __hash__(self) -> int:
        return hash(self.steps)

    def __repr__(self) -> str:
        return f"KeepSteps({{{', '.join(str(s) for s in sorted(self.steps))}}})"
