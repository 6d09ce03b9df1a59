"""``ObjectStoreFileSystem``: the small fsspec filesystem ``ModelCheckpoint`` needs for ``s3://``, ``gs://`` and
``az://`` directories where s3fs, gcsfs or adlfs is not installed (see :mod:`ckptcloud.lightning`)."""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import io
import tempfile
from collections.abc import Callable
from typing import IO, Any, ClassVar

import fsspec
from fsspec.spec import AbstractFileSystem

from ckptcloud.deleting import delete_keys
from ckptcloud.download import download_to_file
from ckptcloud.lightning.checkpoint_io import REMOTE_SCHEMES, _active_savers, _Savers
from ckptcloud.remote import RemoteSaver
from ckptcloud.streaming import PartWriter


class _ObjectWriter(io.RawIOBase):
    """A write-only file over :class:`~ckptcloud.streaming.PartWriter`: nothing is visible until it is published.

    With ``autocommit`` (fsspec's default) ``close`` publishes the object whole; leaving a ``with`` block on an
    exception discards it instead. Inside ``fs.transaction`` (Lightning's ``_atomic_save`` uses one) ``close``
    only finishes writing, and the transaction publishes the object (:meth:`commit`) or discards it
    (:meth:`discard`) when it ends.
    """

    def __init__(self, writer: PartWriter, name: str, autocommit: bool = True) -> None:
        super().__init__()
        self._writer = writer
        self._autocommit = autocommit
        self._settled = False
        self.name = name

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:  # type: ignore[override]
        return self._writer.write(data)

    def commit(self) -> None:
        """Publish the object (once)."""
        if self._settled:
            return
        self._settled = True
        try:
            self._writer.commit()
        except BaseException:
            self._writer.abort()
            raise

    def discard(self) -> None:
        """Discard what was written: nothing appears."""
        if not self._settled:
            self._settled = True
            self._writer.abort()

    def close(self) -> None:
        if self.closed:
            return
        try:
            if self._autocommit:
                self.commit()
        finally:
            super().close()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None and not self.closed:
            self.discard()
            super().close()
            return
        self.close()


class ObjectStoreFileSystem(AbstractFileSystem):
    """A small fsspec filesystem over ckptcloud's savers: what Lightning asks of a checkpoint directory.

    Registered by :func:`register_filesystems` for ``s3``, ``gs`` and ``az`` where no fsspec package serves them,
    so that ``ModelCheckpoint(dirpath="s3://...")`` works without s3fs. Supported: ``ls``, ``info``, ``exists``,
    ``isdir``, ``isfile``, ``modified``, ``rm``/``rm_file`` (``recursive=True`` deletes everything under a
    folder), ``makedirs``/``mkdir`` (no-ops: object stores have no folders), and ``open`` for reading
    (``"rb"``/``"r"``: the object is first downloaded into a temporary file) and writing (``"wb"``/``"w"``:
    streamed in parts, published whole on ``close``). Other operations (append, copy, move, glob) raise
    ``NotImplementedError``: install s3fs, gcsfs or adlfs for a general-purpose filesystem.

    Requests go through the savers of the :class:`CloudCheckpointIO` made last (same endpoint, credentials and
    retries), or, when the filesystem is made with options (``fsspec.filesystem("s3", endpoint_url=...)``), through
    savers made with those.

    Example:
        >>> ObjectStoreFileSystem._strip_protocol("s3://my-bucket/runs/exp1/")  # paths are "bucket/key", as in s3fs
        'my-bucket/runs/exp1'
        >>> import fsspec
        >>> fs = fsspec.filesystem("s3")  # doctest: +SKIP
        >>> fs.ls("s3://my-bucket/runs/exp1", detail=False)  # doctest: +SKIP
        ['my-bucket/runs/exp1/epoch=3-step=8.ckpt', 'my-bucket/runs/exp1/epoch=4-step=10.ckpt']
    """

    protocol: ClassVar[str | tuple[str, ...]] = REMOTE_SCHEMES
    scheme: ClassVar[str] = ""
    root_marker = ""

    def __init__(self, *args: Any, **storage_options: Any) -> None:
        super().__init__(*args, **storage_options)
        self._own = _Savers(storage_options, {}) if storage_options else None

    # ---------------------------------------------------------------------------------------- plumbing
    def _where(self, path: str) -> tuple[RemoteSaver, str, str]:
        """``(saver, bucket, key)`` of ``path`` (``key`` is ``""`` for the bucket itself)."""
        stripped = self._strip_protocol(path)
        bucket, _, key = stripped.partition("/")
        if not bucket:
            raise ValueError(f"{path!r} names no bucket")
        savers = self._own or _active_savers()
        return savers.get(self.scheme, bucket), bucket, key.strip("/")

    @staticmethod
    def _call(saver: RemoteSaver, fn: Callable[[], Any], what: str) -> Any:
        return saver.retry.call(fn, what)

    def _file_entry(self, bucket: str, info: Any) -> dict[str, Any]:
        mtime = info.last_modified
        return {"name": f"{bucket}/{info.key}", "size": info.size, "type": "file", "mtime": mtime}

    # ------------------------------------------------------------------------------------------ listing
    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        """Entries directly under ``path`` (files, and folders for deeper keys); ``[info]`` for an object."""
        saver, bucket, key = self._where(path)
        prefix = f"{key}/" if key else ""
        listed = self._call(saver, lambda: saver.store.list(prefix), f"listing {saver.store.url(prefix)}")
        entries: dict[str, dict[str, Any]] = {}
        for info in listed:
            rest = info.key[len(prefix) :]
            head, sep, _ = rest.partition("/")
            if not head:
                continue
            name = f"{bucket}/{prefix}{head}"
            if sep:
                entries.setdefault(name, {"name": name, "size": 0, "type": "directory"})
            else:
                entries[name] = self._file_entry(bucket, info)
        if not entries:
            if not key:
                return []  # an empty bucket
            entries = {key: self.info(path)}  # an object, or FileNotFoundError
        out = sorted(entries.values(), key=lambda entry: entry["name"])
        return out if detail else [entry["name"] for entry in out]

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        """An object (one HEAD), else a folder (one listing finds a key under it), else ``FileNotFoundError``."""
        saver, bucket, key = self._where(path)
        if not key:
            return {"name": bucket, "size": 0, "type": "directory"}
        with contextlib.suppress(FileNotFoundError):
            return self._file_entry(
                bucket, self._call(saver, lambda: saver.store.head(key), f"reading {saver.store.url(key)}")
            )
        under = f"{key}/"
        if self._call(saver, lambda: saver.store.list(under), f"listing {saver.store.url(under)}"):
            return {"name": f"{bucket}/{key}", "size": 0, "type": "directory"}
        raise FileNotFoundError(f"no object or folder at {self.scheme}://{bucket}/{key}")

    def exists(self, path: str, **kwargs: Any) -> bool:
        """Whether an object or a non-empty folder is at ``path``; access errors are raised, not read as no."""
        try:
            self.info(path)
        except FileNotFoundError:
            return False
        return True

    def isdir(self, path: str) -> bool:
        try:
            return bool(self.info(path)["type"] == "directory")
        except FileNotFoundError:
            return False

    def isfile(self, path: str) -> bool:
        try:
            return bool(self.info(path)["type"] == "file")
        except FileNotFoundError:
            return False

    def modified(self, path: str) -> datetime.datetime:
        info = self.info(path)
        if info["type"] != "file" or info.get("mtime") is None:
            raise FileNotFoundError(f"no object with a modification time at {self.scheme}://{path}")
        return datetime.datetime.fromtimestamp(info["mtime"], tz=datetime.timezone.utc)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        """Nothing to do: object stores have no folders."""

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        """Nothing to do: object stores have no folders."""

    # ----------------------------------------------------------------------------------------- removing
    def rm_file(self, path: str) -> None:
        saver, _, key = self._where(path)
        if not key:
            raise ValueError(f"{path!r} names a bucket, not an object")
        self._call(saver, lambda: saver.store.delete(key), f"removing {saver.store.url(key)}")

    def _rm(self, path: str) -> None:
        self.rm_file(path)

    def rm(self, path: Any, recursive: bool = False, maxdepth: int | None = None) -> None:
        """Delete objects; ``recursive=True`` also deletes every object under each path taken as a folder."""
        for one in [path] if isinstance(path, str) else list(path):
            self._rm_one(one, recursive)

    def _rm_one(self, path: str, recursive: bool) -> None:
        saver, _, key = self._where(path)
        keys = [key] if key else []
        if recursive:
            under = f"{key}/" if key else ""
            listed = self._call(saver, lambda: saver.store.list(under), f"listing {saver.store.url(under)}")
            keys += [info.key for info in listed]
        if keys:
            delete_keys(saver.store, keys, saver.retry)

    # ---------------------------------------------------------------------------------------------- open
    def _open(
        self,
        path: str,
        mode: str = "rb",
        block_size: int | None = None,
        autocommit: bool = True,
        cache_options: Any = None,
        **kwargs: Any,
    ) -> IO[bytes]:
        saver, _, key = self._where(path)
        if not key:
            raise IsADirectoryError(f"{path!r} names a bucket, not an object")
        url = saver.store.url(key)
        if mode == "rb":
            file = tempfile.TemporaryFile(dir=saver.tmp_dir, prefix="ckptcloud-")
            try:
                download_to_file(
                    saver.store,
                    key,
                    file,
                    part_size=saver.part_size,
                    max_concurrency=saver.load_concurrency,
                    retry=saver.retry,
                )
                file.seek(0)
            except BaseException:
                file.close()
                raise
            return file
        if mode in ("wb", "xb"):
            if mode == "xb" and self.exists(path):
                raise FileExistsError(url)
            writer = PartWriter(
                saver.store, key, part_size=saver.part_size, max_concurrency=saver.max_concurrency, retry=saver.retry
            )
            return _ObjectWriter(writer, url, autocommit)  # type: ignore[return-value]
        raise NotImplementedError(
            f"ckptcloud's {self.scheme}:// filesystem opens objects for reading ('rb') or writing ('wb') only, not "
            f"{mode!r}; install s3fs, gcsfs or adlfs for a general-purpose filesystem"
        )

    def cp_file(self, path1: str, path2: str, **kwargs: Any) -> None:
        raise NotImplementedError(
            f"ckptcloud's {self.scheme}:// filesystem does not copy objects; install s3fs, gcsfs or adlfs for that"
        )


class _S3FileSystem(ObjectStoreFileSystem):
    protocol = "s3"
    scheme = "s3"


class _GSFileSystem(ObjectStoreFileSystem):
    protocol = "gs"
    scheme = "gs"


class _AzFileSystem(ObjectStoreFileSystem):
    protocol = "az"
    scheme = "az"


_FILESYSTEMS: dict[str, type[ObjectStoreFileSystem]] = {"s3": _S3FileSystem, "gs": _GSFileSystem, "az": _AzFileSystem}
_FSSPEC_PACKAGES = {"s3": "s3fs", "gs": "gcsfs", "az": "adlfs"}


def register_filesystems() -> list[str]:
    """Register :class:`ObjectStoreFileSystem` with fsspec for ``s3``, ``gs`` and ``az`` where nothing serves them.

    A protocol is left alone when fsspec already has an implementation registered for it, or when its usual
    package (s3fs, gcsfs, adlfs) is installed: fsspec then loads that one. Importing :mod:`ckptcloud.lightning`
    calls this; calling it again does nothing more. Returns the protocols ckptcloud's filesystem serves.

    Example:
        >>> register_filesystems()  # doctest: +SKIP
        ['s3', 'gs', 'az']
    """
    served = []
    for scheme, cls in _FILESYSTEMS.items():
        current = fsspec.registry.get(scheme)
        if current is cls:
            served.append(scheme)
            continue
        if current is not None or importlib.util.find_spec(_FSSPEC_PACKAGES[scheme]) is not None:
            continue
        fsspec.register_implementation(scheme, cls, clobber=False)
        served.append(scheme)
    return served
