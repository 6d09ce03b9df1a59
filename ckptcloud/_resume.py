"""Rebuilding a ``Checkpoint``'s kept list from what is stored (helpers of ``Checkpoint.resume``).

Only filenames that the checkpoint's own pattern could have produced count; priorities come from the metadata
saved with each object (exact), else from the filename (the score's 4-decimal text, or the step).
"""

from __future__ import annotations

import inspect
import logging
import math
import numbers
import operator
import re
import string
import warnings
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

from ckptcloud import distributed
from ckptcloud.contract import ObjectInfo, is_save_handler
from ckptcloud.policies import CheckpointInfo

logger = logging.getLogger("ckptcloud")

_INT = re.compile(r"[-+]?\d+")
_FLOAT = re.compile(r"[-+]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|inf|nan)", re.IGNORECASE)
_NUMPY_REPR = re.compile(r"(?:np|numpy)\.(?:float|int|uint)\d*\((.*)\)")
_FIELDS = {
    "score": r"(?P<score>-?(?:\d+(?:\.\d+)?|inf)|nan)",
    "global_step": r"(?P<global_step>-?\d+)",
}


def pattern_regex(pattern: str, known: Mapping[str, Any]) -> re.Pattern[str]:
    """A regex matching every filename ``pattern`` renders with the ``known`` fields (score and step vary).

    Raises:
        ValueError: the pattern has a field that is neither known nor ``score``/``global_step``.
    """
    parts = []
    seen: set[str] = set()
    for literal, field, spec, conversion in string.Formatter().parse(pattern):
        parts.append(re.escape(literal))
        if field is None:
            continue
        if field in _FIELDS:
            parts.append(_FIELDS[field] if field not in seen else f"(?P={field})")
            seen.add(field)
        elif field in known:
            value = format(known[field], spec or "") if not conversion else str(known[field])
            parts.append(re.escape(value))
        else:
            raise ValueError(f"cannot resume with field {{{field}}} in filename_pattern {pattern!r}")
    return re.compile("".join(parts))


def as_priority(value: Any) -> int | float:
    """A score or step as a plain ``int`` or ``float`` (NumPy and torch scalars included), the same on every rank.

    Raises:
        ValueError: not a real number.
    """
    if isinstance(value, numbers.Integral):
        return operator.index(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise ValueError(f"A checkpoint's score or step should be a real number, but given {value!r}")


def format_priority(priority: Any) -> str:
    """The one text form of a priority stored with a checkpoint: ``str(int)`` for whole numbers (steps, integer
    scores), ``repr(float)`` for the rest; NumPy and torch scalars are converted first, so ``np.float64(0.7)`` is
    stored as ``0.7``, never as its repr.

    Example:
        >>> format_priority(3), format_priority(0.7), format_priority(True)
        ('3', '0.7', '1')
    """
    return repr(as_priority(priority))


def parse_priority(text: str | None) -> int | float | None:
    """The priority in ``text`` (percent-encoded or not) written by :func:`format_priority`, else ``None``.

    The whole text must be one number: an int stays an int, anything else is a float. Texts that ckptcloud 0.1.0
    wrote for NumPy scalars (``np.float64(0.7)``) are read as the number inside them. Nothing else is guessed.

    Example:
        >>> parse_priority("3"), parse_priority("0.7"), parse_priority("np.float64%280.7%29"), parse_priority("x64")
        (3, 0.7, 0.7, None)
    """
    if text is None:
        return None
    text = unquote(text).strip()
    legacy = _NUMPY_REPR.fullmatch(text)
    if legacy:
        text = legacy.group(1)
    if _INT.fullmatch(text):
        return int(text)
    if _FLOAT.fullmatch(text):
        return float(text)
    return None


def priority_from(metadata: Mapping[str, str], match: re.Match[str]) -> int | float | None:
    """The exact priority saved in the object metadata, else the one the filename shows (its score, else step)."""
    exact = parse_priority(metadata.get("ckptcloud_priority"))
    if exact is not None:
        return exact
    groups = match.groupdict()
    if groups.get("score") is not None:
        return parse_priority(groups["score"])
    if groups.get("global_step") is not None:
        return int(groups["global_step"])
    return None


class Resume:
    """Rebuilding a :class:`~ckptcloud.Checkpoint`'s kept list from storage (it reads the checkpoint's fields)."""

    save_handler: Any
    save_on_rank: int
    n_saved: int | None
    filename_prefix: str
    filename_pattern: str | None
    score_function: Any
    score_name: str | None
    ext: str
    run_id: str
    _run_id_given: bool
    _saved: list[Any]
    _records: dict[str, CheckpointInfo]

    def resume(self) -> list[Any]:
        """Rebuild the kept list from the checkpoints stored under the save handler's folder or prefix.

        Only filenames this checkpoint's own pattern could have produced count (and, where the object carries
        ckptcloud's metadata, only those with this checkpoint's basename); anything else is never touched.
        Priorities, steps, save times and scores are the exact ones saved with each object, else what the filename
        shows (and the object's modification time). If more than ``n_saved`` match (a crash between a save and its
        eviction), or ``keep=`` does not keep some of them, those are removed, so retention converges back; the
        checkpoint the run resumes from (``last_checkpoint``) and any it loaded are kept until this run commits a
        newer one (see ``guarded``). ``Checkpoint(..., resume=True)`` calls this at construction.

        Returns:
            The kept list, lowest priority first (equal priorities in the order they were saved).

        Example:
            >>> import tempfile, torch
            >>> from ckptcloud import Checkpoint
            >>> folder = tempfile.mkdtemp()
            >>> first = Checkpoint({"model": torch.nn.Linear(2, 1)}, folder, n_saved=2)
            >>> for step in (1, 2, 3):
            ...     _ = first.save(global_step=step)
            >>> again = Checkpoint({"model": torch.nn.Linear(2, 1)}, folder, n_saved=2, resume=True)
            >>> again.state_dict()
            {'_saved': [(2, 'model_2.pt'), (3, 'model_3.pt')]}
        """
        describe = getattr(self.save_handler, "describe", None)
        if not callable(describe):
            raise TypeError(
                f"resume needs a save handler that can list what it stored (DiskSaver, S3Saver, ...), "
                f"but given {type(self.save_handler)}"
            )
        regexes = self._filename_regexes()

        def mine(name: str) -> bool:  # names this checkpoint cannot have written are never read (no HEAD) nor touched
            return any(regex.fullmatch(name) for regex in regexes)

        def listing() -> dict[str, dict[str, Any]]:
            return encode_listing(describe(select=mine) if _takes_select(describe) else describe())

        # The writing rank lists; every rank gets its listing, or raises its error.
        shared = distributed.share(self.save_on_rank, listing, "listing checkpoints")
        stored = {name: ObjectInfo(**info) for name, info in shared.items()}
        self._records = {}
        items = self._adopt_run(self._matching_items(stored, regexes), stored)
        self._records = {item.filename: self._records[item.filename] for item in items}
        self._remove_surplus(self._retain_found(items))  # type: ignore[attr-defined]
        return list(self._saved)

    def _remove_surplus(self, filenames: list[str]) -> None:
        """Delete what resume found beyond ``n_saved``: in one batch where the save handler has ``remove_many``
        (ckptcloud's remote savers), else one at a time (``DiskSaver``, ignite's savers). A failure is warned."""
        remove_many = getattr(self.save_handler, "remove_many", None)
        if len(filenames) < 2 or not callable(remove_many) or not is_save_handler(self.save_handler):
            for filename in filenames:
                self._remove(filename)  # type: ignore[attr-defined]
            return
        try:
            remove_many(filenames)
        except Exception as err:  # the kept checkpoints are safe; surplus old files are the lesser harm
            shown = ", ".join(repr(f) for f in filenames[:3]) + (" ..." if len(filenames) > 3 else "")
            message = f"could not remove {len(filenames)} surplus checkpoint(s) found on resume ({shown}): {err}"
            logger.warning("%s", message)
            warnings.warn(message, RuntimeWarning, stacklevel=4)

    def _adopt_run(self, items: list[Any], stored: Mapping[str, ObjectInfo]) -> list[Any]:
        """Continue the run that wrote ``items``: take its run id, or keep only the given ``run_id``'s checkpoints.

        Raises:
            ValueError: the checkpoints come from several runs (two jobs shared the prefix) and no ``run_id`` was
                given to pick one.
        """
        run_of = {item.filename: unquote(stored[item.filename].metadata.get("ckptcloud_run", "")) for item in items}
        if self._run_id_given:  # objects without a run id (saved before run ids existed) count as this run's
            return [item for item in items if run_of[item.filename] in ("", self.run_id)]
        runs = sorted({run for run in run_of.values() if run})
        if len(runs) > 1:
            where = self.save_handler.url("") if hasattr(self.save_handler, "url") else "this prefix"
            mine = {run: [i.filename for i in items if run_of[i.filename] == run][:3] for run in runs}
            raise ValueError(
                f"{where} holds checkpoints of {len(runs)} runs ({mine}): two jobs saved to one prefix. Pass "
                "run_id= to continue one of them (the others' checkpoints are then left alone)"
            )
        if runs:
            self.run_id = runs[0]
        return items

    def _filename_regexes(self) -> list[re.Pattern[str]]:
        """One regex per filename pattern this checkpoint can write (its prefix, name, score name and ``ext``)."""
        if self.filename_pattern:
            patterns = [self.filename_pattern]
        else:  # what _plan can produce: with or without a step; a score when ranked by one or given to save()
            by_score = self.score_function is not None
            patterns = [
                self.setup_filename_pattern(
                    len(self.filename_prefix) > 0, with_score, self.score_name is not None, step
                )
                for with_score in ((True,) if by_score else (False, True))
                for step in (True, False)
                if step or with_score
            ]
        known = {
            "filename_prefix": self.filename_prefix,
            "ext": self.ext,
            "name": self._name(),
            "score_name": self.score_name,
        }
        return [pattern_regex(pattern, known) for pattern in patterns]

    def _matching_items(self, stored: Mapping[str, ObjectInfo], regexes: list[re.Pattern[str]]) -> list[Any]:
        """The stored checkpoints this checkpoint wrote (by filename, and basename where saved), lowest first."""
        basename = self._basename()
        items = []
        for filename, info in stored.items():
            metadata = info.metadata
            match = next((m for m in (r.fullmatch(filename) for r in regexes) if m), None)
            if match is None:
                continue
            if "ckptcloud_basename" in metadata and unquote(metadata["ckptcloud_basename"]) != basename:
                continue
            priority = priority_from(metadata, match)
            if priority is None or is_non_finite(priority):
                continue
            items.append(self.Item(priority, filename))
            self._records[filename] = self._info_from_name(filename, priority, metadata, info.last_modified, match)
        return sorted(items, key=lambda item: (item.priority, *_save_order(self._records[item.filename])))

    def _info_from_name(
        self,
        filename: str,
        priority: Any,
        metadata: Mapping[str, str] | None = None,
        last_modified: float | None = None,
        match: re.Match[str] | None = None,
    ) -> CheckpointInfo:
        """What policies know of a stored checkpoint: the step, save time and score in its metadata, else what its
        filename shows, the object's modification time, and its priority (the score when it has one, else the
        step)."""
        metadata = metadata or {}
        if match is None:
            try:
                match = next((m for m in (r.fullmatch(filename) for r in self._filename_regexes()) if m), None)
            except ValueError:  # a filename_pattern with fields resume cannot read
                match = None
        groups = match.groupdict() if match is not None else {}
        step, score = parse_priority(metadata.get("ckptcloud_step")), parse_priority(metadata.get("ckptcloud_score"))
        saved_at = parse_priority(metadata.get("ckptcloud_time"))
        if "ckptcloud_score" not in metadata and (groups.get("score") is not None or self.score_function is not None):
            score = priority
        if step is None and groups.get("global_step") is not None:
            step = int(groups["global_step"])
        if step is None and score is None and isinstance(priority, int):
            step = priority  # a checkpoint without a score is ranked by its step
        time = saved_at if saved_at is not None and not is_non_finite(saved_at) else last_modified
        return CheckpointInfo(filename, step if isinstance(step, int) else None, time, score, priority)


def _save_order(info: CheckpointInfo) -> tuple[Any, ...]:
    """Equal priorities in the order they were saved (save time, then step), as an uninterrupted run has them."""
    return (info.time is not None, info.time or 0.0, info.step is not None, info.step or 0, info.name)


def _takes_select(describe: Any) -> bool:
    """Whether a save handler's ``describe`` takes ``select=`` (ckptcloud's remote savers; not every handler)."""
    try:
        parameters = inspect.signature(describe).parameters
    except (TypeError, ValueError):
        return False
    return "select" in parameters


def is_non_finite(value: Any) -> bool:
    """NaN or infinite: such a score would block (inf) or confuse (NaN) every later comparison."""
    try:
        return isinstance(value, numbers.Real) and not math.isfinite(value)
    except (TypeError, ValueError, OverflowError):
        return False


def encode_listing(stored: Mapping[str, ObjectInfo]) -> dict[str, dict[str, Any]]:
    """A save handler's listing as JSON data, to share it between ranks."""
    return {
        name: {"key": i.key, "size": i.size, "last_modified": i.last_modified, "metadata": dict(i.metadata)}
        for name, i in stored.items()
    }
