"""Content-addressed (deduplicated) checkpoints: upload only what changed.

With ``dedup=True`` a saver splits the ``torch.save`` byte stream it produces into *inline* bytes (zip headers,
the pickle, storages under :data:`~ckptcloud.dedup.manifest.INLINE_MAX`) and *blob* segments (each tensor storage,
cut into chunks of ``part_size``). Each chunk is hashed with BLAKE3 as it streams and stored once, immutably, under
``<prefix>/.blobs/<hash>``; the checkpoint's own key gets a small *manifest* (a ``torch.save`` file) that lists the
segments, committed last. Loading streams the blobs back with ranged GETs, checks each one's CRC32C, and rebuilds
the exact bytes a plain save would have written, so ``weights_only`` loads, tied weights, views and any leaf work as
for ordinary checkpoints. See :mod:`ckptcloud.dedup.gc` for garbage collection and its safety argument.

Modules: :mod:`.hashing` (BLAKE3, the optional dependency), :mod:`.blobs` (naming, the index, reuse freshness),
:mod:`.manifest` (format, sniffing), :mod:`.writer` (the stream that uploads blobs), :mod:`.save`, :mod:`.load`,
:mod:`.gc`.
"""

from __future__ import annotations

from ckptcloud.dedup.blobs import BLOB_FOLDER, DEFAULT_GRACE
from ckptcloud.dedup.gc import GCReport, collect_garbage
from ckptcloud.dedup.manifest import FORMAT, is_manifest_file
from ckptcloud.dedup.state import Dedup

__all__ = ["BLOB_FOLDER", "DEFAULT_GRACE", "FORMAT", "Dedup", "GCReport", "collect_garbage", "is_manifest_file"]
