"""ckptcloud: stream PyTorch checkpoints to cloud object storage and keep only the ones worth keeping."""

import logging

from ckptcloud.checkpoint import Checkpoint
from ckptcloud.errors import (
    CkptcloudError,
    IntegrityError,
    ObjectChangedError,
    RemoteSaveError,
    RunConflictError,
    TransientError,
)
from ckptcloud.handlers import BaseSaveHandler, DiskSaver
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
    "ObjectChangedError",
    "RemoteSaveError",
    "RemoteSaver",
    "Retry",
    "RunConflictError",
    "S3Saver",
    "TransientError",
    "load_checkpoint",
    "saver_from_url",
]
__version__ = "0.1.0"

# Library convention: no output unless the application configures logging for "ckptcloud".
logging.getLogger("ckptcloud").addHandler(logging.NullHandler())
