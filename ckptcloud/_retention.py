"""What a ``Checkpoint`` keeps (a mixin of ``Checkpoint``): ignite's ``n_saved`` rule or a ``keep=`` policy, the
step/time/score record of every kept checkpoint that policies read, and the resume guard.

**The gate.** With ``keep=``, the policy runs on the kept checkpoints plus the candidate before anything is
uploaded; if it would not keep the candidate, the save is skipped. Otherwise the names it no longer keeps are
evicted once the new checkpoint is committed (write, then evict). The writing rank decides both, in its plan, so
every rank removes the same names.

**The resume guard.** The checkpoint a run resumed from (``last_checkpoint`` after ``resume()``) and any checkpoint
this instance loaded through ``load_objects`` are never deleted until this run commits a newer checkpoint, whatever
``n_saved`` or the policy says. Until then a guarded checkpoint that retention would
drop is *held*: stored, not in the kept list, and removed after the next commit.
"""

from __future__ import annotations

import functools
import numbers
import operator
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from ckptcloud._tree import tree_leaves
from ckptcloud.policies import CheckpointInfo, Policy

_RECORD = ("step", "time", "score")  # what a state dict and a plan carry for policies, besides the priority


class _DefaultNSaved(int):
    """ignite's default ``n_saved=1``, as a distinct object: an explicit ``n_saved=1`` cannot go with ``keep=``."""

    __slots__ = ()


DEFAULT_N_SAVED: int = _DefaultNSaved(1)
"""The default of ``Checkpoint(n_saved=...)``: equal to 1 and shown as 1, but ``n_saved is DEFAULT_N_SAVED`` tells
it from an explicit ``n_saved=1``. Subclasses that forward ``n_saved`` should default to it too."""


def check_keep(keep: Any, n_saved: Any) -> None:
    """Validate ``keep=`` against ``n_saved``: a policy, and never both.

    Raises:
        TypeError: ``keep`` is not a policy.
        ValueError: ``n_saved`` was passed as well.
    """
    if keep is None:
        return
    if not isinstance(keep, Policy):
        raise TypeError(
            "Argument `keep` should be a retention policy from ckptcloud.policies (e.g. BestN(3) | LatestN(1)), "
            f"but given {type(keep).__name__} {keep!r}"
        )
    if n_saved is not DEFAULT_N_SAVED:
        raise ValueError(
            f"Pass either `n_saved` or `keep`, not both: keep={keep!r} replaces n_saved (given n_saved={n_saved!r}). "
            "For ignite's n_saved=N with a policy, use keep=BestN(N)"
        )


def save_time() -> float:
    """The save time recorded for a new checkpoint (unix seconds; tests replace this clock)."""
    return time.time()


def step_of(global_step: Any) -> int | None:
    """The step a policy sees: an integral ``global_step`` as an ``int``, else ``None``."""
    if isinstance(global_step, numbers.Integral) and not isinstance(global_step, bool):
        return operator.index(global_step)
    return None


class Retention:
    """Retention state of a :class:`~ckptcloud.Checkpoint`: the kept list, the records policies read, the guard."""

    save_handler: Any
    score_function: Any
    greater_or_equal: bool
    n_saved: int | None
    keep: Policy | None
    _saved: list[Any]
    Item: Any

    def _init_retention(self, n_saved: int | None, keep: Policy | None) -> None:
        self.keep = keep
        self.n_saved = None if keep is not None else (int(n_saved) if n_saved is DEFAULT_N_SAVED else n_saved)
        self._saved = []
        self._records: dict[str, CheckpointInfo] = {}  # step, time and score of each kept (and held) filename
        self._held: dict[str, CheckpointInfo] = {}  # guarded checkpoints retention dropped: removed at the next commit
        self._guard: dict[str, int] = {}  # filename -> number of plans made when it was guarded
        self._plans = 0

    # ------------------------------------------------------------------------------------------- records
    def _info(self, filename: str, priority: Any) -> CheckpointInfo:
        """What policies know of a kept checkpoint; for one without a record (an ignite state dict), what its
        filename and priority show (no save time)."""
        known = self._records.get(filename)
        if known is not None:
            return known
        info = self._info_from_name(filename, priority)  # type: ignore[attr-defined]
        self._records[filename] = info
        return info

    def _kept_infos(self, without: str | None = None) -> list[CheckpointInfo]:
        infos = {item.filename: self._info(item.filename, item.priority) for item in self._saved}
        infos.pop(without, None)  # type: ignore[arg-type]
        return list(infos.values())

    # ----------------------------------------------------------------------------------------- the gate
    def _check_lt_n_saved(self) -> bool:
        return self.n_saved is None or len(self._saved) < self.n_saved

    def _compare_fn(self, new: Any) -> bool:
        if self.greater_or_equal:
            return bool(new >= self._saved[0].priority)
        return bool(new > self._saved[0].priority)

    def _passes_n_saved(self, priority: Any) -> bool:
        """ignite's gate (``n_saved`` only; with ``keep=`` the policy decides in :meth:`_evictions`)."""
        return self.keep is not None or self._check_lt_n_saved() or self._compare_fn(priority)

    def _evictions(self, candidate: CheckpointInfo) -> list[str] | None:
        """The kept filenames that saving ``candidate`` evicts, or ``None`` if retention would not keep it."""
        if self.keep is None:
            if any(item.filename == candidate.name for item in self._saved) or self._check_lt_n_saved():
                return []  # a same-named file is overwritten in place, never deleted
            return [self._saved[0].filename]
        others = self._kept_infos(without=candidate.name)
        keep = self.keep([*others, candidate])
        if candidate.name not in keep:
            return None
        return [info.name for info in others if info.name not in keep]

    def _completed(self, plan: Mapping[str, Any]) -> dict[str, Any]:
        """``plan`` with every field; one without ``evict`` gets this rank's own (``n_saved``'s rule is the same on
        every rank)."""
        full = {"step": None, "time": None, "score": None, **plan}
        if "evict" not in full:
            full["evict"] = self._evictions(CheckpointInfo(plan["filename"], priority=plan["priority"])) or []
        return full

    def _kept_after(self, plan: Mapping[str, Any]) -> list[Any]:
        """The kept list once ``plan``'s checkpoint is committed and its evictions are done (sorted, stable)."""
        gone = {plan["filename"], *plan["evict"]}
        kept = [item for item in self._saved if item.filename not in gone]
        kept.append(self.Item(plan["priority"], plan["filename"]))
        return sorted(kept, key=lambda item: item.priority)

    def _state_after(self, plan: Mapping[str, Any]) -> dict[str, Any]:
        """:meth:`state_dict` as it will be once ``plan``'s checkpoint is committed (``include_self``'s payload)."""
        state: dict[str, Any] = {"_saved": [(p, f) for p, f in self._kept_after(plan)]}
        if self.keep is not None:
            new = {key: plan[key] for key in _RECORD}
            state["_records"] = {f: new if f == plan["filename"] else self._record(f, p) for p, f in state["_saved"]}
        return state

    def _record(self, filename: str, priority: Any) -> dict[str, Any]:
        info = self._info(filename, priority)
        return {key: getattr(info, key) for key in _RECORD}

    def _commit(self, plan: Mapping[str, Any], seq: int) -> list[str]:
        """Bookkeeping once plan ``seq``'s checkpoint is stored; returns the filenames to remove now.

        A newer checkpoint is committed, so guards set before this plan are lifted and held checkpoints go. Names
        guarded after the plan was made (a load while an async save was in flight) are held instead of removed.
        """
        filename = plan["filename"]
        late = {name for name, when in self._guard.items() if when >= seq}
        self._saved = self._kept_after(plan)
        self._records[filename] = CheckpointInfo(filename, plan["step"], plan["time"], plan["score"], plan["priority"])
        self._held.pop(filename, None)
        remove = []
        for name in [*plan["evict"], *self._held]:
            if name == filename or name in remove:
                continue
            if name in late:
                self._held[name] = self._records.get(name) or CheckpointInfo(name)
                continue
            remove.append(name)
            self._held.pop(name, None)
            self._records.pop(name, None)
        self._guard = {name: when for name, when in self._guard.items() if when >= seq}
        return remove

    # -------------------------------------------------------------------------------------- the guard
    def _guard_names(self, names: Any) -> None:
        for name in names:
            if name is not None:
                self._guard[name] = self._plans

    @property
    def guarded(self) -> frozenset[str]:
        """Filenames the resume guard keeps until this run commits a newer checkpoint: the checkpoint the run
        resumed from (``last_checkpoint`` after ``resume()``) and those this instance loaded through
        ``load_objects`` (or ``reload_objects``)."""
        return frozenset(self._guard)

    def _retain_found(self, items: list[Any]) -> list[str]:
        """After ``resume()`` found ``items`` (lowest priority first): set the kept list, guard the checkpoint the
        run resumes from, hold what retention drops but the guard keeps; returns the filenames to remove."""
        if self.keep is None:
            extra = max(len(items) - self.n_saved, 0) if self.n_saved is not None else 0
            kept, dropped = items[extra:], items[:extra]
        else:
            names = self.keep([self._info(item.filename, item.priority) for item in items])
            kept = [item for item in items if item.filename in names]
            dropped = [item for item in items if item.filename not in names]
        self._guard_names([kept[-1].filename] if kept else [])  # last_checkpoint: what the run resumes from
        self._saved = kept
        held = [item for item in dropped if item.filename in self._guard]
        self._held = {item.filename: self._info(item.filename, item.priority) for item in held}
        surplus = [item.filename for item in dropped if item.filename not in self._guard]
        for name in surplus:
            self._records.pop(name, None)
        return surplus

    def _own_filename(self, checkpoint: Any) -> str | None:
        """The filename under this checkpoint's save handler that ``checkpoint`` (a path or URL) names, if any."""
        handler = self.save_handler
        if isinstance(checkpoint, str) and checkpoint.startswith("file://"):
            checkpoint = Path(unquote(urlparse(checkpoint).path))
        if isinstance(checkpoint, str) and "://" in checkpoint:
            url = getattr(handler, "url", None)
            try:
                base = url("") if callable(url) else None
                name = checkpoint[len(base) :] if base and checkpoint.startswith(base) else None
                return name if name and url(name) == checkpoint else None
            except (ValueError, TypeError):
                return None
        if not isinstance(checkpoint, (str, Path)):
            return None
        dirname = getattr(handler, "dirname", None)
        if isinstance(dirname, Path):
            try:
                return Path(checkpoint).resolve().relative_to(dirname.resolve()).as_posix()
            except (ValueError, OSError):
                return None
        name = str(checkpoint)
        known = {item.filename for item in self._saved} | set(self._held)
        return name if name in known else None

    def _load_source(self, checkpoint: Any, options: dict[str, Any]) -> Any:
        """What to load for ``checkpoint``: a bare filename this checkpoint keeps or holds (``last_checkpoint`` of a
        remote saver) is loaded through the save handler; anything else is passed on unchanged."""
        load = getattr(self.save_handler, "load", None)
        folder = isinstance(getattr(self.save_handler, "dirname", None), Path)
        if not isinstance(checkpoint, str) or "://" in checkpoint or folder or not callable(load):
            return checkpoint
        if checkpoint not in {item.filename for item in self._saved} | set(self._held):
            return checkpoint
        names = ("map_location", "weights_only")
        return load(checkpoint, mmap=False, **{key: options.pop(key) for key in names if key in options})

    # ------------------------------------------------------------------------------------ state and helpers
    @property
    def last_checkpoint(self) -> str | Path | None:
        """The highest-priority kept filename (a ``Path`` for a ``DiskSaver``), ``None`` when nothing is kept."""
        if not self._saved:
            return None
        filename = self._saved[-1].filename
        dirname = getattr(self.save_handler, "dirname", None)
        if isinstance(dirname, Path):  # ckptcloud's or ignite's DiskSaver
            return dirname / filename
        return filename

    def state_dict(self) -> dict[str, Any]:
        """The kept list as ignite writes it, ``{"_saved": [(priority, filename), ...]}``, lowest priority first.

        With ``keep=``, also ``"_records": {filename: {"step", "time", "score"}}``, which policies need after a
        ``load_state_dict`` (ignite ignores the extra key).
        """
        state: dict[str, Any] = {"_saved": [(p, f) for p, f in self._saved]}
        if self.keep is not None:
            state["_records"] = {f: self._record(f, p) for p, f in state["_saved"]}
        return state

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Replace the kept list with the one in ``state_dict`` (sorted by priority).

        ignite's format (``_saved`` only) loads; ``_records``, where present, restores each checkpoint's step, save
        time and score, else they are read from the filename (no save time).
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"Argument state_dict should be a dictionary, but given {type(state_dict)}")
        if "_saved" not in state_dict:
            raise ValueError(
                f"Required state attribute '_saved' is absent in provided state_dict '{list(state_dict.keys())}'"
            )
        records = state_dict.get("_records", {})
        if not isinstance(records, Mapping):
            raise ValueError(f"state_dict['_records'] should be a mapping of filename to record, given {records!r}")
        items = sorted((self.Item(p, f) for p, f in state_dict["_saved"]), key=lambda item: item.priority)
        self._saved, self._records = items, {}
        for item in items:
            known = records.get(item.filename)
            if isinstance(known, Mapping):
                fields = {key: known.get(key) for key in _RECORD}
                self._records[item.filename] = CheckpointInfo(item.filename, priority=item.priority, **fields)
        for item in items:
            self._held.pop(item.filename, None)

    def reset(self) -> None:
        """Forget the kept list (and what the resume guard holds); stored checkpoints are not deleted."""
        self._saved, self._records, self._held, self._guard = [], {}, {}, {}


def _guard_in_tree(to_load: Any, checkpoint: Any) -> None:
    """Guard ``checkpoint`` on every Checkpoint among ``to_load``'s objects (ignite's include_self resume)."""
    for leaf in tree_leaves(to_load):
        if isinstance(leaf, Retention):
            leaf._guard_names([leaf._own_filename(checkpoint)])


class guarded_load:
    """``load_objects`` as ignite has it, a staticmethod on the class, that also feeds the resume guard.

    ``Checkpoint.load_objects(to_load, checkpoint)`` works as ignite's. Called on an instance,
    ``ckpt.load_objects(to_load, checkpoint)`` also guards the loaded checkpoint against deletion until ``ckpt``
    commits a newer one, and a bare filename that ``ckpt`` keeps (``ckpt.last_checkpoint`` of a remote saver) is
    loaded through ``ckpt``'s save handler. Either way, a ``Checkpoint`` among ``to_load``'s objects (ignite's
    ``include_self`` resume) guards the file it was loaded from.

    Example:
        >>> class Demo:
        ...     @guarded_load
        ...     def load_objects(to_load, checkpoint):
        ...         return None
        >>> Demo.load_objects({}, {})
    """

    def __init__(self, fn: Callable[..., None]) -> None:
        self._fn = fn
        functools.update_wrapper(self, fn)

    def __get__(self, instance: Any, owner: type | None = None) -> Callable[..., None]:
        fn = self._fn

        if instance is None:

            @functools.wraps(fn)
            def load_objects(to_load: Mapping, checkpoint: Any, **kwargs: Any) -> None:
                fn(to_load, checkpoint, **kwargs)
                _guard_in_tree(to_load, checkpoint)

            return load_objects

        @functools.wraps(fn)
        def load_objects_here(to_load: Mapping, checkpoint: Any, **kwargs: Any) -> None:
            source = instance._load_source(checkpoint, kwargs)
            fn(to_load, source, **kwargs)
            instance._guard_names([instance._own_filename(checkpoint)])
            _guard_in_tree(to_load, checkpoint)

        return load_objects_here
