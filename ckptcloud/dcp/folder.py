"""Operations on a sharded checkpoint's folder as a whole: is it committed, its metadata, its files, delete it.

A folder is a checkpoint exactly when its ``.metadata`` exists (:func:`is_committed`): a save writes it last. A
folder without it is a save in progress, or one that failed or was killed; its files are leftovers that only
``delete_folder`` (or a later cleanup) should touch. Deleting a checkpoint removes ``.metadata`` first, so from
that moment nothing treats the folder as a checkpoint, then its other files in batches.

Example:
    >>> from ckptcloud.stores.memory import MemoryStore
    >>> store = MemoryStore()
    >>> store.put("ck/__0_ab.distcp", memoryview(b"data"), {})
    >>> is_committed(store, "ck")
    False
    >>> delete_folder(store, "ck")
    1
"""

from __future__ import annotations

import threading

from torch.distributed.checkpoint.metadata import Metadata

from ckptcloud.checksum import FAST, crc32c
from ckptcloud.contract import ObjectInfo
from ckptcloud.deleting import delete_keys
from ckptcloud.download import fetch_ranges, read_range
from ckptcloud.errors import IntegrityError
from ckptcloud.retry import Retry
from ckptcloud.stores.base import Store
from ckptcloud.streaming import Meter

from .layout import CRC_KEY, METADATA, FileRecord, files_of, load_metadata


def _key(prefix: str, name: str) -> str:
    return f"{prefix.rstrip('/')}/{name}"


def metadata_info(store: Store, prefix: str, retry: Retry | None = None) -> ObjectInfo | None:
    """The ``.metadata`` object of the folder ``prefix`` (one HEAD), or ``None`` when the folder is not committed."""
    key = _key(prefix, METADATA)
    try:
        return (retry or Retry()).call(lambda: store.head(key), f"reading {store.url(key)}")
    except FileNotFoundError:
        return None


def is_committed(store: Store, prefix: str, retry: Retry | None = None) -> bool:
    """Whether the folder ``prefix`` holds a committed sharded checkpoint (its ``.metadata`` exists)."""
    return metadata_info(store, prefix, retry) is not None


def read_metadata_bytes(store: Store, prefix: str, retry: Retry | None = None) -> tuple[bytearray, ObjectInfo]:
    """The bytes of the folder's ``.metadata`` (one HEAD, one GET pinned to the version the HEAD saw), checked
    against the CRC32C stored with it (object stores).

    Raises:
        FileNotFoundError: no ``.metadata``: the folder is not a committed checkpoint.
        IntegrityError: the bytes do not match the CRC32C recorded when it was written.
    """
    retry = retry or Retry()
    key = _key(prefix, METADATA)
    url = store.url(key)
    info = metadata_info(store, prefix, retry)
    if info is None:
        raise FileNotFoundError(
            f"no sharded checkpoint at {store.url(prefix)}: {url} does not exist (never saved, not yet committed, "
            "or a save that failed)"
        )
    body = bytearray(info.size)

    def copy(offset: int, view: memoryview) -> int:
        body[offset : offset + len(view)] = view
        return len(view)

    read_range(store, key, 0, info.size, copy, retry=retry, cancel=threading.Event(), meter=Meter(None, None),
               version=info.version)  # fmt: skip
    recorded = info.metadata.get(CRC_KEY)
    if recorded is not None and FAST and crc32c(body) != int(recorded):
        raise IntegrityError(
            f"{url} is damaged: CRC32C {crc32c(body):08x} does not match the {int(recorded):08x} recorded when it was "
            "saved; nothing was loaded"
        )
    return body, info


def read_metadata(store: Store, prefix: str, retry: Retry | None = None, *, trusted: bool = False) -> Metadata:
    """The folder's DCP ``Metadata``: :func:`read_metadata_bytes`, decoded by
    :func:`~ckptcloud.dcp.layout.load_metadata`."""
    body, _ = read_metadata_bytes(store, prefix, retry)
    return load_metadata(body, store.url(_key(prefix, METADATA)), trusted=trusted)


def verify_folder(
    store: Store,
    prefix: str,
    *,
    part_size: int = 16 * 1024 * 1024,
    max_concurrency: int = 8,
    retry: Retry | None = None,
    trusted: bool = False,
) -> list[FileRecord]:
    """Check every data file of the committed checkpoint in ``prefix`` whole: present, at the size and with the
    CRC32C its ``.metadata`` records (files written without a checksum are checked for size only). Reads each file
    once, by concurrent ranged GETs of ``part_size`` bytes (memory: about ``(max_concurrency + 1) * part_size``).
    Returns the files checked.

    Raises:
        FileNotFoundError: the folder is not committed, or a data file is missing.
        IntegrityError: a data file's size or CRC32C is not what was recorded (the message names it).
    """
    retry = retry or Retry()
    records = files_of(read_metadata(store, prefix, retry, trusted=trusted))
    sizes = {info.key: info.size for info in list_folder(store, prefix, retry)}
    for record in records.values():
        key = _key(prefix, record.name)
        url = store.url(key)
        if key not in sizes:
            raise FileNotFoundError(f"{url} is missing: the checkpoint in {store.url(prefix)} is damaged")
        if sizes[key] != record.size:
            raise IntegrityError(f"{url} is damaged: {sizes[key]} bytes where {record.size} were saved")
        if record.crc32c is None:
            continue
        ranges = [(key, start, min(start + part_size, record.size)) for start in range(0, record.size, part_size)]
        crc = 0
        for view in fetch_ranges(store, ranges, part_size=part_size, max_concurrency=max_concurrency, retry=retry):
            crc = crc32c(view, crc)
        if crc != record.crc32c:
            raise IntegrityError(
                f"{url} is damaged: CRC32C {crc:08x} does not match the {record.crc32c:08x} recorded when it was saved"
            )
    return list(records.values())


def list_folder(store: Store, prefix: str, retry: Retry | None = None) -> list[ObjectInfo]:
    """Every object in the folder ``prefix`` (and its sub-folders), ``.metadata`` included, sorted by key."""
    base = prefix.rstrip("/") + "/"
    listed = (retry or Retry()).call(lambda: store.list(base), f"listing {store.url(base)}")
    return sorted(listed, key=lambda info: info.key)


def delete_folder(store: Store, prefix: str, retry: Retry | None = None) -> int:
    """Delete a sharded checkpoint (or a failed save's leftovers) in ``prefix``: ``.metadata`` first, so nothing
    treats the folder as a checkpoint any more, then every other object in it, in batches. Returns how many
    objects besides ``.metadata`` it deleted.
    """
    retry = retry or Retry()
    marker = _key(prefix, METADATA)
    retry.call(lambda: store.delete(marker), f"deleting {store.url(marker)}")
    keys = [info.key for info in list_folder(store, prefix, retry) if info.key != marker]
    delete_keys(store, keys, retry)
    return len(keys)
