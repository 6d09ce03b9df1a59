"""ckptcloud: stream PyTorch checkpoints to cloud object storage and keep only the ones worth keeping.

Supported platforms: Linux and macOS. On Windows the import fails at once with an ``ImportError`` that says so,
rather than later, deep inside a load (loads write with ``os.pwrite`` and map files through ``/proc/self/fd`` or
``/dev/fd``, and Windows filenames treat ``:`` specially); WSL2 is Linux.
"""

import logging
import sys

if sys.platform == "win32":
    raise ImportError(
        "ckptcloud supports Linux and macOS; on Windows use WSL2 (Windows Subsystem for Linux), "
        "or a Linux container. Native Windows is not tested, and parts of it (loading, file names) would not work."
    )

from ckptcloud.checkpoint import Checkpoint
from ckptcloud.errors import (
    CkptcloudError,
    IntegrityError,
    LocalWriteError,
    ObjectChangedError,
    RankFailedError,
    RemoteSaveError,
    RunConflictError,
    TransientError,
    UploadGoneError,
)
from ckptcloud.handlers import BaseSaveHandler, DiskSaver
from ckptcloud.model_checkpoint import ModelCheckpoint
from ckptcloud.remote import RemoteSaver
from ckptcloud.retry import Retry
from ckptcloud.savers import AzureBlobSaver, GCSSaver, S3Saver
from ckptcloud.urls import load_checkpoint, saver_from_url

__all__ = [
    "AzureBlobSaver",
    "BaseSaveHandler",
    "Checkpoint",
    "CkptcloudError",
    "DiskSaver",
    "GCSSaver",
    "IntegrityError",
    "LocalWriteError",
    "ModelCheckpoint",
    "ObjectChangedError",
    "RankFailedError",
    "RemoteSaveError",
    "RemoteSaver",
    "Retry",
    "RunConflictError",
    "S3Saver",
    "TransientError",
    "UploadGoneError",
    "load_checkpoint",
    "saver_from_url",
]
__version__ = "0.1.0"

# Library convention: no output unless the application configures logging for "ckptcloud".
logging.getLogger("ckptcloud").addHandler(logging.NullHandler())
