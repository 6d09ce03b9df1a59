"""One deduplicated save: blobs first (only the ones not stored yet), the manifest last, committed atomically."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ckptcloud import serialization
from ckptcloud.dedup import manifest
from ckptcloud.dedup.blobs import COMMIT_FRACTION, BlobIndex, blob_folder
from ckptcloud.dedup.writer import BlobWriter
from ckptcloud.errors import RemoteSaveError
from ckptcloud.streaming import Meter, PartWriter


@dataclass(frozen=True)
class SaveStats:
    """What one deduplicated save sent: blob bytes uploaded, blob bytes reused, the manifest's size."""

    uploaded_bytes: int
    reused_bytes: int
    manifest_bytes: int


def tensor_names(obj: Any, path: str = "") -> dict[int, str]:
    """The address of each CPU tensor storage in ``obj`` (dicts, lists, tuples) -> the first tensor's path."""
    names: dict[int, str] = {}

    def walk(node: Any, where: str) -> None:
        if isinstance(node, torch.Tensor):
            try:
                names.setdefault(node.untyped_storage().data_ptr(), where or "<root>")
            except (RuntimeError, NotImplementedError, TypeError):
                pass
        elif isinstance(node, Mapping):
            for key, value in node.items():
                walk(value, f"{where}.{key}" if where else str(key))
        elif isinstance(node, (list, tuple)):
            for i, value in enumerate(node):
                walk(value, f"{where}[{i}]")

    walk(obj, path)
    return names


def check_fresh(births: Mapping[str, float], grace: float, url: str) -> None:
    """Refuse to commit a manifest that references a blob born ``COMMIT_FRACTION * grace`` or more ago.

    Blobs are reused only while younger than ``REUSE_FRACTION * grace`` (:mod:`.blobs`): a save has the difference
    (a quarter of the grace) to commit; the last quarter is the safety margin of :mod:`.gc`.
    """
    if not births:
        return
    oldest_name, oldest = min(births.items(), key=lambda item: item[1])
    age = time.time() - oldest
    if age >= COMMIT_FRACTION * grace:
        raise RemoteSaveError(
            f"not committing {url}: blob {oldest_name} it references was stored {age:.0f} s ago, more than "
            f"{COMMIT_FRACTION} * dedup_grace = {COMMIT_FRACTION * grace:.0f} s, so a concurrent GC could delete it: "
            "the save took too long for this grace; raise `dedup_grace`. Nothing was committed; the next GC "
            "removes the unreferenced blobs"
        )


def save_dedup(saver: Any, index: BlobIndex, checkpoint: Any, key: str, metadata: Mapping | None) -> SaveStats:
    """Store ``checkpoint`` at ``key`` of ``saver`` (a :class:`~ckptcloud.remote.RemoteSaver`) as a manifest."""
    from ckptcloud.remote import _estimate_nbytes, _object_metadata, _run_claim

    store, retry, url = saver.store, saver.retry, saver.store.url(key)
    folder = blob_folder(saver._base)
    if not index.listed:  # blobs stored before this process started (a resumed run): reusable while fresh
        listed = retry.call(lambda: store.list(folder), f"listing {store.url(folder)}")
        index.add_listing(listed, folder)
    meter = Meter(saver.progress, _estimate_nbytes(checkpoint))  # blob bytes stored or found stored
    writer = BlobWriter(
        store,
        folder,
        index,
        chunk_size=saver.part_size,
        max_concurrency=saver.max_concurrency,
        retry=retry,
        names=tensor_names(checkpoint),
        progress=meter.add,
    )
    try:
        length = serialization.save(checkpoint, writer, **saver.kwargs)
        writer.finish()
    except BaseException as err:
        writer.abort()
        cause = writer.failure
        if cause is None or cause is err or not isinstance(err, Exception):
            raise
        raise cause from None
    body = manifest.encode(writer.segments, writer.inline, length)
    meta = {**_object_metadata(metadata), manifest.METADATA_KEY: manifest.METADATA_VALUE}
    commit = PartWriter(
        store,
        key,
        part_size=saver.part_size,
        max_concurrency=saver.max_concurrency,
        metadata=meta,
        retry=retry,
        claim=_run_claim(url, metadata),
    )
    try:
        commit.write(body)
        check_fresh(writer.births, index.grace, url)
        commit.commit()
    except BaseException:
        commit.abort()
        raise
    return SaveStats(writer.uploaded_bytes, writer.reused_bytes, len(body))
