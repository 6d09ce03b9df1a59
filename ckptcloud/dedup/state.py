"""``Dedup``: what a saver with ``dedup=True`` keeps between saves (the grace, the blob index, the last stats)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import IO, Any

from ckptcloud.dedup.blobs import DEFAULT_GRACE, BlobIndex, check_grace
from ckptcloud.dedup.gc import GCReport, collect_garbage
from ckptcloud.dedup.hashing import require_blake3
from ckptcloud.dedup.load import rebuild_if_manifest
from ckptcloud.dedup.save import SaveStats, save_dedup

logger = logging.getLogger("ckptcloud")


class Dedup:
    """The dedup side of one :class:`~ckptcloud.remote.RemoteSaver` (made by ``dedup=True``).

    Example:
        >>> import torch
        >>> from ckptcloud.remote import RemoteSaver
        >>> from ckptcloud.stores.memory import MemoryStore
        >>> saver = RemoteSaver(MemoryStore(), "run", dedup=True)
        >>> frozen = torch.zeros(1 << 20)
        >>> saver({"w": frozen, "step": 1}, "model_1.pt")
        >>> saver({"w": frozen, "step": 2}, "model_2.pt")
        >>> saver.dedup.last.uploaded_bytes, saver.dedup.last.reused_bytes
        (0, 4194304)
        >>> saver.load("model_2.pt")["step"]
        2
    """

    def __init__(self, grace: float = DEFAULT_GRACE) -> None:
        require_blake3()
        self.grace = check_grace(grace)
        self.index = BlobIndex(self.grace)
        self.last: SaveStats | None = None
        self.last_gc: GCReport | None = None

    def __repr__(self) -> str:
        return f"Dedup(grace={self.grace})"

    def save(self, saver: Any, checkpoint: Any, key: str, metadata: Mapping | None) -> None:
        """Store ``checkpoint`` at ``key`` as blobs plus a manifest."""
        self.last = save_dedup(saver, self.index, checkpoint, key, metadata)
        logger.debug("dedup save of %s: %s", saver.store.url(key), self.last)

    def collect(self, saver: Any, *, dry_run: bool = False, grace: float | None = None) -> GCReport:
        """Garbage-collect the blobs of ``saver``'s prefix (see :mod:`ckptcloud.dedup.gc`)."""
        grace = self.grace if grace is None else check_grace(grace, "grace")
        report = collect_garbage(saver.store, saver._base, grace, retry=saver.retry, dry_run=dry_run, index=self.index)
        self.last_gc = report
        return report

    @staticmethod
    def rebuild(saver: Any, filename: str, file: IO[bytes]) -> int | None:
        """If ``file`` holds a manifest, rebuild the checkpoint into it (see :mod:`ckptcloud.dedup.load`)."""
        return rebuild_if_manifest(saver, filename, file, saver.progress)


def make_dedup(dedup: object, grace: object) -> Dedup | None:
    """A saver's :class:`Dedup` from its ``dedup`` and ``dedup_grace`` arguments (``None`` when off)."""
    if not isinstance(dedup, bool):
        raise TypeError(f"Argument `dedup` should be a bool, but given {type(dedup)}")
    if not dedup:
        if grace is not None:
            raise ValueError("Argument `dedup_grace` is only for dedup=True savers, but dedup=False")
        return None
    return Dedup(DEFAULT_GRACE if grace is None else grace)  # type: ignore[arg-type]
