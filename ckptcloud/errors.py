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


class RankFailedError(RemoteSaveError):
    """A rank of a sharded save stopped beating its heartbeat (killed, or its host lost) before it finished writing.

    Raised on every surviving rank, naming the dead rank(s) and the checkpoint; their uploads are cancelled and
    nothing is committed. Only ranks that stop beating are declared dead: a slow upload keeps its rank alive.
    """

    ranks: tuple[int, ...] = ()
    """The ranks found dead (empty when the store itself was lost)."""


class TransientError(CkptcloudError, ConnectionError):
    """A failure worth retrying: 5xx, throttling (S3 ``SlowDown``, HTTP 429), connection resets, timeouts.

    Store adapters raise it; the pipeline retries it (see ``ckptcloud.retry.Retry``).
    """


class IntegrityError(CkptcloudError):
    """A stored checkpoint's bytes do not match the checksum recorded when it was saved; it was not unpickled."""


class ObjectChangedError(CkptcloudError):
    """The object was replaced (or deleted) while it was being read: its version no longer matches.

    Raised by a store's ``read(..., version=...)`` when a precondition fails (HTTP 412, or a GCS generation that is
    gone). A load restarts once from the new version; if the object changes again, the load raises this error.
    Nothing is damaged: loading again later reads one whole version.
    """


class RunConflictError(CkptcloudError, FileExistsError):
    """A save would replace a checkpoint that another run wrote under the same prefix; nothing was replaced.

    Two jobs must not share a prefix: give each its own, or continue the other run with ``resume=True``.
    """


class LocalWriteError(CkptcloudError, OSError):
    """A local file could not be written: a full disk, a quota, a file-size limit, an I/O error.

    An ``OSError`` with the original ``errno`` and ``strerror`` (``filename`` is the file or folder), whose message
    says what was being written, where, how big it is, and what to do. The original error is its ``__cause__``.
    """

    def __init__(self, code: int, strerror: str, filename: str | None = None, message: str = "") -> None:
        super().__init__(code, strerror, filename)
        self.message = message or f"[Errno {code}] {strerror}: {filename}"

    def __str__(self) -> str:
        return self.message


class UploadGoneError(CkptcloudError):
    """A multipart upload disappeared before it was completed (aborted by ``cleanup_incomplete`` or a lifecycle
    rule, or expired), and the object at its key is not the one it would have made. Nothing was saved."""
