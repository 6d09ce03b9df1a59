"""Blob naming, the index of blobs a saver may reuse, and the freshness rule that keeps reuse safe from GC.

Layout: ``<prefix>/.blobs/<blake3 hex>``; a fresh copy of a blob whose first copy is too old to reuse goes to
``<prefix>/.blobs/<blake3 hex>.<unique suffix>``. Blobs are written with a conditional create and never replaced.

Freshness: a saver reuses a stored blob only while its *birth* (the store's last-modified time from a listing or
HEAD, or, for a blob this process uploaded, the local time before the upload request was sent) is less than
``REUSE_FRACTION * grace`` old, and commits a manifest only if every blob it references is less than
``COMMIT_FRACTION * grace`` old just before the commit. GC deletes only unreferenced blobs older than ``grace``.
See :mod:`ckptcloud.dedup.gc` for why that makes collection safe.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from dataclasses import dataclass

from ckptcloud.stores.base import ObjectInfo

BLOB_FOLDER = ".blobs"
DEFAULT_GRACE = 6 * 3600.0
"""Seconds an unreferenced blob is kept before GC may delete it."""
REUSE_FRACTION = 0.5
"""A blob is reused while younger than this fraction of the grace (3 h by default), else stored again."""
COMMIT_FRACTION = 0.75
"""A manifest is committed only while each blob it references is younger than this fraction of the grace."""


def check_grace(grace: object, argument: str = "dedup_grace") -> float:
    """``grace`` as a float: a finite number of seconds > 0, else ``ValueError``/``TypeError`` naming ``argument``."""
    if isinstance(grace, bool) or not isinstance(grace, (int, float)):
        raise TypeError(f"Argument `{argument}` should be a number of seconds, but given {type(grace)}")
    if not (math.isfinite(grace) and grace > 0):
        raise ValueError(f"Argument `{argument}` should be a finite number of seconds > 0, but given {grace!r}")
    return float(grace)


def blob_folder(base: str) -> str:
    """The key prefix of the blobs of the checkpoints under ``base`` (``""`` or ``"prefix/"``)."""
    return f"{base}{BLOB_FOLDER}/"


def hash_of(name: str) -> str:
    """The content hash a blob name stands for: ``"<hex>"`` or ``"<hex>.<suffix>"`` -> ``"<hex>"``."""
    return name.split(".", 1)[0]


def fresh_copy_name(digest: str) -> str:
    """A name used once for a new copy of blob ``digest``."""
    return f"{digest}.{time.time_ns():x}{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class Blob:
    """One stored blob: its name under ``.blobs/`` and its birth time (unix seconds)."""

    name: str
    birth: float


class BlobIndex:
    """The blobs a saver knows of, by content hash: the freshest copy of each (thread-safe).

    Example:
        >>> index = BlobIndex(grace=60.0)
        >>> index.add("ab12", Blob("ab12", birth=time.time()))
        >>> index.reusable("ab12").name, index.reusable("cd34")
        ('ab12', None)
    """

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self._blobs: dict[str, Blob] = {}
        self._lock = threading.Lock()
        self.listed = False

    def add(self, digest: str, blob: Blob) -> None:
        """Record ``blob`` as a copy of ``digest`` (the freshest copy wins)."""
        with self._lock:
            known = self._blobs.get(digest)
            if known is None or blob.birth > known.birth:
                self._blobs[digest] = blob

    def forget(self, digest: str, name: str) -> None:
        """Drop ``name`` (deleted by GC) from the index."""
        with self._lock:
            if digest in self._blobs and self._blobs[digest].name == name:
                del self._blobs[digest]

    def reusable(self, digest: str, now: float | None = None) -> Blob | None:
        """The copy of ``digest`` that a new manifest may reference now: born less than ``REUSE_FRACTION * grace``
        ago."""
        now = time.time() if now is None else now
        with self._lock:
            blob = self._blobs.get(digest)
        return blob if blob is not None and now - blob.birth < REUSE_FRACTION * self.grace else None

    def add_listing(self, listed: list[ObjectInfo], folder: str) -> None:
        """Record every blob of a listing of ``folder``; objects without a last-modified time are not reused."""
        for info in listed:
            name = info.key[len(folder) :]
            if "/" not in name and info.last_modified is not None:
                self.add(hash_of(name), Blob(name, info.last_modified))
        self.listed = True
