"""Rebuilding the ``torch.save`` file a manifest describes: inline bytes, then every blob by ranged GETs, each
checked against its CRC32C; the result is byte for byte what a plain save writes (trailer included)."""

from __future__ import annotations

import os
from typing import IO, Any

from ckptcloud.checksum import crc32c
from ckptcloud.dedup import manifest as manifests
from ckptcloud.dedup.blobs import blob_folder
from ckptcloud.download import fetch_ranges, pwrite
from ckptcloud.errors import IntegrityError
from ckptcloud.retry import Retry
from ckptcloud.stores.base import Store
from ckptcloud.streaming import Progress


class MissingBlobError(FileNotFoundError):
    """A blob a manifest references is gone (deleted by hand, or by a GC with a shorter grace than the saver's)."""


def rebuild(
    store: Store,
    base: str,
    manifest: dict[str, Any],
    file: IO[bytes],
    checkpoint_url: str,
    *,
    part_size: int,
    max_concurrency: int,
    retry: Retry | None = None,
    progress: Progress | None = None,
) -> int:
    """Write the checkpoint ``manifest`` describes into the real file ``file`` (from offset 0); returns its size.

    Raises:
        MissingBlobError: a blob is missing (the message names the checkpoint, the tensor and the blob).
        IntegrityError: a blob's size or CRC32C does not match the manifest.
    """
    folder = blob_folder(base)
    file.seek(0)
    file.truncate()
    fd = file.fileno()
    inline = manifest["inline"]
    blobs = [segment for segment in manifest["segments"] if segment[0] == "blob"]
    for kind, offset, length, *rest in manifest["segments"]:
        if kind == "inline":
            start = rest[0]
            pwrite(fd, memoryview(inline)[start : start + length], offset)
    ranges = [(folder + segment[3], 0, segment[2]) for segment in blobs]
    done = -1
    try:
        fetched = fetch_ranges(
            store, ranges, part_size=part_size, max_concurrency=max_concurrency, retry=retry, progress=progress
        )
        for i, (segment, data) in enumerate(zip(blobs, fetched, strict=True)):
            _, offset, length, name, crc, tensor = segment
            if crc32c(data) != crc:
                raise IntegrityError(
                    f"{checkpoint_url}: blob {store.url(folder + name)} of tensor {tensor!r} is damaged (its CRC32C "
                    "does not match the manifest's)"
                )
            pwrite(fd, data, offset)
            done = i
    except FileNotFoundError as err:
        missing = next((s for s in blobs if s[3] in str(err)), blobs[min(done + 1, len(blobs) - 1)])
        raise MissingBlobError(
            f"{checkpoint_url}: blob {store.url(folder + missing[3])} of tensor {missing[5]!r} is missing "
            f"({err}); the checkpoint cannot be rebuilt"
        ) from err
    os.ftruncate(fd, manifest["length"])
    file.seek(0)
    return int(manifest["length"])


def rebuild_if_manifest(saver: Any, filename: str, file: IO[bytes], progress: Progress | None = None) -> int | None:
    """If the real file ``file`` (downloaded from ``saver``'s ``filename``) is a manifest, replace its content by
    the checkpoint it describes and return the new size; else ``None`` and the file is untouched."""
    if not manifests.is_manifest_file(file):
        return None
    url = saver.url(filename)
    manifest = manifests.decode(file, url)
    return rebuild(
        saver.store,
        saver._base,
        manifest,
        file,
        url,
        part_size=saver.part_size,
        max_concurrency=saver.max_concurrency,
        retry=saver.retry,
        progress=progress,
    )
