"""Remove what failed or killed sharded saves left behind: uncommitted folders and their incomplete uploads.

A sharded checkpoint is a folder ``<prefix>/<name>/`` that is committed exactly when ``<folder>/.metadata`` exists
(:func:`~ckptcloud.dcp.folder.is_committed`). A save that fails cleans up after itself, but a rank that is
SIGKILLed, or a server that dies, can leave data files, a store's incomplete multipart uploads (S3), temporary part
objects (GCS) or a local store's temporary folders in a folder that will never be committed. Nothing lists, loads or
counts such a folder, but it costs storage. :func:`cleanup_uncommitted` removes it once it is old enough that no
running save can still be writing it.

Example:
    >>> from ckptcloud.stores.memory import MemoryStore
    >>> store = MemoryStore()
    >>> store.put("run/step-1/__0_ab.distcp", memoryview(b"data"), {})
    >>> store.put("run/step-1/.metadata", memoryview(b"meta"), {})
    >>> store.put("run/step-2/__0_cd.distcp", memoryview(b"half"), {})
    >>> cleanup_uncommitted(store, "run", older_than=0)
    ['run/step-2/']
    >>> sorted(info.key for info in store.list("run/"))
    ['run/step-1/.metadata', 'run/step-1/__0_ab.distcp']
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from dataclasses import dataclass, field

from ckptcloud.deleting import delete_keys
from ckptcloud.retry import Retry
from ckptcloud.stores.base import IncompleteUpload, Store
from ckptcloud.stores.local import TMP_DIR, LocalStore

from .folder import list_folder, metadata_info, read_metadata
from .layout import DATA_SUFFIX, METADATA, files_of

logger = logging.getLogger("ckptcloud")


@dataclass
class _Folder:
    """What one folder directly under the prefix holds: its objects' keys and newest timestamp, its uploads."""

    keys: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)  # objects and uploads no sharded save makes
    newest: float | None = None
    unknown_age: bool = False
    uploads: list[IncompleteUpload] = field(default_factory=list)

    def saw(self, when: float | None) -> None:
        if when is None:
            self.unknown_age = True
        elif self.newest is None or when > self.newest:
            self.newest = when


def _dcp_shaped(rest: str) -> bool:
    """Whether ``rest`` (a key relative to its folder) is something a sharded save writes: a data file, ``.metadata``,
    or a store's temporary part of an upload."""
    return rest == METADATA or ("/" not in rest and rest.endswith(DATA_SUFFIX)) or rest.startswith(f"{TMP_DIR}/")


def _base(prefix: str) -> str:
    prefix = prefix.strip("/")
    return f"{prefix}/" if prefix else ""


def _pending_uploads(store: Store, base: str) -> list[IncompleteUpload] | None:
    """Incomplete uploads anywhere under ``base`` (``Store.list_incomplete`` only reports those directly under a
    prefix, and a folder a killed rank left may hold nothing else). S3 and memory stores are asked directly; on
    other stores (``None``) the uploads of folders found by listing are found per folder (GCS's temporary parts are
    objects, so such folders are listed; Azure's uncommitted blocks expire on their own)."""
    from ckptcloud.stores.memory import MemoryStore

    if isinstance(store, MemoryStore):
        with store._lock:
            return [
                IncompleteUpload(u.key, uid, u.started) for uid, u in store.uploads.items() if u.key.startswith(base)
            ]
    if isinstance(store, LocalStore):  # each folder's uploads are in its own temporary folder
        root = store._path(base) if base else store._path("")
        folders = sorted(entry.name for entry in root.iterdir() if entry.is_dir()) if root.is_dir() else []
        return [upload for name in folders for upload in store.list_incomplete(f"{base}{name}/")]
    s3 = sys.modules.get("ckptcloud.stores.s3")  # imported wherever an S3Store exists (and only needs boto3 then)
    if s3 is not None and isinstance(store, s3.S3Store):  # the store's own listing, without its "directly under" filter
        found: list[IncompleteUpload] = []
        pages = store.metadata_client.get_paginator("list_multipart_uploads")
        with store._errors("listing incomplete uploads", base, store.metadata_client):
            args = store._args["ListMultipartUploads"]
            for page in pages.paginate(Bucket=store.bucket, Prefix=base, **args):
                for u in page.get("Uploads", []):
                    found.append(IncompleteUpload(u["Key"], (u["Key"], u["UploadId"]), u["Initiated"].timestamp()))
        return found
    return None


def _folders(store: Store, base: str, retry: Retry) -> dict[str, _Folder]:
    """Every folder directly under ``base`` that holds an object or an incomplete upload, by name."""
    folders: dict[str, _Folder] = {}
    for info in retry.call(lambda: store.list(base), f"listing {store.url(base)}"):
        rest = info.key[len(base) :]
        if "/" not in rest:
            continue  # a file directly under the prefix (a single-file checkpoint): never touched
        name, _, inside = rest.partition("/")
        folder = folders.setdefault(name, _Folder())
        folder.keys.append(info.key)
        if not _dcp_shaped(inside):
            folder.foreign.append(info.key)
        folder.saw(info.last_modified)
    every = retry.call(lambda: _pending_uploads(store, base), f"listing incomplete uploads in {store.url(base)}")
    pending = every or []
    for upload in pending:
        rest = upload.key[len(base) :]
        if "/" in rest:
            folders.setdefault(rest.split("/", 1)[0], _Folder())
    for name, folder in folders.items():  # each folder's uploads as the store itself reports them
        found = {(u.key, str(u.upload)): u for u in pending if u.key.startswith(f"{base}{name}/")}
        if every is None:  # one listing per folder, on stores that cannot list them all at once
            listed = retry.call(
                lambda name=name: store.list_incomplete(f"{base}{name}/"), f"listing {store.url(f'{base}{name}/')}"
            )
            found.update({(u.key, str(u.upload)): u for u in listed})
        folder.uploads = list(found.values())
        for upload in folder.uploads:
            folder.saw(upload.started)
            if not _dcp_shaped(upload.key[len(base) + len(name) + 1 :]):
                folder.foreign.append(upload.key)
    return folders


def _old_enough(folder: _Folder, now: float, older_than: float) -> bool:
    if older_than <= 0:
        return True
    if folder.unknown_age:  # a timestamp the store did not give: perhaps a save still running
        return False
    return folder.newest is not None and now - folder.newest >= older_than


def _abort(store: Store, uploads: list[IncompleteUpload], retry: Retry) -> None:
    for upload in uploads:
        try:
            retry.call(lambda u=upload: store.abort(u.upload), f"discarding {store.url(upload.key)}")
        except FileNotFoundError:  # already gone (completed, aborted or expired meanwhile)
            pass


def cleanup_uncommitted(
    store: Store,
    prefix: str,
    older_than: float = 3600.0,
    *,
    orphans: bool = False,
    retry: Retry | None = None,
) -> list[str]:
    """Remove uncommitted sharded-checkpoint folders directly under ``prefix`` and the uploads left in them.

    A folder ``<prefix>/<name>/`` is removed when it has no ``.metadata`` (checked by listing, and again by one HEAD
    just before deleting), holds only what sharded saves write (``*.distcp`` data files, a store's temporary
    parts, incomplete uploads of data files: a folder with anything else, such as another run's single-file
    checkpoints, is never touched), and the newest thing in it (object or incomplete upload) is at least
    ``older_than`` seconds old, so saves still running are left alone: pass more than your longest save. First its
    incomplete uploads are aborted, then its objects are deleted in batches (``delete_many``: up to 1,000 keys a
    request on S3). Committed folders and objects directly under ``prefix`` (single-file checkpoints) are never
    touched.

    With ``orphans=True``, committed folders are tidied too: data files (``*.distcp``) that their ``.metadata`` does
    not reference (what a save that lost the race for an id, and was killed before deleting its files, leaves) and
    incomplete uploads, when at least ``older_than`` seconds old. Other files in committed folders are kept.

    Args:
        store: the bucket.
        prefix: the key prefix the checkpoint folders are in (``""``: the bucket's top level).
        older_than: minimum age in seconds of a folder's newest file or upload (``0``: remove regardless of age).
        orphans: also remove unreferenced data files and incomplete uploads in committed folders.
        retry: the retry policy of every request (default ``Retry()``).

    Returns:
        What was removed, sorted: each uncommitted folder as ``"<prefix>/<name>/"``, and with ``orphans`` each
        orphaned data file's key.

    Example:
        >>> from ckptcloud.stores.memory import MemoryStore
        >>> store = MemoryStore()
        >>> store.put("run/step-3/__1_ab.distcp", memoryview(b"part"), {})
        >>> cleanup_uncommitted(store, "run")  # one hour by default: a save may still be running
        []
    """
    retry = retry or Retry()
    base = _base(prefix)
    if not base and isinstance(store, LocalStore):
        raise ValueError("Argument `prefix` should name a folder on the local file system, but given ''")
    now = time.time()
    removed: list[str] = []
    for name, folder in sorted(_folders(store, base, retry).items()):
        path = f"{base}{name}"
        committed = any(key == f"{path}/{METADATA}" for key in folder.keys)
        if folder.foreign and not committed:  # another run's folder, or other files: not a sharded checkpoint
            logger.info(
                "not removing %s: it holds %s, which no sharded save writes",
                store.url(f"{path}/"),
                folder.foreign[0],
            )
            continue
        if not committed and _old_enough(folder, now, older_than):
            if metadata_info(store, path, retry) is not None:  # committed since the listing
                continue
            _abort(store, folder.uploads, retry)
            keys = [info.key for info in list_folder(store, path, retry)]  # again: aborts may remove objects (GCS)
            if any(key == f"{path}/{METADATA}" for key in keys):
                continue
            delete_keys(store, keys, retry)
            if isinstance(store, LocalStore):  # the emptied directories too (what is not empty stays)
                for directory in (store._path(f"{path}/{TMP_DIR}"), store._path(path)):
                    with contextlib.suppress(OSError):
                        directory.rmdir()
            removed.append(f"{path}/")
            logger.info("removed the uncommitted folder %s (%d files)", store.url(f"{path}/"), len(keys))
        elif committed and orphans:
            removed.extend(_tidy_committed(store, path, folder, now, older_than, retry))
    return sorted(removed)


def _tidy_committed(store: Store, path: str, folder: _Folder, now: float, older_than: float, retry: Retry) -> list[str]:
    """Abort old uploads in the committed folder ``path`` and delete old data files its metadata does not name."""
    uploads = [
        u for u in folder.uploads if older_than <= 0 or (u.started is not None and now - u.started >= older_than)
    ]
    _abort(store, uploads, retry)
    try:
        referenced = {f"{path}/{name}" for name in files_of(read_metadata(store, path, retry))}
    except (FileNotFoundError, ValueError) as err:  # deleted meanwhile, or metadata this cannot read: keep all
        logger.warning("not tidying %s: %s", store.url(f"{path}/"), err)
        return []
    orphaned = [
        info.key
        for info in list_folder(store, path, retry)
        if info.key.endswith(DATA_SUFFIX)
        and "/" not in info.key[len(path) + 1 :]
        and info.key not in referenced
        and (older_than <= 0 or (info.last_modified is not None and now - info.last_modified >= older_than))
    ]
    delete_keys(store, orphaned, retry)
    return orphaned
