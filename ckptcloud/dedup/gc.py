"""Garbage collection of blobs: delete a blob only if no committed manifest references it and it is old.

Rule: GC (1) notes the time ``t0`` and lists ``.blobs/``, (2) then lists the checkpoints (``*.pt`` directly under the
prefix) and reads every manifest among them, (3) deletes each listed blob that no manifest references and whose
last-modified time is older than ``t0 - grace``. A manifest it cannot read or parse stops GC (nothing deleted).

Why a concurrent save loses nothing. Times are the store's clock unless said otherwise. Let ``s`` bound the saver's
clock error, ``g`` GC's, ``d`` the store's timestamp granularity (listings truncate to 1 s on S3) and ``T`` the time
one manifest commit request takes, and assume ``ε = 2s + g + d + T < grace / 4`` (default grace 6 h: 1.5 h).

* Saver: it references a blob only if the blob's birth ``b`` is less than ``3/4 * grace`` before it sends the
  manifest (:func:`ckptcloud.dedup.save.check_fresh`). ``b`` is the listed/HEAD last-modified time (at most the
  true one, ``lm``) or, for its own upload, its clock just before the request (at most ``lm + s``). So a manifest
  becomes visible at ``t_c < lm + 3/4 * grace + 2s + T``.
* GC: it deletes a blob only if its clock at ``t0`` (before it lists blobs) minus the listed time exceeds ``grace``,
  so ``lm < t0 - grace + g + d``.
* Together: ``t_c < t0 - grace / 4 + ε < t0``. The manifest was visible before GC began listing, so GC's later
  checkpoint listing (strongly consistent on S3, GCS and Azure) showed it, GC read its references and kept the
  blob: a contradiction. Blobs are never overwritten (conditional create), so the blob GC listed is the one the
  manifest references; a blob stored after ``t0`` is not in GC's listing at all. The bound on ``t_c`` exists because
  a blob older than ``grace / 2`` is never reused: a fresh copy is stored under a new name instead.

Every writer and GC of a prefix must use the same grace (or GC a larger one).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ckptcloud.contract import is_valid_name
from ckptcloud.dedup import manifest as manifests
from ckptcloud.dedup.blobs import BlobIndex, blob_folder, hash_of
from ckptcloud.deleting import delete_keys
from ckptcloud.retry import Retry
from ckptcloud.stores.base import ObjectInfo, Store


@dataclass
class GCReport:
    """What one GC found and did. ``deleted`` holds blob names (also in a dry run: what it would delete)."""

    blobs: int = 0
    manifests: int = 0
    referenced: int = 0
    young: int = 0
    deleted: list[str] = field(default_factory=list)
    deleted_bytes: int = 0
    dry_run: bool = False


def _references(store: Store, info: ObjectInfo, retry: Retry) -> set[str] | None:
    """The blob names the checkpoint ``info`` references; ``None`` if it is not a manifest (or is gone)."""
    url = store.url(info.key)
    try:
        if info.metadata.get(manifests.METADATA_KEY) != manifests.METADATA_VALUE:
            head = retry.call(lambda: b"".join(store.read(info.key, 0, manifests.SNIFF_BYTES)), f"reading {url}")
            if not manifests.is_manifest_head(head):
                return None
        body = retry.call(lambda: b"".join(store.read(info.key)), f"reading {url}")
    except FileNotFoundError:  # deleted since it was listed: it references nothing now
        return None
    return manifests.blob_names(manifests.decode_bytes(body, url))


def collect_garbage(
    store: Store,
    base: str,
    grace: float,
    *,
    retry: Retry | None = None,
    dry_run: bool = False,
    index: BlobIndex | None = None,
) -> GCReport:
    """Delete the blobs under ``base`` (``""`` or ``"prefix/"``) that the rule above allows; returns a report.

    Example:
        >>> from ckptcloud.stores.memory import MemoryStore
        >>> store = MemoryStore()
        >>> store.put("run/.blobs/ab", memoryview(b"x"), {})
        >>> collect_garbage(store, "run/", grace=3600.0).deleted  # unreferenced, but too young
        []
    """
    retry = retry or Retry()
    report = GCReport(dry_run=dry_run)
    t0 = time.time()
    folder = blob_folder(base)
    blobs = [info for info in retry.call(lambda: store.list(folder), f"listing {store.url(folder)}")]
    blobs = [info for info in blobs if "/" not in info.key[len(folder) :]]
    listed = retry.call(lambda: store.list(base), f"listing {store.url(base)}")  # strictly after the blob listing
    referenced: set[str] = set()
    for info in listed:
        name = info.key[len(base) :]
        if not (name.endswith(".pt") and "/" not in name and is_valid_name(name)):
            continue
        refs = _references(store, info, retry)
        if refs is not None:
            report.manifests += 1
            referenced |= refs
    report.blobs, doomed = len(blobs), []
    for info in blobs:
        name = info.key[len(folder) :]
        if name in referenced:
            report.referenced += 1
        elif info.last_modified is None or t0 - info.last_modified <= grace:
            report.young += 1
        else:
            doomed.append(info)
    report.deleted = [info.key[len(folder) :] for info in doomed]
    report.deleted_bytes = sum(info.size for info in doomed)
    if not dry_run and doomed:
        delete_keys(store, [info.key for info in doomed], retry)
        if index is not None:
            for name in report.deleted:
                index.forget(hash_of(name), name)
    return report
