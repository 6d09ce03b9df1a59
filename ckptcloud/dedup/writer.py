"""``BlobWriter``: the stream ``torch.save`` writes into for a deduplicated save.

Small writes are appended to the manifest's inline bytes. A write of :data:`~.manifest.INLINE_MAX` bytes or more is
a tensor storage (``torch.save`` hands each storage over as one write): it is cut into chunks of ``chunk_size``,
each hashed (BLAKE3) and checksummed (CRC32C) in place. A chunk whose hash the index holds fresh (see
:mod:`.blobs`) costs no request; any other is copied into one of ``max_concurrency + 1`` chunk buffers and stored
by a worker thread with a conditional create, so peak extra memory is ``(max_concurrency + 1) * chunk_size`` as in
:mod:`ckptcloud.streaming`. A create that finds the blob already stored (another writer stored the same bytes)
reuses it if that copy is fresh, else stores a fresh copy under a new name.
"""

from __future__ import annotations

import io
import queue
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from ckptcloud.checksum import crc32c
from ckptcloud.dedup.blobs import Blob, BlobIndex, fresh_copy_name
from ckptcloud.dedup.hashing import blob_hash
from ckptcloud.dedup.manifest import INLINE_MAX
from ckptcloud.errors import ObjectChangedError
from ckptcloud.retry import Retry
from ckptcloud.stores.base import Precondition, Store


class BlobWriter(io.RawIOBase):
    """Write-only stream: inline bytes for the manifest, blobs uploaded at most once.

    After ``torch.save``, call :meth:`finish` (waits for the uploads; raises the first failure), then read
    :attr:`segments`, :attr:`inline` and :attr:`births`. :meth:`abort` stops the uploads after a failure.

    Example:
        >>> from ckptcloud.stores.memory import MemoryStore
        >>> store, index = MemoryStore(), BlobIndex(grace=3600.0)
        >>> w = BlobWriter(store, "run/.blobs/", index, chunk_size=1 << 20, max_concurrency=2)
        >>> _ = w.write(b"header"); _ = w.write(bytes(100_000)); w.finish()
        >>> [segment[0] for segment in w.segments], w.uploaded_bytes
        (['inline', 'blob'], 100000)
    """

    def __init__(
        self,
        store: Store,
        folder: str,
        index: BlobIndex,
        *,
        chunk_size: int,
        max_concurrency: int,
        retry: Retry | None = None,
        names: Mapping[int, str] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__()
        self._store, self._folder, self._index = store, folder, index
        self._chunk, self._max = chunk_size, max_concurrency
        self._retry = retry or Retry()
        self._names = dict(names or {})
        self._progress = progress
        self.segments: list[list[Any]] = []
        self.inline = bytearray()
        self.births: dict[str, float] = {}  # blob name -> birth, for every blob the manifest will reference
        self.uploaded_bytes = 0
        self.reused_bytes = 0
        self._offset = 0
        self._pool: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        self._made = 0
        self._executor = ThreadPoolExecutor(max_concurrency, thread_name_prefix="ckptcloud-blob")
        self._futures: list[Future[None]] = []
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._in_flight: dict[str, list[list[Any]]] = {}  # digest -> the segments waiting for its upload
        self.failure: BaseException | None = None

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        try:
            return self._write(memoryview(data).cast("B"))
        except BaseException as err:
            self._fail(err)
            raise

    def _write(self, view: memoryview) -> int:
        self._raise_if_failed()
        total = len(view)
        if total < INLINE_MAX:
            last = self.segments[-1] if self.segments else None
            if last is not None and last[0] == "inline":
                last[2] += total
            else:
                self.segments.append(["inline", self._offset, total, len(self.inline)])
            self.inline += view
        else:
            tensor = self._names.get(_address(view), f"the storage at byte {self._offset} of the torch.save stream")
            for start in range(0, total, self._chunk):
                self._blob(view[start : start + self._chunk], self._offset + start, tensor)
        self._offset += total
        return total

    def _blob(self, chunk: memoryview, offset: int, tensor: str) -> None:
        digest, crc = blob_hash(chunk), crc32c(chunk)
        known = self._index.reusable(digest)
        if known is not None:
            self.segments.append(["blob", offset, len(chunk), known.name, crc, tensor])
            self.births[known.name] = known.birth
            self.reused_bytes += len(chunk)
            if self._progress is not None:
                self._progress(len(chunk))
            return
        segment = ["blob", offset, len(chunk), digest, crc, tensor]
        self.segments.append(segment)
        with self._lock:
            twins = self._in_flight.get(digest)
            if twins is not None:  # the same bytes earlier in this save, still uploading: named when it is stored
                twins.append(segment)
                self.reused_bytes += len(chunk)
                return
            self._in_flight[digest] = [segment]
        buf = self._take_buffer()
        buf[: len(chunk)] = chunk
        self._futures.append(self._executor.submit(self._store_blob, digest, buf, len(chunk)))

    def _store_blob(self, digest: str, buf: bytearray, size: int) -> None:
        try:
            if self._cancel.is_set():
                return
            view = memoryview(buf)[:size]
            blob = self._create(digest, digest, view)
            if blob is None:  # stored by another writer: reuse it if fresh, else store a copy under a new name
                blob = self._existing(digest)
                if blob is not None:
                    with self._lock:
                        self.reused_bytes += size
                    if self._progress is not None:
                        self._progress(size)
            if blob is None:
                blob = self._create(digest, fresh_copy_name(digest), view)
                assert blob is not None, "a fresh copy name is used once"
            view.release()
            self._index.add(digest, blob)
            with self._lock:
                for segment in self._in_flight.pop(digest):
                    segment[3] = blob.name
                self.births[blob.name] = blob.birth
        except BaseException as err:
            self._fail(err)
            raise
        finally:
            self._pool.put(buf)

    def _create(self, digest: str, name: str, view: memoryview) -> Blob | None:
        """Store ``view`` as blob ``name`` if no object is there; ``None`` if one is."""
        key = self._folder + name
        birth = time.time()  # before the request: the store's last-modified time is later (up to clock skew)
        try:
            self._retry.call(
                lambda: self._store.put(key, view, {"ckptcloud_blob": digest[:16]}, Precondition()),
                f"storing blob {self._store.url(key)}",
                self._cancel,
            )
        except ObjectChangedError:
            return None
        with self._lock:
            self.uploaded_bytes += len(view)
        if self._progress is not None:
            self._progress(len(view))
        return Blob(name, birth)

    def _existing(self, digest: str) -> Blob | None:
        """The stored copy named ``digest``, if it is fresh enough to reuse."""
        key = self._folder + digest
        try:
            info = self._retry.call(lambda: self._store.head(key), f"reading {self._store.url(key)}", self._cancel)
        except FileNotFoundError:  # deleted since (an old copy GC collected): store a new copy
            return None
        if info.last_modified is None:
            return None
        self._index.add(digest, Blob(digest, info.last_modified))
        return self._index.reusable(digest)

    def _take_buffer(self) -> bytearray:
        try:
            return self._pool.get_nowait()
        except queue.Empty:
            pass
        if self._made < self._max + 1:
            self._made += 1
            return bytearray(self._chunk)
        buf = self._pool.get()  # blocks until an upload ends: the memory bound
        self._raise_if_failed()
        return buf

    def _fail(self, err: BaseException) -> None:
        with self._lock:
            if self.failure is None and not self._cancel.is_set():
                self.failure = err
        self._cancel.set()

    def _raise_if_failed(self) -> None:
        with self._lock:
            failure = self.failure
        if failure is not None:
            raise failure

    def finish(self) -> None:
        """Wait for every blob upload; raise the first failure."""
        for future in self._futures:
            try:
                future.result()
            except BaseException:
                break
        self._executor.shutdown(wait=True)
        self._raise_if_failed()
        self._release()

    def abort(self) -> None:
        """Stop queued uploads and wait for the running ones (blobs already stored stay, unreferenced)."""
        self._cancel.set()
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._release()

    def _release(self) -> None:
        while True:
            try:
                self._pool.get_nowait()
            except queue.Empty:
                break


def _address(view: memoryview) -> int:
    """The address of the memory ``view`` shows (to name the tensor it belongs to); 0 if unknown."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "the given buffer is not writable": nothing writes through it
            return int(torch.frombuffer(view, dtype=torch.uint8).data_ptr())
    except (ValueError, TypeError, RuntimeError):
        return 0
