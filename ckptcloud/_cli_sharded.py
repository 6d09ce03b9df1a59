"""The ``ckptcloud`` command's handling of sharded checkpoints (``torch.distributed.checkpoint`` folders).

A sharded checkpoint is a folder ``<prefix>/<name>/`` holding one ``*.distcp`` file per rank and ``.metadata``,
which a save writes last: the folder is a checkpoint exactly when ``.metadata`` exists (*committed*); without it
(*incomplete*) it is a save in progress, or the leftovers of one that failed or was killed. ``ls`` shows each
folder as one entry (``name/``), ``verify URL/`` checks every file's size and CRC32C, ``rm URL/`` deletes a folder
(``.metadata`` first), ``prune`` ranks committed folders with the single files, and ``cleanup`` deletes incomplete
folders older than a given age.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Any

from ckptcloud._inventory import human_size, sharded_rows
from ckptcloud.dcp.folder import delete_folder, is_committed, list_folder, verify_folder
from ckptcloud.dcp.retention import list_sharded
from ckptcloud.dcp.target import Target
from ckptcloud.errors import IntegrityError
from ckptcloud.handlers import DiskSaver
from ckptcloud.remote import RemoteSaver
from ckptcloud.retry import Retry
from ckptcloud.stores.base import Store
from ckptcloud.stores.local import LocalStore


class FolderError(Exception):
    """A sharded-folder operation failed; the command exits with ``code`` (the CLI's exit-code table)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def store_of(saver: Any) -> tuple[Store, str, Retry]:
    """``(store, key prefix ending in '/' or empty, retry)`` of a folder saver (remote, or a local ``DiskSaver``)."""
    if isinstance(saver, DiskSaver):
        base = str(Path(saver.dirname).resolve()).lstrip("/")
        return LocalStore(), f"{base}/" if base else "", Retry()
    return saver.store, f"{saver.prefix}/" if saver.prefix else "", saver.retry


def with_folders(saver: Any, rows: list[dict[str, Any]], *, with_saved_at: bool = False) -> list[dict[str, Any]]:
    """The single-file ``rows`` (marked ``files: 1``, ``committed``) and one row per sharded folder, by name."""
    for row in rows:
        row.update(files=1, status="committed", sharded=False)
    store, base, retry = store_of(saver)
    committed = list_sharded(saver) if isinstance(saver, RemoteSaver) else None  # concurrent HEADs (S3)
    folders = sharded_rows(store, base, retry, with_saved_at=with_saved_at, committed=committed)
    return sorted([*rows, *folders], key=lambda row: row["name"])


def delete(saver: Any, names: list[str]) -> None:
    """Delete the checkpoints ``names`` of ``saver``: files in batches, folders (``name/``) whole, each
    ``.metadata`` first so no reader sees a half-deleted checkpoint."""
    files, folders = [n for n in names if not n.endswith("/")], [n for n in names if n.endswith("/")]
    if files and callable(getattr(saver, "remove_many", None)):
        saver.remove_many(files)  # S3: one DeleteObjects request per 1,000 checkpoints
    else:
        for name in files:
            saver.remove(name)
    store, base, retry = store_of(saver)
    for name in folders:
        _delete_folder(store, f"{base}{name.rstrip('/')}", retry)


def _delete_folder(store: Store, prefix: str, retry: Retry) -> None:
    """:func:`~ckptcloud.dcp.folder.delete_folder`, then, in a local folder, the directories it leaves empty."""
    delete_folder(store, prefix, retry)
    if isinstance(store, LocalStore):
        _remove_empty_dirs(prefix)


def _remove_empty_dirs(prefix: str) -> None:
    """The local folder ``prefix`` and the directories under it, where empty (bottom up); others stay."""
    root = Path("/" + prefix.strip("/"))
    for path in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):  # not empty: something else is in it, and stays
            path.rmdir()
    with contextlib.suppress(OSError):
        root.rmdir()


def _target(url: str) -> Target:
    """The folder ``url`` (with or without its trailing '/') as a store, key prefix and pipeline options."""
    return Target(url.rstrip("/"), max_concurrency=8)


def is_folder(url: str) -> bool:
    """Whether ``url`` (an object URL that named no object) is a sharded checkpoint folder: one LIST under it."""
    try:
        target = _target(url)
        return any(
            info.key.rpartition("/")[2] == ".metadata" or info.key.endswith(".distcp")
            for info in list_folder(target.store, target.prefix, target.retry)
        )
    except (FileNotFoundError, ValueError):  # no such bucket, or no folder in the URL; unreachable: raised
        return False


def verify(url: str) -> None:
    """``verify URL/``: every data file of the committed checkpoint in ``url`` at its recorded size and CRC32C."""
    target = _target(url)
    shown = target.url + "/"
    if not is_committed(target.store, target.prefix, target.retry):
        left = list_folder(target.store, target.prefix, target.retry)
        why = f"it holds {len(left)} file(s) but no .metadata (a save that failed, was killed or is still running: " \
            "'ckptcloud cleanup' removes it once old enough)" if left else "nothing is stored there"  # fmt: skip
        raise FileNotFoundError(f"{shown} is not a committed sharded checkpoint: {why}")
    start = time.monotonic()
    try:
        records = verify_folder(
            target.store, target.prefix, part_size=target.part_size, max_concurrency=8, retry=target.retry
        )
    except (IntegrityError, FileNotFoundError) as err:
        raise FolderError(1, f"{err}; delete it (ckptcloud rm {shown}) or save it again") from err
    unchecked = [r.name for r in records if r.crc32c is None]
    what = "size and CRC32C" if not unchecked else f"size (no CRC32C recorded for {len(unchecked)} of them)"
    size = sum(r.size for r in records)
    elapsed = time.monotonic() - start
    print(f"{shown}: {len(records)} data file(s), {human_size(size)}, every file's {what} verified ({elapsed:.1f} s)")


def remove(url: str, confirm: Any) -> None:
    """``rm URL/``: delete the sharded checkpoint folder ``url``, committed or not, after ``confirm(question)``."""
    target = _target(url)
    shown = target.url + "/"
    infos = list_folder(target.store, target.prefix, target.retry)
    if not infos:
        raise FileNotFoundError(f"no sharded checkpoint at {shown}: nothing is stored under it")
    state = "committed" if is_committed(target.store, target.prefix, target.retry) else "incomplete"
    size = human_size(sum(i.size for i in infos))
    confirm(f"delete the {state} sharded checkpoint {shown} ({len(infos)} files, {size})")
    _delete_folder(target.store, target.prefix, target.retry)
    print(f"deleted {shown} ({len(infos)} files)")


def cleanup(saver: Any, url: str, older_than: float) -> int:
    """Delete the incomplete sharded folders under ``saver`` whose newest file or upload is at least ``older_than``
    seconds old (``.metadata`` never existed, so nothing lists or loads them), their unfinished uploads aborted:
    :func:`ckptcloud.dcp.cleanup.cleanup_uncommitted`, which touches only folders holding nothing but what a
    sharded save writes (never another run's folder of single files). Returns how many folders were deleted."""
    from ckptcloud.dcp.cleanup import cleanup_uncommitted

    store, base, retry = store_of(saver)
    removed = cleanup_uncommitted(store, base, older_than, retry=retry)
    for prefix in removed:
        if isinstance(store, LocalStore):
            _remove_empty_dirs(prefix)  # the directories it left empty
        print(f"deleted incomplete sharded checkpoint {store.url(prefix.rstrip('/'))}/")
    if removed:
        print(f"{len(removed)} incomplete sharded checkpoint(s) older than {older_than:g} s deleted under {url}")
    return len(removed)


def print_table(rows: list[dict[str, Any]]) -> None:
    """The ``ls`` table; with any sharded folder, ``files`` and ``status`` columns too."""
    fields = ["name", "step", "score", "size", "time (UTC)"]
    if any(row.get("sharded") for row in rows):
        fields += ["files", "status"]
    cells = [fields]
    for r in rows:
        line = [r["name"], *("" if r[k] is None else str(r[k]) for k in ("step", "score")), human_size(r["size"])]
        line.append(r["time"] or "")
        if len(fields) > 5:
            line += [str(r["files"]), r["status"]]
        cells.append(line)
    widths = [max(len(line[i]) for line in cells) for i in range(len(fields))]
    for line in cells:
        sys.stdout.write("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() + "\n")


def convert(src: str, dst: str, *, src_is_folder: bool, batch_mib: int) -> None:
    """``convert SRC DST``: a sharded folder into one ``torch.save`` file, or a file into a sharded folder."""
    from ckptcloud import convert as conversion

    start = time.monotonic()
    if src_is_folder:
        done = conversion.sharded_to_file(src.rstrip("/"), dst, batch_bytes=batch_mib * 1024 * 1024)
        held = human_size(done.peak_batch_bytes)
        what = f"one file ({human_size(done.size or 0)}); at most {held} of tensors held at once"
    else:
        done = conversion.file_to_sharded(src, dst)
        what = "a sharded checkpoint (committed)"
    items = f"{done.tensors} tensors, {done.others} other items"
    print(f"{src} -> {dst}: {what}, {items} ({time.monotonic() - start:.1f} s)")
