"""A checkpoint's place: its URL and the pipeline options, turned into a store once, and picklable.

The store, its SDK client and the option checks come from the savers (:func:`ckptcloud.urls.saver_from_url` and
:class:`~ckptcloud.remote.RemoteSaver`), so the DCP writer and reader take exactly the options and credentials
the named savers take, and validate them the same way. ``file://`` URLs use
:class:`~ckptcloud.stores.local.LocalStore`.

Pickling keeps the URL and the options only; the store (whose SDK client cannot be pickled) is built again on
first use. That is what ``dcp.async_save(..., async_checkpointer_type=PROCESS)`` needs: it sends the writer to its
checkpoint process through a pipe.
"""

from __future__ import annotations

import copy
import pickle
from typing import Any

from ckptcloud.remote import RemoteSaver, normalize_prefix
from ckptcloud.retry import Retry
from ckptcloud.stores.base import Store
from ckptcloud.stores.local import LocalStore
from ckptcloud.streaming import Progress
from ckptcloud.urls import saver_from_url, split_url

NOT_OPTIONS = ("require_empty", "check_bucket", "save_on_rank", "tmp_dir")
"""Saver options that mean nothing for a DCP checkpoint (every rank writes; nothing is downloaded to a file)."""


class Target:
    """A checkpoint folder URL with the pipeline options; :attr:`store` and friends are built on first use.

    Args:
        url: ``s3://bucket/folder``, ``gs://bucket/folder``, ``az://container/folder`` or ``file:///abs/folder``.
        **options: ``part_size``, ``max_concurrency``, ``retry``, ``progress``, and the client and credential
            arguments of the scheme's saver (``endpoint_url``, ``region_name``, ``client``, ``extra_args`` for S3;
            ``client``, ``project``, ``upload``, ``kms_key_name``, ``encryption_key`` for GCS;
            ``connection_string``, ``account_url``, ``credential``, ``container_client``, ``api_version``,
            ``encryption_scope``, ``cpk`` for Azure).

    Example:
        >>> import tempfile
        >>> target = Target("file://" + tempfile.mkdtemp(), part_size=8 * 1024 * 1024)
        >>> target.store.scheme, target.part_size
        ('file', 8388608)
    """

    def __init__(self, url: str, **options: Any) -> None:
        scheme, _, folder = split_url(url)
        if not folder.strip("/"):
            raise ValueError(f"Argument `url` should name a folder for the checkpoint, but given {url!r}")
        refused = sorted(set(options) & set(NOT_OPTIONS))
        if refused:
            raise TypeError(f"{', '.join(refused)} is not an option of a sharded checkpoint's writer or reader")
        self.url = url.rstrip("/")
        self.scheme = scheme
        self.options = options
        self._saver: RemoteSaver | None = None
        self._from_saver = False
        self._build()  # bad options fail here, not in the middle of a collective

    def _build(self) -> RemoteSaver:
        if self._saver is None:
            scheme, _, folder = split_url(self.url)
            common: dict[str, Any] = {"require_empty": False, "check_bucket": False}
            if scheme == "file":
                saver = RemoteSaver(LocalStore(), folder, **common, **self.options)
            else:
                saver = saver_from_url(self.url, **common, **self.options)
            if saver.kwargs:  # RemoteSaver passes unknown keywords on to torch.save: here they are mistakes
                raise TypeError(f"unexpected option(s) {sorted(saver.kwargs)} for {scheme}:// checkpoints")
            self._saver = saver
        return self._saver

    @classmethod
    def from_saver(cls, saver: RemoteSaver, folder: str) -> Target:
        """The folder ``folder`` under ``saver``'s prefix, with ``saver``'s store, client and options.

        Such a target does not pickle (its client may not, and no URL rebuilds it): for process-mode
        ``async_save``, make the writer from a URL and options.
        """
        if not isinstance(saver, RemoteSaver):
            raise TypeError(f"Argument `saver` should be a RemoteSaver (S3Saver, ...), but given {type(saver)}")
        clone = copy.copy(saver)
        clone.prefix = normalize_prefix(f"{saver.prefix}/{folder}" if saver.prefix else folder)
        if not folder.strip("/"):
            raise ValueError(f"Argument `folder` should name a folder for the checkpoint, but given {folder!r}")
        target = object.__new__(cls)
        target.url = clone.store.url(clone.prefix)
        target.scheme = clone.store.scheme
        target.options = {}
        target._saver = clone
        target._from_saver = True
        return target

    def at(self, url: str) -> Target:
        """The same store, client and options at another folder URL of the same bucket: what
        ``dcp.save(checkpoint_id=url, storage_writer=...)`` asks for."""
        saver = self._build()
        base = saver.store.url("")
        if not isinstance(url, str) or not url.startswith(base):
            raise ValueError(
                f"checkpoint_id {url!r} is not in {base}, the bucket this writer or reader was made for: make one "
                "for that URL"
            )
        folder = url[len(base) :].strip("/")
        if not folder:
            raise ValueError(f"checkpoint_id should name a folder for the checkpoint, but given {url!r}")
        other = object.__new__(Target)
        other.url = url.rstrip("/")
        other.scheme = self.scheme
        other.options = self.options
        other._from_saver = self._from_saver
        other._saver = copy.copy(saver)
        other._saver.prefix = normalize_prefix(folder)
        return other

    # ------------------------------------------------------------------------------------------- pipeline
    @property
    def store(self) -> Store:
        return self._build().store

    @property
    def prefix(self) -> str:
        """The folder's key prefix, without a trailing ``/``."""
        return self._build().prefix

    @property
    def part_size(self) -> int:
        return self._build().part_size

    @property
    def max_concurrency(self) -> int:
        return self._build().max_concurrency

    @property
    def retry(self) -> Retry:
        return self._build().retry

    @property
    def progress(self) -> Progress | None:
        return self._build().progress

    def key(self, name: str) -> str:
        """The key of ``name`` in the folder."""
        return f"{self.prefix}/{name}"

    def url_of(self, name: str) -> str:
        return self.store.url(self.key(name))

    # ------------------------------------------------------------------------------------------- pickling
    def __getstate__(self) -> dict[str, Any]:
        if self._from_saver:
            raise TypeError(
                f"cannot pickle the sharded checkpoint writer or reader for {self.url}: it was made from a saver "
                "object (dcp.async_save with async_checkpointer_type=PROCESS sends it to another process). Make it "
                "from a URL and options that pickle instead, or save in thread mode"
            )
        for name, value in self.options.items():
            try:
                pickle.dumps(value)
            except Exception as err:
                raise TypeError(
                    f"cannot pickle the sharded checkpoint writer for {self.url} (dcp.async_save with "
                    f"async_checkpointer_type=PROCESS sends it to another process): option `{name}` is a "
                    f"{type(value).__name__}, which does not pickle ({type(err).__name__}). Pass what builds it "
                    "instead (endpoint_url=, connection_string=, ...), or save in thread mode"
                ) from None
        return {"url": self.url, "options": self.options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.url = state["url"]
        self.options = state["options"]
        self.scheme = split_url(self.url)[0]
        self._saver = None
        self._from_saver = False

    def __repr__(self) -> str:
        return f"Target({self.url!r})"
