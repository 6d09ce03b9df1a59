"""The store contract: what a cloud adapter implements. No buffering, no threads, no torch, no ranks here.

The pipeline (``ckptcloud.streaming``) calls these methods from worker threads, so an adapter must be safe to
call concurrently (SDK clients are). ``data`` handed to ``put``/``put_part`` is a ``memoryview`` valid only for
the duration of the call.
"""

from __future__ import annotations

import io
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

MiB = 1024 * 1024
GiB = 1024 * MiB


@dataclass(frozen=True)
class StoreLimits:
    """Part-size rules of one store, as data: the pipeline sizes parts with them."""

    min_part_size: int
    max_part_size: int
    max_parts: int
    part_alignment: int = 1


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object: key (relative to the bucket), size in bytes, last-modified timestamp, user metadata."""

    key: str
    size: int
    last_modified: float | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class IncompleteUpload:
    """An upload left behind: the key it was for (or its temporary folder), the handle ``abort`` takes, its start."""

    key: str
    upload: Any
    started: float | None = None


class Store(ABC):
    """One bucket (or container) of one object store.

    Writes are all-or-nothing: an object appears only at ``put`` or ``complete``; ``abort`` leaves nothing.
    """

    scheme: ClassVar[str]
    limits: ClassVar[StoreLimits]
    bucket: str

    def url(self, key: str) -> str:
        """``scheme://bucket/key``."""
        return f"{self.scheme}://{self.bucket}/{key}"

    @abstractmethod
    def check_bucket(self) -> None:
        """Raise ``FileNotFoundError`` if the bucket does not exist, ``PermissionError`` if access is denied."""

    @abstractmethod
    def put(self, key: str, data: memoryview, metadata: Mapping[str, str]) -> None:
        """Store ``data`` at ``key`` in one request (small objects)."""

    @abstractmethod
    def begin(self, key: str, metadata: Mapping[str, str]) -> Any:
        """Start a multipart upload to ``key``; returns an opaque upload handle."""

    @abstractmethod
    def put_part(self, upload: Any, number: int, data: memoryview) -> Any:
        """Upload part ``number`` (1-based); returns an opaque token that ``complete`` needs."""

    @abstractmethod
    def complete(self, upload: Any, parts: list[Any]) -> None:
        """Publish the object from the part tokens, in order. The object appears whole, atomically."""

    @abstractmethod
    def abort(self, upload: Any) -> None:
        """Discard an upload and its parts; nothing appears at the key."""

    @abstractmethod
    def head(self, key: str) -> ObjectInfo:
        """Size, timestamp and user metadata of the object at ``key``; ``FileNotFoundError`` if there is none."""

    @abstractmethod
    def read(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """Stream bytes ``[start, end)`` of ``key`` (``end=None``: to the end) as chunks."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete ``key``; a key that is already gone is not an error."""

    @abstractmethod
    def list(self, prefix: str) -> list[ObjectInfo]:
        """Every object whose key starts with ``prefix`` (metadata may be empty where listing does not return it)."""

    def list_incomplete(self, prefix: str) -> list[IncompleteUpload]:
        """Uploads under ``prefix`` that were begun and never completed nor aborted (a killed process leaves them).

        Each can be discarded with :meth:`abort`. The default is a store that leaves nothing to clean up.
        """
        return []


def bytes_like(data: memoryview) -> bytes | bytearray:
    """``data`` as something SDKs accept without copying when possible.

    The pipeline hands out views of its own ``bytearray`` part buffers: a view of a whole buffer returns that
    buffer itself; a partial view (the short last part, a small checkpoint) is copied, at most one part.
    """
    if isinstance(data.obj, bytearray) and data.nbytes == len(data.obj):
        return data.obj
    return data.tobytes()


class ViewReader(io.RawIOBase):
    """A read-only, seekable file over a memoryview, for SDKs that stream a file body: no copy of the whole part.

    Example:
        >>> r = ViewReader(memoryview(b"hello world"))
        >>> r.read(5), len(r), r.seek(6), r.read()
        (b'hello', 11, 6, b'world')
    """

    def __init__(self, data: memoryview) -> None:
        super().__init__()
        self._view = data.cast("B") if data.format != "B" or data.ndim != 1 else data
        self._pos = 0

    def __len__(self) -> int:
        return len(self._view)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, min(base + offset, len(self._view)))
        return self._pos

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        n = min(len(buffer), len(self._view) - self._pos)
        memoryview(buffer).cast("B")[:n] = self._view[self._pos : self._pos + n]
        self._pos += n
        return n

    def read(self, size: int | None = -1) -> bytes:
        end = len(self._view) if size is None or size < 0 else min(self._pos + size, len(self._view))
        chunk = self._view[self._pos : end].tobytes()
        self._pos = end
        return chunk
