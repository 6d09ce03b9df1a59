"""Sharded checkpoints (``torch.distributed.checkpoint``, DCP) on S3, GCS, Azure and local folders.

:class:`CloudStorageWriter` and :class:`CloudStorageReader` are DCP's ``StorageWriter`` and ``StorageReader`` over
ckptcloud's one upload and download pipeline: every rank streams its own file in parts with bounded memory, the
coordinator commits the checkpoint by creating ``.metadata`` last (only if absent), every item's CRC32C is recorded
and checked on load, and loads fetch only the byte ranges each rank needs. DCP needs numpy on every rank
(``pip install ckptcloud[dcp]``).

Modules: :mod:`~ckptcloud.dcp.writer` and :mod:`~ckptcloud.dcp.reader` (the two classes);
:mod:`~ckptcloud.dcp.layout` (file names, what ``.metadata`` records, its safe decoding);
:mod:`~ckptcloud.dcp.folder` (is a folder committed, its files, verifying and deleting one);
:mod:`~ckptcloud.dcp.agreement` (how the ranks of a save stop together); :mod:`~ckptcloud.dcp.target` (URL and
options to a store); :mod:`~ckptcloud.dcp.retention` (the committed checkpoint folders under a saver's prefix, and
the save handler of ``Checkpoint(..., sharded=True)``).

Example:
    >>> import tempfile, torch, torch.distributed.checkpoint as dcp
    >>> url = "file://" + tempfile.mkdtemp() + "/step-1"
    >>> _ = dcp.save({"w": torch.ones(3)}, storage_writer=CloudStorageWriter(url), no_dist=True)
    >>> state = {"w": torch.zeros(3)}
    >>> dcp.load(state, storage_reader=CloudStorageReader(url), no_dist=True)
    >>> state["w"]
    tensor([1., 1., 1.])
"""

from ckptcloud.dcp.cleanup import cleanup_uncommitted
from ckptcloud.dcp.folder import delete_folder, is_committed, list_folder, read_metadata, verify_folder
from ckptcloud.dcp.layout import CheckpointExistsError, files_of
from ckptcloud.dcp.reader import CloudStorageReader
from ckptcloud.dcp.retention import ShardedSaver, list_sharded
from ckptcloud.dcp.writer import CloudStorageWriter

__all__ = [
    "CheckpointExistsError",
    "CloudStorageReader",
    "CloudStorageWriter",
    "ShardedSaver",
    "cleanup_uncommitted",
    "delete_folder",
    "files_of",
    "is_committed",
    "list_folder",
    "list_sharded",
    "read_metadata",
    "verify_folder",
]
