"""The exceptions ckptcloud raises for its own failures.

Everything else uses builtins: ``FileNotFoundError`` (no such bucket, key or folder), ``PermissionError``
(access denied), ``ValueError``/``TypeError`` (bad arguments). Our own failures share one root so callers can
catch them all.
"""

from __future__ import annotations


class CkptcloudError(Exception):
    """Root of every error that is ckptcloud's own (not a builtin)."""


class RemoteSaveError(CkptcloudError):
    """Raised on the ranks that did not upload when the writing rank's save failed."""


class TransientError(CkptcloudError, ConnectionError):
    """A failure worth retrying: 5xx, throttling (S3 ``SlowDown``, HTTP 429), connection resets, timeouts.

    Store adapters raise it; the pipeline retries it (see ``ckptcloud.retry.Retry``).
    """


class IntegrityError(CkptcloudError):
    """A stored checkpoint's bytes do not match the checksum recorded when it was saved; it was not unpickled."""
