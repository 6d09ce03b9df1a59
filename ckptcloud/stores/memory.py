"""An in-process store with S3-like multipart semantics: for unit tests, the contract suite and examples."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ckptcloud.errors import ObjectChangedError
from ckptcloud.stores.base import GiB, IncompleteUpload, MiB, ObjectInfo, Precondition, Store, StoreLimits


@dataclass
class _Upload:
    key: str
    metadata: dict[str, str]
    parts: dict[int, bytes] = field(default_factory=dict)
    started: float = field(default_factory=time.time)


class MemoryStore(Store):
    """Objects in a dict. Incomplete uploads are kept (and listable) until completed or aborted, like S3.

    Versions work like GCS generations: each object stored under a key (by ``put``, ``complete``, or assigning
    ``objects[key]``) gets a new one, which ``head`` returns and ``read(..., version=...)`` checks.

    Example:
        >>> store = MemoryStore("bucket")
        >>> store.put("a.pt", memoryview(b"abc"), {})
        >>> [o.key for o in store.list("")]
        ['a.pt']
    """

    scheme = "mem"
    limits = StoreLimits(min_part_size=5 * MiB, max_part_size=5 * GiB, max_parts=10_000)

    def __init__(self, bucket: str = "bucket", *, min_part_size: int | None = None) -> None:
        self.bucket = bucket
        if min_part_size is not None:
            self.limits = StoreLimits(min_part_size, 5 * GiB, 10_000)
        self.objects: dict[str, tuple[bytes, dict[str, str], float]] = {}
        self.uploads: dict[str, _Upload] = {}
        self.requests: list[str] = []
        self._versions: dict[str, tuple[bytes, str]] = {}  # key -> (the body that version names, version)
        self._generation = 0
        self._lock = threading.Lock()

    def _log(self, op: str) -> None:
        with self._lock:
            self.requests.append(op)

    def _version(self, key: str) -> str:
        """The version of the object now at ``key`` (the lock is held): a new one whenever its body was replaced."""
        body = self.objects[key][0]
        known = self._versions.get(key)
        if known is None or known[0] is not body:
            self._generation += 1
            known = self._versions[key] = (body, str(self._generation))
        return known[1]

    def check_bucket(self) -> None:
        self._log("check_bucket")

    def put(self, key: str, data: memoryview, metadata: Mapping[str, str], when: Precondition | None = None) -> None:
        self._log("put")
        with self._lock:
            self._check_condition(key, when)
            self.objects[key] = (bytes(data), dict(metadata), time.time())
            self._version(key)

    def begin(self, key: str, metadata: Mapping[str, str]) -> Any:
        self._log("begin")
        upload_id = uuid.uuid4().hex
        with self._lock:
            self.uploads[upload_id] = _Upload(key, dict(metadata))
        return upload_id

    def put_part(self, upload: Any, number: int, data: memoryview) -> Any:
        self._log("put_part")
        with self._lock:
            self.uploads[upload].parts[number] = bytes(data)
        return number

    def complete(self, upload: Any, parts: list[Any], when: Precondition | None = None) -> None:
        self._log("complete")
        with self._lock:
            self._check_condition(self.uploads[upload].key, when)
            state = self.uploads.pop(upload)
            sizes = [len(state.parts[n]) for n in parts]
            if any(size < self.limits.min_part_size for size in sizes[:-1]):
                raise ValueError(f"EntityTooSmall: part sizes {sizes}")
            body = b"".join(state.parts[n] for n in parts)
            self.objects[state.key] = (body, state.metadata, time.time())
            self._version(state.key)

    def _check_condition(self, key: str, when: Precondition | None) -> None:
        if when is not None and (self._version(key) if key in self.objects else None) != when.version:
            raise ObjectChangedError(f"{self.url(key)} is not the version the write was conditional on")

    def abort(self, upload: Any) -> None:
        self._log("abort")
        with self._lock:
            self.uploads.pop(upload, None)

    def head(self, key: str) -> ObjectInfo:
        with self._lock:
            if key not in self.objects:
                raise FileNotFoundError(f"no object at {self.url(key)}")
            body, meta, mtime = self.objects[key]
            return ObjectInfo(key, len(body), mtime, dict(meta), self._version(key))

    def read(self, key: str, start: int = 0, end: int | None = None, *, version: str | None = None) -> Iterator[bytes]:
        self._log("read")
        with self._lock:
            if key not in self.objects:
                raise FileNotFoundError(f"no object at {self.url(key)}")
            if version is not None and self._version(key) != version:
                raise ObjectChangedError(f"{self.url(key)} was replaced while it was read (version {version} is gone)")
            body = self.objects[key][0]
        yield body[start:end]

    def delete(self, key: str) -> None:
        self._log("delete")
        with self._lock:
            self.objects.pop(key, None)
            self._versions.pop(key, None)

    def delete_many(self, keys: list[str]) -> None:
        """Delete every key in one request, like S3's ``DeleteObjects`` (logged once as ``delete_many``)."""
        self._log("delete_many")
        with self._lock:
            for key in keys:
                self.objects.pop(key, None)
                self._versions.pop(key, None)

    def list_incomplete(self, prefix: str) -> list[IncompleteUpload]:
        with self._lock:
            return [
                IncompleteUpload(u.key, uid, u.started)
                for uid, u in self.uploads.items()
                if u.key.startswith(prefix) and "/" not in u.key[len(prefix) :]
            ]

    def list(self, prefix: str) -> list[ObjectInfo]:
        with self._lock:
            return [
                ObjectInfo(key, len(body), mtime, meta)
                for key, (body, meta, mtime) in sorted(self.objects.items())
                if key.startswith(prefix)
            ]
