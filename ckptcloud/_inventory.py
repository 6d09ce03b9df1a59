"""What a folder or prefix holds, for ``ckptcloud ls`` and ``prune``: each checkpoint's step, score and series."""

from __future__ import annotations

import math
import re
from datetime import datetime, timezone
from typing import Any
from urllib.parse import unquote

from ckptcloud._resume import parse_priority

_INT = re.compile(r"-?\d+")


def _number(text: str) -> float | None:
    """A finite number written as ``text`` (the one priority parser), else ``None``."""
    value = parse_priority(text)
    return float(value) if value is not None and math.isfinite(value) else None


def _rank(name: str, meta: dict[str, str]) -> tuple[int | None, float | None]:
    """``(step, score)`` from the exact metadata priority, else from the filename; ``None`` where unknown."""
    stem, step, score = name.removesuffix(".pt"), None, None
    base = unquote(meta.get("ckptcloud_basename", ""))
    stem = stem[len(base) :] if base and stem.startswith(base + "_") else stem
    if "=" in stem:  # ..._{step}_{score_name}={score} or ..._{score_name}={score}
        head, _, text = stem.rpartition("=")
        score, found = _number(text), re.match(r".*_(-?\d+)_", head)
        step = int(found.group(1)) if found else None
    elif len(parts := stem.split("_")) >= 2:  # ..._{step}, ..._{score} (decimal), ..._{step}_{score}
        last, prev = parts[-1], parts[-2] if len(parts) >= 3 else ""
        if _INT.fullmatch(last):
            step = None if _INT.fullmatch(prev) else int(last)  # two trailing integers: ambiguous, left blank
        elif (score := _number(last)) is not None and _INT.fullmatch(prev):
            step = int(prev)
    value = parse_priority(meta.get("ckptcloud_priority"))
    if value is not None and math.isfinite(value):  # the priority is the score when there is one, else the step
        if "ckptcloud_score_name" in meta or score is not None or not isinstance(value, int):
            score = float(value)
        else:
            step = value
    exact_step, exact_score = parse_priority(meta.get("ckptcloud_step")), _number(meta.get("ckptcloud_score", ""))
    if isinstance(exact_step, int):  # saved by ckptcloud since retention policies: the step and score themselves
        step = exact_step
    if exact_score is not None:
        score = exact_score
    return step, score


# Filenames ckptcloud and ignite write, to tell series apart when an object carries no metadata (most specific first)
_SERIES_NAMES = [
    re.compile(r"(?P<base>.+)_-?\d+_(?P<score_name>[^=]+)=[^=]*"),  # {base}_{step}_{score_name}={score}
    re.compile(r"(?P<base>.+)_(?P<score_name>[^_=]+)=[^=]*"),  # {base}_{score_name}={score}
    re.compile(r"(?P<base>.+)_-?\d+_-?\d+(?:\.\d+)?"),  # {base}_{step}_{score}
    re.compile(r"(?P<base>.+)_-?\d+(?:\.\d+)?"),  # {base}_{step} or {base}_{score}
]


def _series(name: str, meta: dict[str, str]) -> tuple[str, str]:
    """``(basename, label)`` of the series a checkpoint belongs to: its metadata, else what its filename shows.

    One ``Checkpoint`` writes one series: one ``filename_prefix`` and object name (the basename) and one score name.
    """
    base, score_name = unquote(meta.get("ckptcloud_basename", "")), unquote(meta.get("ckptcloud_score_name", ""))
    if not base:
        stem = name.removesuffix(".pt")
        match = next((m for m in (p.fullmatch(stem) for p in _SERIES_NAMES) if m), None)
        base = match["base"] if match else stem
        score_name = (match.groupdict().get("score_name") or "") if match else ""
    return base, f"{base} ({score_name})" if score_name else base


def _saved_at(meta: dict[str, str], mtime: float | None) -> float | None:
    """When a checkpoint was saved (unix seconds): the save time in its metadata, else its modification time."""
    exact = _number(meta.get("ckptcloud_time", ""))
    return exact if exact is not None else mtime


def listing_rows(saver: Any, *, with_saved_at: bool = False) -> list[dict[str, Any]]:
    """One row per checkpoint of ``saver``: name, step, score, size, time (UTC, ISO) and series (label and basename);
    with ``with_saved_at``, also ``saved_at``: the save time in unix seconds, as retention policies read it."""
    items = [(n, info.size, info.last_modified, info.metadata) for n, info in saver.describe().items()]
    rows = []
    for name, size, mtime, meta in items:
        step, score = _rank(name, meta)
        base, series = _series(name, meta)
        when = None if mtime is None else datetime.fromtimestamp(mtime, timezone.utc).isoformat(timespec="seconds")
        rows.append(
            {"name": name, "step": step, "score": score, "size": size, "time": when, "series": series, "base": base}
        )
        if with_saved_at:
            rows[-1]["saved_at"] = _saved_at(meta, mtime)
    return rows


# ------------------------------------------------------------------------------------------ sharded folders
_METADATA = ".metadata"  # ckptcloud.dcp.layout.METADATA: a folder is a checkpoint exactly when it holds this
_DATA_SUFFIX = ".distcp"


def sharded_groups(store: Any, base: str, retry: Any) -> dict[str, list[Any]]:
    """The sharded checkpoint folders directly under the key prefix ``base`` (``""`` or ending in ``/``), committed
    or not: every sub-folder holding a ``.metadata`` or a ``*.distcp`` file directly, mapped to all its objects.

    One LIST of ``base``; folders holding neither (another run's prefix, notes) are not sharded checkpoints.
    """
    listed = retry.call(lambda: store.list(base), f"listing {store.url(base)}")
    groups: dict[str, list[Any]] = {}
    for info in listed:
        folder, slash, _ = info.key[len(base) :].partition("/")
        if slash and folder:
            groups.setdefault(folder, []).append(info)

    def sharded(folder: str, infos: list[Any]) -> bool:
        start = len(base) + len(folder) + 1
        names = [info.key[start:] for info in infos if "/" not in info.key[start:]]
        return _METADATA in names or any(name.endswith(_DATA_SUFFIX) for name in names)

    return {name: infos for name, infos in sorted(groups.items()) if sharded(name, infos)}


def _marker(infos: list[Any], base: str, folder: str) -> Any | None:
    """The listed ``.metadata`` object of ``folder``, ``None`` when the folder is not committed."""
    key = f"{base}{folder}/{_METADATA}"
    return next((info for info in infos if info.key == key), None)


def sharded_rows(
    store: Any, base: str, retry: Any, *, with_saved_at: bool = False, committed: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """One row per sharded checkpoint folder under ``base``, with the fields of :func:`listing_rows` plus ``files``
    (how many objects), ``status`` (``committed`` or ``incomplete``: no ``.metadata``, a save in progress or one
    that failed) and ``sharded: True``. The name ends with ``/``; size is the sum of every file in the folder.

    Step and score come from the retention metadata of ``.metadata`` (one HEAD per committed folder where the
    listing carries no metadata), else from the folder's name. Incomplete folders get neither: nothing ranks them.
    ``committed``: the ``.metadata`` objects with their metadata, by folder name, as
    :func:`ckptcloud.dcp.retention.list_sharded` returns them (then no HEAD is sent here).
    """
    rows = []
    for folder, infos in sharded_groups(store, base, retry).items():
        marker = _marker(infos, base, folder) if committed is None else committed.get(folder)
        if marker is not None and not marker.metadata:
            try:
                marker = retry.call(lambda key=marker.key: store.head(key), f"reading {store.url(marker.key)}")
            except FileNotFoundError:  # deleted since it was listed: no longer a checkpoint
                marker = None
        meta = dict(marker.metadata) if marker is not None else {}
        step, score = _rank(folder, meta) if marker is not None else (None, None)
        base_name, series = _series(folder, meta)
        mtime = marker.last_modified if marker is not None else max((i.last_modified or 0.0 for i in infos), default=0)
        when = None if not mtime else datetime.fromtimestamp(mtime, timezone.utc).isoformat(timespec="seconds")
        rows.append(
            {
                "name": f"{folder}/",
                "step": step,
                "score": score,
                "size": sum(info.size for info in infos),
                "time": when,
                "series": series,
                "base": base_name,
                "files": len(infos),
                "status": "committed" if marker is not None else "incomplete",
                "sharded": True,
            }
        )
        if with_saved_at:
            rows[-1]["saved_at"] = _saved_at(meta, mtime or None) if marker is not None else None
    return rows


def human_size(n: float) -> str:
    """``n`` bytes as ``B``, ``KiB``, ``MiB``, ``GiB`` or ``TiB``, as the command line prints sizes.

    Example:
        >>> human_size(1536), human_size(12)
        ('1.5 KiB', '12 B')
    """
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
