"""The store contract: what a cloud adapter implements. No buffering, no threads, no torch, no ranks here.

The pipeline (``ckptcloud.streaming``) calls these methods from worker threads, so an adapter must be safe to
call concurrently (SDK clients are). ``data`` handed to ``put``/``put_part`` is a ``memoryview`` valid only for
the duration of the call.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from ckptcloud.contract import ObjectInfo

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
class Precondition:
    """What a conditional write requires at its key: no object at all (``version=None``), or exactly ``version``
    (the ETag or generation :meth:`Store.head` returned)."""

    version: str | None = None


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
    def put(self, key: str, data: memoryview, metadata: Mapping[str, str], when: Precondition | None = None) -> None:
        """Store ``data`` at ``key`` in one request (small objects).

        ``when`` makes it a conditional write, checked by the store atomically: ``Precondition()`` only creates a
        new object, ``Precondition(version)`` only replaces the version :meth:`head` returned. When it does not
        hold, raise :class:`~ckptcloud.errors.ObjectChangedError`.
        """

    @abstractmethod
    def begin(self, key: str, metadata: Mapping[str, str]) -> Any:
        """Start a multipart upload to ``key``; returns an opaque upload handle."""

    @abstractmethod
    def put_part(self, upload: Any, number: int, data: memoryview) -> Any:
        """Upload part ``number`` (1-based); returns an opaque token that ``complete`` needs."""

    @abstractmethod
    def complete(self, upload: Any, parts: list[Any], when: Precondition | None = None) -> None:
        """Publish the object from the part tokens, in order. The object appears whole, atomically.

        ``when`` as for :meth:`put`; when the precondition fails the parts stay, so ``complete``
        can be called again with another condition.
        """

    @abstractmethod
    def abort(self, upload: Any) -> None:
        """Discard an upload and its parts; nothing appears at the key."""

    @abstractmethod
    def head(self, key: str) -> ObjectInfo:
        """Size, timestamp, user metadata and version of the object at ``key``; ``FileNotFoundError`` if none."""

    @abstractmethod
    def read(self, key: str, start: int = 0, end: int | None = None, *, version: str | None = None) -> Iterator[bytes]:
        """Stream bytes ``[start, end)`` of ``key`` (``end=None``: to the end) as chunks.

        With ``version`` (from :meth:`head`), every request is conditional on it: if the object at ``key`` is no
        longer that version, raise :class:`~ckptcloud.errors.ObjectChangedError`, never bytes of another version.
        """

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete ``key``; a key that is already gone is not an error."""

    def delete_many(self, keys: list[str]) -> None:
        """Delete every key in ``keys`` in as few requests as the store allows; keys already gone are not errors.

        Stores with a batch delete (S3's ``DeleteObjects``, up to 1,000 keys) override this. The default deletes one
        key at a time; :func:`ckptcloud.deleting.delete_keys` (the pipeline) sends those concurrently instead.
        """
        for key in keys:
            self.delete(key)

    @abstractmethod
    def list(self, prefix: str) -> list[ObjectInfo]:
        """Every object whose key starts with ``prefix`` (metadata may be empty where listing does not return it)."""

    def list_incomplete(self, prefix: str) -> list[IncompleteUpload]:
        """Uploads directly under ``prefix`` (not in sub-folders, which may be other runs') that were begun and
        never completed nor aborted (a killed process leaves them).

        Each can be discarded with :meth:`abort`. The default is a store that leaves nothing to clean up.
        """
        return []
