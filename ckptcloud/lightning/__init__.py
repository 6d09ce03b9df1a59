"""Lightning integration: ``CloudCheckpointIO`` saves, loads and removes checkpoints through ckptcloud's pipeline.

Lightning's own ``TorchCheckpointIO`` reaches ``s3://``, ``gs://`` and ``az://`` through fsspec: it serializes the
whole checkpoint into a ``BytesIO``, then uploads its ``getvalue()`` with ``fs.pipe`` (with s3fs, the save's peak
extra memory measured 3x the checkpoint: ``benchmarks/lightning_memory.py``). :class:`CloudCheckpointIO` streams
``torch.save`` into a multipart upload instead (peak extra memory ``(max_concurrency + 1) * part_size``), publishes
the object whole or not at all, and loads with ranged GETs into a temporary file that is checked against the CRC32C
saved with it. Local paths go to Lightning's ``TorchCheckpointIO`` unchanged.

``ModelCheckpoint(dirpath="s3://...")`` also looks at its directory through fsspec (``get_filesystem(dirpath)``
when it is made and in ``setup``; ``isdir`` and ``ls`` for the "not empty" warning; ``exists`` before every save
for its version counter; ``exists``/``ls``/``modified`` for ``ckpt_path="last"``; ``open`` for ``to_yaml``), which
without s3fs, gcsfs or adlfs fails with ``ImportError: Install s3fs to access S3`` as soon as the callback is
made. Importing this module therefore registers :class:`ObjectStoreFileSystem`, a small fsspec filesystem over
the same savers, for each of ``s3``, ``gs`` and ``az`` whose fsspec package is not installed and which nothing else
registered (:func:`register_filesystems`). Where s3fs (gcsfs, adlfs) is installed, fsspec keeps using it for those
directory calls; the checkpoints themselves always go through ckptcloud.

Limits: the strategies that hand a checkpoint's path to their ``CheckpointIO`` as given (single device, DDP).
Lightning 2.6's FSDP strategy makes a local ``pathlib.Path`` of it (also for a full state dict) and DeepSpeed
writes its own folder, so neither reaches a remote ``CheckpointIO``. In Lightning 2.6, ``fit(ckpt_path="last")``
finds nothing under a remote ``dirpath`` (with s3fs too: ``ModelCheckpoint`` turns the listing's ``bucket/key``
names into local paths); pass the checkpoint's URL instead.

Needs the ``lightning`` package: ``pip install "ckptcloud[lightning]"`` (plus the extra of your cloud, e.g. ``s3``).
"""

from __future__ import annotations

try:
    import lightning.fabric.plugins.io.checkpoint_io  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised only without lightning
    raise ImportError("ckptcloud.lightning needs Lightning: pip install ckptcloud[lightning]") from err

from ckptcloud.lightning.checkpoint_io import REMOTE_SCHEMES, CloudCheckpointIO
from ckptcloud.lightning.filesystem import ObjectStoreFileSystem, register_filesystems

__all__ = ["REMOTE_SCHEMES", "CloudCheckpointIO", "ObjectStoreFileSystem", "register_filesystems"]

register_filesystems()
