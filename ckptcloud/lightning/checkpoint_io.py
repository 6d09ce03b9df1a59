"""``CloudCheckpointIO``: Lightning's ``CheckpointIO`` over ckptcloud's pipeline (see :mod:`ckptcloud.lightning`)."""

from __future__ import annotations

import inspect
import logging
import os
import threading
from collections.abc import Mapping
from typing import Any

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from ckptcloud import distributed
from ckptcloud.background import BackgroundWriter
from ckptcloud.remote import RemoteSaver
from ckptcloud.snapshot import snapshot
from ckptcloud.urls import saver_from_url, split_url

logger = logging.getLogger("ckptcloud")

REMOTE_SCHEMES = ("s3", "gs", "az")
"""URL schemes that go through ckptcloud; any other path (local, ``file://``) goes to ``TorchCheckpointIO``."""

_RESERVED_OPTIONS = ("require_empty", "check_bucket", "save_on_rank")
_TRUE = ("1", "y", "yes", "true")


def _remote(path: Any) -> tuple[str, str, str] | None:
    """``(scheme, bucket, key)`` for an ``s3://``, ``gs://`` or ``az://`` string, ``None`` for anything else.

    A ``pathlib.Path`` is always local: ``Path("s3://b/k")`` has already collapsed ``//`` into ``/``.
    """
    if not isinstance(path, str) or "://" not in path:
        return None
    scheme = path.partition("://")[0].lower()
    if scheme not in REMOTE_SCHEMES:
        return None
    return split_url(path)


def _object_url(path: str) -> tuple[str, str, str, str]:
    """``(scheme, bucket, key, url)`` of a remote checkpoint path; refuses a bucket or a folder."""
    scheme, bucket, key = split_url(path)
    if not key or path.endswith("/"):
        raise ValueError(f"{path!r} names no object: give a checkpoint's URL, e.g. {scheme}://{bucket}/run/last.ckpt")
    return scheme, bucket, key, f"{scheme}://{bucket}/{key}"


def _weights_only(weights_only: bool | None) -> bool:
    """``torch.load``'s own resolution of ``weights_only=None``: ``True`` (torch >= 2.6), unless the environment
    sets ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``; ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` forces ``True`` (torch applies it
    again inside ``torch.load``)."""
    if os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0").lower() in _TRUE:
        return True
    if weights_only is not None:
        return bool(weights_only)
    return os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "0").lower() not in _TRUE


class _Savers:
    """One saver per (scheme, bucket, rank), made on first use with the options given, shared across threads.

    Each saver has prefix ``""`` and takes the whole object key as its filename, so one SDK client serves every
    folder of a bucket. ``save_on_rank`` is this process's rank: Lightning already calls save and remove on global
    rank 0 only, so the saver acts where it is called and coordinates nothing (calls run in
    :func:`ckptcloud.distributed.local_only`).
    """

    def __init__(self, options: Mapping[str, Any], scheme_options: Mapping[str, Mapping[str, Any]]) -> None:
        for name in _RESERVED_OPTIONS:
            if name in options or any(name in extra for extra in scheme_options.values()):
                raise ValueError(f"CloudCheckpointIO sets `{name}` itself; do not pass it")
        unknown = sorted(set(scheme_options) - set(REMOTE_SCHEMES))
        if unknown:
            raise ValueError(f"Argument `scheme_options` has keys {unknown}; expected some of {list(REMOTE_SCHEMES)}")
        self.options = dict(options)
        self.scheme_options = {scheme: dict(extra) for scheme, extra in scheme_options.items()}
        self._savers: dict[tuple[str, str, int], RemoteSaver] = {}
        self._lock = threading.Lock()

    def get(self, scheme: str, bucket: str) -> RemoteSaver:
        rank = distributed.get_rank()
        with self._lock:
            saver = self._savers.get((scheme, bucket, rank))
            if saver is None:
                options = {**self.options, **self.scheme_options.get(scheme, {})}
                saver = saver_from_url(
                    f"{scheme}://{bucket}", require_empty=False, check_bucket=False, save_on_rank=rank, **options
                )
                # a saver passes keywords it does not know on to torch.save: catch another cloud's options here
                stray = sorted(set(saver.kwargs) - set(inspect.signature(torch.save).parameters))
                if stray:
                    raise TypeError(
                        f"CloudCheckpointIO options {stray} are not options of {type(saver).__name__} ({scheme}:// "
                        "URLs); when one plugin reaches several clouds, give each its own options in "
                        "scheme_options={'s3': {...}, 'gs': {...}, 'az': {...}}"
                    )
                self._savers[(scheme, bucket, rank)] = saver
            return saver

    def __getstate__(self) -> dict[str, Any]:  # savers hold SDK clients and locks: rebuilt after unpickling
        return {"options": self.options, "scheme_options": self.scheme_options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["options"], state["scheme_options"])  # type: ignore[misc]


_active: _Savers | None = None  # the savers of the CloudCheckpointIO made (or unpickled) last


def _active_savers() -> _Savers:
    """What :class:`ObjectStoreFileSystem` uses: the savers of the ``CloudCheckpointIO`` made last, else defaults."""
    global _active
    if _active is None:
        _active = _Savers({}, {})
    return _active


class CloudCheckpointIO(CheckpointIO):
    """Lightning ``CheckpointIO`` for ``s3://``, ``gs://`` and ``az://`` paths, over ckptcloud's streaming pipeline.

    Saves stream ``torch.save`` into a multipart upload: no serialized copy of the checkpoint is made, and peak
    extra memory is ``(max_concurrency + 1) * part_size`` whatever the checkpoint's size. An object appears only
    once complete, so a failed or interrupted save never leaves a truncated ``.ckpt`` (and never costs the previous
    one). Loads stream into a temporary file with ranged GETs, check the CRC32C saved with the checkpoint, then
    ``torch.load`` it. Local paths (and ``file://``) go to Lightning's ``TorchCheckpointIO``, unchanged.

    One saver (one SDK client) is made per bucket on first use and reused for every save, load and remove there;
    ``ModelCheckpoint``'s directory calls use the savers of the ``CloudCheckpointIO`` made last (see
    :class:`ObjectStoreFileSystem`), so they reach the same endpoint with the same credentials.

    Args:
        async_save: save in the background: ``save_checkpoint`` returns once a CPU copy of the checkpoint exists
            (one copy per tensor storage, made on the calling thread: GPU tensors are copied straight to host
            memory, never cloned on the GPU). At most one save is in flight; the next save, a load and
            ``teardown`` (end of ``fit``) first wait for it and raise its error. A ``remove_checkpoint`` that
            arrives while a save is in flight is held back until that save is stored, and dropped (the old
            checkpoint kept) if it fails. Use this instead of wrapping in Lightning's ``AsyncCheckpointIO``, which
            removes the old checkpoint at once, before the new one is stored.
        protect_loaded: never remove a checkpoint this ``CloudCheckpointIO`` loaded (the one ``fit(ckpt_path=...)``
            resumed from): Lightning's ``ModelCheckpoint`` guards it only on local paths (Lightning#21813).
        scheme_options: options for one scheme only, e.g. ``{"gs": {"project": "p"}}``, over ``saver_options``.
        **saver_options: passed to every saver (see :func:`ckptcloud.saver_from_url`): the pipeline's
            ``part_size``, ``max_concurrency``, ``retry``, ``tmp_dir``, ``progress``, and the client's options of
            :class:`~ckptcloud.S3Saver` (``endpoint_url``, ``region_name``, ``client``, ``extra_args``),
            :class:`~ckptcloud.GCSSaver` (``client``, ``project``, ``upload``, ...) or
            :class:`~ckptcloud.AzureBlobSaver` (``connection_string``, ``account_url``, ``credential``, ...),
            and ``torch.save``'s own keywords. A keyword that is none of these raises ``TypeError`` when the first
            saver is made (a plugin that reaches several clouds takes each one's options in ``scheme_options``).
            Without any, credentials come from each SDK's standard chain.

    Loads: ``weights_only=None`` (what the ``Trainer`` passes unless you give ``fit(..., weights_only=...)``) is
    resolved as ``torch.load`` resolves it, which is what Lightning's own loads do: ``True`` on torch >= 2.6 unless
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` is set. Lightning's checkpoints (state dicts, loops, callbacks, plain
    hyperparameters) load that way; one holding another class fails with an error naming it and torch's fix
    (``torch.serialization.add_safe_globals([...])``); ``weights_only=False`` is for files you trust.
    ``map_location=None`` loads onto the CPU, as ``TorchCheckpointIO`` does.

    Example:
        >>> import lightning as L  # doctest: +SKIP
        >>> from lightning.pytorch.callbacks import ModelCheckpoint  # doctest: +SKIP
        >>> trainer = L.Trainer(  # doctest: +SKIP
        ...     max_epochs=10,
        ...     callbacks=[ModelCheckpoint(dirpath="s3://my-bucket/runs/exp1", monitor="val_loss", save_top_k=2)],
        ...     plugins=[CloudCheckpointIO(max_concurrency=8, part_size=16 * 1024**2)],
        ... )
        >>> io = CloudCheckpointIO()
        >>> io.save_checkpoint({"step": 1}, "/tmp/ckptcloud-doc/last.ckpt")  # local: TorchCheckpointIO
        >>> io.load_checkpoint("/tmp/ckptcloud-doc/last.ckpt")
        {'step': 1}
        >>> io.remove_checkpoint("/tmp/ckptcloud-doc/last.ckpt")
    """

    def __init__(
        self,
        *,
        async_save: bool = False,
        protect_loaded: bool = True,
        scheme_options: Mapping[str, Mapping[str, Any]] | None = None,
        **saver_options: Any,
    ) -> None:
        global _active
        super().__init__()
        self.async_save = bool(async_save)
        self.protect_loaded = bool(protect_loaded)
        self._savers = _Savers(saver_options, scheme_options or {})
        self._local = TorchCheckpointIO()
        self._loaded: set[str] = set()
        self._writer: BackgroundWriter | None = None
        self._deferred: list[str] | None = None  # removals held back while an async save is in flight
        _active = self._savers

    def __repr__(self) -> str:
        return f"{type(self).__name__}(async_save={self.async_save}, protect_loaded={self.protect_loaded})"

    def __getstate__(self) -> dict[str, Any]:  # ddp_spawn pickles the Trainer: no clients, threads or locks
        if self._deferred is not None:
            raise RuntimeError("CloudCheckpointIO cannot be pickled while an async save is in flight")
        state = self.__dict__.copy()
        state["_writer"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        global _active
        self.__dict__.update(state)
        _active = self._savers

    def saver_for(self, url: str) -> RemoteSaver:
        """The saver this plugin uses for ``url``'s bucket (prefix ``""``: filenames are whole object keys).

        Example:
            >>> CloudCheckpointIO(endpoint_url="http://127.0.0.1:9000").saver_for("s3://b/run/x.ckpt")
            S3Saver(url='s3://b/', part_size=8388608, max_concurrency=16, save_on_rank=0)
        """
        target = _remote(url)
        if target is None:
            raise ValueError(f"{url!r} is not an s3://, gs:// or az:// URL")
        return self._savers.get(target[0], target[1])

    # ------------------------------------------------------------------------------------------------ save
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Stream ``checkpoint`` to ``path`` (a URL, or a local path for ``TorchCheckpointIO``).

        Raises:
            TypeError: ``storage_options`` given (as ``TorchCheckpointIO`` does: nothing here takes them).
        """
        if storage_options is not None:
            raise TypeError(
                f"`Trainer.save_checkpoint(..., storage_options=...)` is not supported by {type(self).__name__}: "
                "pass the savers' options to CloudCheckpointIO(...) instead"
            )
        if _remote(path) is None:
            self._settle()
            self._local.save_checkpoint(checkpoint, path)
            return
        scheme, bucket, key, url = _object_url(path)
        saver = self._savers.get(scheme, bucket)
        if not self.async_save:
            with distributed.local_only():
                saver(checkpoint, key)
            return
        self._settle()  # the previous save is stored (or raises here), and the removals it held back are done
        copied = snapshot(checkpoint)
        if self._writer is None:
            # save_on_rank=-1: the writer coordinates nothing (Lightning calls this on global rank 0 only)
            self._writer = BackgroundWriter(save_on_rank=-1)
        removals: list[str] = []
        self._deferred = removals

        def write() -> None:
            saver(copied, key)

        with distributed.local_only():
            self._writer.submit(write, lambda: self._run_removals(removals), f"saving {url}")

    # ------------------------------------------------------------------------------------------------ load
    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Load the checkpoint at ``path``: a URL through ckptcloud, a local path through ``TorchCheckpointIO``.

        ``map_location=None`` loads onto the CPU; ``weights_only=None`` resolves as in ``torch.load`` (see the
        class). A missing object raises ``FileNotFoundError`` naming its URL.
        """
        self._settle()
        if _remote(path) is None:
            if map_location is None:
                return self._local.load_checkpoint(path, weights_only=weights_only)
            return self._local.load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        scheme, bucket, key, url = _object_url(path)
        saver = self._savers.get(scheme, bucket)
        loaded = saver.load(
            key,
            map_location="cpu" if map_location is None else map_location,
            weights_only=_weights_only(weights_only),
            mmap=False,
        )
        self._loaded.add(url)
        return loaded  # type: ignore[no-any-return]

    # ---------------------------------------------------------------------------------------------- remove
    def remove_checkpoint(self, path: Any) -> None:
        """Delete the checkpoint at ``path``; one already gone is not an error.

        Remote paths: a checkpoint this plugin loaded is kept (``protect_loaded``), and with ``async_save`` a
        removal waits for the save in flight to be stored (and is dropped if that save fails).
        """
        if _remote(path) is None:
            self._local.remove_checkpoint(path)
            return
        _, _, _, url = _object_url(path)
        if self.protect_loaded and url in self._loaded:
            logger.warning(
                "not removing %s: this run loaded it (resumed from it); CloudCheckpointIO never removes a checkpoint "
                "it loaded, as Lightning's ModelCheckpoint does for local files",
                url,
            )
            return
        if self._deferred is not None:
            logger.debug("removing %s once the save in flight is stored", url)
            self._deferred.append(url)
            return
        self._remove_now(url)

    def _remove_now(self, url: str) -> None:
        scheme, bucket, key = split_url(url)
        with distributed.local_only():
            self._savers.get(scheme, bucket).remove(key)

    def _run_removals(self, removals: list[str]) -> None:
        """The finishing step of an async save, run on the caller's thread once it is stored."""
        if self._deferred is removals:
            self._deferred = None
        for url in removals:
            self._remove_now(url)

    # -------------------------------------------------------------------------------------------- teardown
    def _settle(self) -> None:
        """Wait for the async save in flight; run the removals it held back, or drop them and raise its error."""
        if self._writer is None:
            return
        try:
            with distributed.local_only():
                self._writer.wait(agree=False)
        except BaseException:
            kept, self._deferred = self._deferred or [], None
            if kept:
                logger.warning("kept %s: the save that was to replace them failed", ", ".join(kept))
            raise

    def teardown(self) -> None:
        """Wait for the async save in flight (the ``Trainer`` calls this at the end of ``fit``) and raise its error.

        The worker thread stays, so the plugin can be used by a later ``fit`` or ``trainer.save_checkpoint``.
        """
        self._settle()
        self._local.teardown()
