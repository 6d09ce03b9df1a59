"""A local folder as a store (``file://`` URLs): the same all-or-nothing contract as the object stores.

Keys are absolute paths without their leading ``/`` (``url("tmp/ck/a")`` is ``file:///tmp/ck/a``). Nothing is ever
visible half-written: ``put`` and ``complete`` write a temporary file under ``<folder>/.ckptcloud-tmp/``, sync it and
move it into place in one step. A multipart upload keeps each part as its own file there until ``complete`` joins
them (``os.copy_file_range``: an in-kernel copy, or a reflink on file systems that have them) or ``abort`` removes
them. Conditional writes: ``Precondition()`` publishes with ``os.link``, which fails atomically when the name
exists; ``Precondition(version)`` compares the version and then replaces, which leaves a short window (a local
folder has no compare-and-swap). Versions are ``<mtime_ns>-<inode>-<size>``. User metadata is not kept (a local
file has none, as with :class:`~ckptcloud.handlers.DiskSaver`).

Example:
    >>> import tempfile
    >>> root = tempfile.mkdtemp().lstrip("/")
    >>> store = LocalStore()
    >>> store.put(f"{root}/a.bin", memoryview(b"abc"), {})
    >>> b"".join(store.read(f"{root}/a.bin", 1)), [o.size for o in store.list(f"{root}/")]
    (b'bc', [3])
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ckptcloud.errors import ObjectChangedError
from ckptcloud.stores.base import GiB, IncompleteUpload, MiB, ObjectInfo, Precondition, Store, StoreLimits

TMP_DIR = ".ckptcloud-tmp"
"""The folder, next to the objects, that holds temporary files and the parts of uploads in progress."""

_CHUNK = 1 * MiB


class LocalStore(Store):
    """The local file system as a :class:`~ckptcloud.stores.base.Store` (see the module docstring).

    Example:
        >>> LocalStore().url("tmp/run/.metadata")
        'file:///tmp/run/.metadata'
    """

    scheme = "file"
    limits = StoreLimits(min_part_size=1, max_part_size=5 * GiB, max_parts=10_000)

    def __init__(self) -> None:
        self.bucket = ""

    def url(self, key: str) -> str:
        return f"file:///{key}"

    @staticmethod
    def _path(key: str) -> Path:
        return Path("/" + key)

    def check_bucket(self) -> None:
        """Nothing to check: folders are made as objects are written."""

    # ------------------------------------------------------------------------------------------------ writes
    def _tmp_dir(self, path: Path) -> Path:
        folder = path.parent / TMP_DIR
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def _publish(self, tmp: Path, path: Path, when: Precondition | None) -> None:
        """Move the synced file ``tmp`` to ``path``, as ``when`` allows; ``tmp`` is gone afterwards either way."""
        try:
            if when is not None and when.version is None:
                try:
                    os.link(tmp, path)  # atomic: fails if the name exists
                except FileExistsError as err:
                    raise ObjectChangedError(f"{self.url(self._key(path))} already exists") from err
                return
            if when is not None and _version_of(path) != when.version:
                raise ObjectChangedError(f"{self.url(self._key(path))} is not the version the write was conditional on")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @staticmethod
    def _key(path: Path) -> str:
        return str(path).lstrip("/")

    def put(self, key: str, data: memoryview, metadata: Mapping[str, str], when: Precondition | None = None) -> None:
        path = self._path(key)
        tmp = self._tmp_dir(path) / f"{path.name}.{uuid.uuid4().hex}.tmp"
        try:
            with _create(tmp) as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._publish(tmp, path, when)

    def begin(self, key: str, metadata: Mapping[str, str]) -> Any:
        path = self._path(key)
        folder = self._tmp_dir(path) / f"{path.name}.{uuid.uuid4().hex}.upload"
        folder.mkdir()
        return key, str(folder)

    def put_part(self, upload: Any, number: int, data: memoryview) -> Any:
        _, folder = upload
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"the upload to {self.url(upload[0])} is gone (aborted?)")
        with open(Path(folder, f"{number:05d}"), "wb") as file:
            file.write(data)
        return number

    def complete(self, upload: Any, parts: list[Any], when: Precondition | None = None) -> None:
        key, folder = upload
        path = self._path(key)
        tmp = Path(folder).with_suffix(".tmp")
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            for number in parts:
                part = os.open(Path(folder, f"{number:05d}"), os.O_RDONLY)
                try:
                    _copy(part, out)
                finally:
                    os.close(part)
            os.fsync(out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            os.close(out)
        self._publish(tmp, path, when)  # a failed condition keeps the parts: complete may be called again
        shutil.rmtree(folder, ignore_errors=True)

    def abort(self, upload: Any) -> None:
        shutil.rmtree(upload[1], ignore_errors=True)

    # ------------------------------------------------------------------------------------------------- reads
    def head(self, key: str) -> ObjectInfo:
        path = self._path(key)
        try:
            stat = path.stat()
        except (FileNotFoundError, NotADirectoryError) as err:
            raise FileNotFoundError(f"no object at {self.url(key)}") from err
        if not path.is_file():
            raise FileNotFoundError(f"no object at {self.url(key)} (a folder)")
        return ObjectInfo(key, stat.st_size, stat.st_mtime, {}, _version(stat))

    def read(self, key: str, start: int = 0, end: int | None = None, *, version: str | None = None) -> Iterator[bytes]:
        try:
            file = open(self._path(key), "rb")  # closed below, also when the reader stops early
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as err:
            raise FileNotFoundError(f"no object at {self.url(key)}") from err
        with file:
            if version is not None and _version(os.fstat(file.fileno())) != version:
                raise ObjectChangedError(f"{self.url(key)} was replaced while it was read (version {version} is gone)")
            file.seek(start)
            left = None if end is None else end - start
            while left is None or left > 0:
                chunk = file.read(_CHUNK if left is None else min(_CHUNK, left))
                if not chunk:
                    return
                if left is not None:
                    left -= len(chunk)
                yield chunk

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            self._path(key).unlink()

    def list(self, prefix: str) -> list[ObjectInfo]:
        base = self._path(prefix) if prefix.endswith("/") or not prefix else self._path(prefix).parent
        out: list[ObjectInfo] = []
        for folder, dirs, files in os.walk(base):
            dirs[:] = sorted(d for d in dirs if d != TMP_DIR)
            for name in sorted(files):
                key = self._key(Path(folder, name))
                if key.startswith(prefix):
                    with contextlib.suppress(FileNotFoundError):  # deleted since the walk saw it
                        stat = os.stat(Path(folder, name))
                        out.append(ObjectInfo(key, stat.st_size, stat.st_mtime, {}, _version(stat)))
        return sorted(out, key=lambda info: info.key)

    def list_incomplete(self, prefix: str) -> list[IncompleteUpload]:
        folder = self._path(prefix) if prefix.endswith("/") or not prefix else self._path(prefix).parent
        tmp = folder / TMP_DIR
        if not tmp.is_dir():
            return []
        out = []
        for entry in sorted(tmp.iterdir()):
            if entry.is_dir() and entry.name.endswith(".upload"):
                name = entry.name.rsplit(".", 2)[0]
                key = self._key(folder / name)
                if key.startswith(prefix):
                    out.append(IncompleteUpload(key, (key, str(entry)), entry.stat().st_mtime))
        return out


def _create(path: Path) -> Any:
    """A new file, opened for writing, with the permissions a plain ``open()`` gives (``0o666`` less the umask)."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb")


def _copy(source: int, target: int) -> None:
    """Append all of the file ``source`` to ``target`` (descriptors): in the kernel where it can
    (``copy_file_range``), else through a buffer."""
    start = os.lseek(target, 0, os.SEEK_CUR)
    copy_range = getattr(os, "copy_file_range", None)
    if copy_range is not None:
        try:
            while copy_range(source, target, 64 * MiB):
                pass
            return
        except OSError:  # a file system that does not support it: start over through user space
            os.lseek(source, 0, os.SEEK_SET)
            os.lseek(target, start, os.SEEK_SET)
            os.ftruncate(target, start)
    while chunk := os.read(source, _CHUNK):
        view = memoryview(chunk)
        while view:
            view = view[os.write(target, view) :]


def _version(stat: os.stat_result) -> str:
    return f"{stat.st_mtime_ns}-{stat.st_ino}-{stat.st_size}"


def _version_of(path: Path) -> str | None:
    try:
        return _version(path.stat())
    except FileNotFoundError:
        return None


__all__ = ["TMP_DIR", "LocalStore"]
