"""The upload and download pipeline shared by every remote store: buffering, threads, the memory bound, abort.

Upload (``PartWriter``): ``torch.save`` writes into a write-only stream. Bytes are copied into part buffers of
``part_size`` taken from a pool of ``max_concurrency + 1`` buffers; a full buffer is uploaded by a worker thread
and returns to the pool when its request ends. ``write`` blocks while every buffer is in flight, so::

    peak extra memory <= (max_concurrency + 1) * part_size  (+ the SDKs' own small per-request buffers)

No view of the caller's memory outlives a ``write`` call (``torch.save`` hands over each tensor as one memoryview
of live memory). A stream that never fills a part is sent with one ``put``; otherwise the multipart upload begins
with the first full part and is either completed once (``commit``) or aborted (``abort``, on any exception).

Download (``download_to_file``): one streaming GET, or up to ``max_concurrency`` ranged GETs written with
``os.pwrite`` into a file, so a load never holds a second in-memory copy of the checkpoint. Every range, and every
retry of one, is pinned to the version ``head()`` saw, so the file holds exactly one version of the object.

Cancellation: each upload and download shares one ``threading.Event`` with its requests' retries. The first
failure, ``abort`` or Ctrl-C sets it: queued requests never start, retries stop waiting, ranges stop at their next
chunk, so a failure is reported at once rather than after the other requests' retries.
"""

from __future__ import annotations

import io
import logging
import math
import os
import queue
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_EXCEPTION, CancelledError, Future, ThreadPoolExecutor, wait
from typing import IO, Any

from ckptcloud.errors import ObjectChangedError, TransientError
from ckptcloud.retry import Retry
from ckptcloud.stores.base import ObjectInfo, Store, StoreLimits

logger = logging.getLogger("ckptcloud")

Progress = Callable[[int, "int | None"], None]
"""``progress(bytes_done, bytes_total)``: called from worker threads as parts/ranges finish; total may be None."""


class _Meter:
    """Thread-safe byte counter that reports to a progress callback."""

    def __init__(self, progress: Progress | None, total: int | None) -> None:
        self._progress, self.total, self.done = progress, total, 0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        """Count ``n`` more bytes and report the total. Reports are serialized (the callback runs under the lock),
        so ``bytes_done`` never goes backwards and the last report is the final count."""
        if self._progress is None:
            return
        with self._lock:
            self.done += n
            self._progress(self.done, self.total)


def choose_part_size(limits: StoreLimits, part_size: int, expected_size: int) -> int:
    """``part_size``, raised (aligned) so that ``expected_size`` bytes fit in the store's part-count limit."""
    needed = math.ceil(expected_size * 1.05 / limits.max_parts)
    size = max(part_size, needed)
    align = limits.part_alignment
    size = math.ceil(size / align) * align
    if size > limits.max_part_size:
        raise ValueError(
            f"a checkpoint of about {expected_size} bytes does not fit in {limits.max_parts} parts of at most "
            f"{limits.max_part_size} bytes"
        )
    return size


class PartWriter(io.RawIOBase):
    """Write-only stream that uploads what is written to ``store`` at ``key`` in parts, with bounded memory.

    Call :meth:`commit` after the last write, or :meth:`abort` on failure; nothing is visible at ``key`` before
    ``commit`` returns.

    Example:
        >>> from ckptcloud.stores.memory import MemoryStore
        >>> store = MemoryStore("bucket", min_part_size=4)
        >>> w = PartWriter(store, "k", part_size=4, max_concurrency=2)
        >>> _ = w.write(b"hello world")
        >>> w.commit()
        >>> b"".join(store.read("k"))
        b'hello world'
    """

    def __init__(
        self,
        store: Store,
        key: str,
        *,
        part_size: int,
        max_concurrency: int,
        metadata: Mapping[str, str] | None = None,
        retry: Retry | None = None,
        progress: Progress | None = None,
        expected_size: int | None = None,
        claim: Callable[[ObjectInfo], None] | None = None,
    ) -> None:
        super().__init__()
        self._claim = claim
        self._meter = _Meter(progress, expected_size)
        self._retry = retry or Retry()
        self._store = store
        self._key = key
        self._part_size = part_size
        self._max_concurrency = max_concurrency
        self._metadata = dict(metadata or {})
        self._pool: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        self._buffers_made = 0
        self._buf: bytearray | None = None
        self._fill = 0
        self._upload: Any = None
        self._executor: ThreadPoolExecutor | None = None
        self._futures: list[Future[Any]] = []
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._cancel = threading.Event()  # set by the first part failure or abort(): the other parts stop
        self._done = False
        self.parts = 0

    @property
    def _url(self) -> str:
        return self._store.url(self._key)

    # --------------------------------------------------------------------------------------- io.RawIOBase
    def writable(self) -> bool:
        return True

    @property
    def failure(self) -> BaseException | None:
        """The first exception raised by a write or a part upload.

        ``torch.save`` replaces an exception raised inside ``write`` by its own ``RuntimeError``; callers re-raise
        this one instead so the user sees the real cause.
        """
        with self._lock:
            return self._error

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        try:
            return self._write(data)
        except BaseException as err:
            with self._lock:
                if self._error is None:
                    self._error = err
            raise

    def _write(self, data: bytes | bytearray | memoryview) -> int:
        if self._done:
            raise ValueError("write to a PartWriter that was committed or aborted")
        view = memoryview(data).cast("B")
        total = len(view)
        pos = 0
        while pos < total:
            if self._buf is None:
                self._buf = self._take_buffer()
                self._fill = 0
            take = min(self._part_size - self._fill, total - pos)
            self._buf[self._fill : self._fill + take] = view[pos : pos + take]
            self._fill += take
            pos += take
            if self._fill == self._part_size:
                self._submit_part()
        view.release()
        return total

    # ------------------------------------------------------------------------------------------ buffers
    def _take_buffer(self) -> bytearray:
        self._raise_if_failed()
        try:
            return self._pool.get_nowait()
        except queue.Empty:
            pass
        if self._buffers_made < self._max_concurrency + 1:
            self._buffers_made += 1
            return bytearray(self._part_size)
        buf = self._pool.get()  # blocks until a part upload finishes: this is the memory bound
        self._raise_if_failed()
        return buf

    def _raise_if_failed(self) -> None:
        with self._lock:
            error = self._error
        if error is not None:
            raise error

    def _submit_part(self) -> None:
        assert self._buf is not None
        if self._upload is None:
            self._upload = self._retry.call(
                lambda: self._store.begin(self._key, self._metadata),
                f"starting the upload to {self._url}",
                self._cancel,
            )
            self._executor = ThreadPoolExecutor(self._max_concurrency, thread_name_prefix="ckptcloud-part")
        assert self._executor is not None
        self.parts += 1
        max_parts = self._store.limits.max_parts
        if self.parts > max_parts:
            raise ValueError(
                f"checkpoint needs more than {max_parts} parts of {self._part_size} bytes: raise `part_size`"
            )
        buf, fill, number = self._buf, self._fill, self.parts
        self._buf, self._fill = None, 0
        self._futures.append(self._executor.submit(self._upload_part, number, buf, fill))

    def _upload_part(self, number: int, buf: bytearray, fill: int) -> Any:
        try:
            with self._lock:
                if self._error is not None or self._done:
                    return None
            view = memoryview(buf)[:fill] if fill < len(buf) else memoryview(buf)
            with view:
                token = self._retry.call(
                    lambda: self._store.put_part(self._upload, number, view),
                    f"part {number} of {self._url}",
                    self._cancel,
                )
            self._meter.add(fill)
            return token
        except BaseException as err:
            with self._lock:
                if self._error is None and not self._cancel.is_set():  # not a part stopped by the cancel
                    self._error = err
            self._cancel.set()  # the other parts stop retrying: this failure is reported now
            raise
        finally:
            self._pool.put(buf)

    # ---------------------------------------------------------------------------------- commit and abort
    def commit(self) -> None:
        """Upload what is left and publish the object, once. Raises the first part failure, if any."""
        if self._done:
            raise ValueError("PartWriter.commit called twice")
        if self._upload is None:
            view = memoryview(self._buf or b"")[: self._fill]
            with view:
                self._publish(lambda **if_: self._store.put(self._key, view, self._metadata, **if_), "uploading")
            self._meter.add(self._fill)
            self._finish()
            return
        if self._fill:
            self._submit_part()
        wait(self._futures, return_when=FIRST_EXCEPTION)  # a failed part cancels the others: no waiting them out
        self._raise_if_failed()
        tokens = [future.result() for future in self._futures]
        self._publish(lambda **if_: self._store.complete(self._upload, tokens, **if_), "completing")
        self._finish()

    def _publish(self, send: Callable[..., None], what: str) -> None:
        """Make the object visible with ``send(**condition)``.

        Without ``claim``, unconditionally. With it, as a new object (``if_absent``); if one is already there,
        ``claim(its info)`` decides (it raises to refuse), and the write replaces exactly the version it judged
        (``if_version``), so a concurrent writer can never be overwritten unseen.
        """
        doing = f"{what} {self._url}"
        if self._claim is None:
            self._retry.call(send, doing, self._cancel)
            return
        try:
            self._retry.call(lambda: send(if_absent=True), doing, self._cancel)
        except ObjectChangedError:
            info = self._retry.call(lambda: self._store.head(self._key), f"reading {self._url}", self._cancel)
            self._claim(info)
            self._retry.call(lambda: send(if_version=info.version), doing, self._cancel)

    def abort(self) -> None:
        """Cancel the parts, wait for the requests in flight, discard the upload and release the buffers.

        Queued parts never start and running ones stop retrying. A failed store abort is only logged (leftovers
        can be cleaned up later); the caller's error matters more. A ``KeyboardInterrupt`` or ``SystemExit``
        that arrives while this waits for the running parts is re-raised, but only after the store abort was sent
        and the buffers were released.
        """
        if self._done:
            return
        with self._lock:
            self._done = True
        self._cancel.set()
        interrupted: BaseException | None = None
        if self._executor is not None:
            try:
                self._executor.shutdown(wait=True, cancel_futures=True)
            except BaseException as err:  # Ctrl-C while a part finishes its request: still discard the upload
                interrupted = err
        try:
            if self._upload is not None:
                try:
                    self._retry.call(lambda: self._store.abort(self._upload), f"aborting the upload to {self._url}")
                except Exception as err:
                    logger.warning("could not abort the upload to %s: %s", self._store.url(self._key), err)
        finally:
            self._release()
        if interrupted is not None:
            raise interrupted

    def _finish(self) -> None:
        self._done = True
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._release()

    def _release(self) -> None:
        self._buf = None
        while True:
            try:
                self._pool.get_nowait()
            except queue.Empty:
                break
        self._futures.clear()


def download_to_file(
    store: Store,
    key: str,
    file: IO[bytes],
    *,
    part_size: int,
    max_concurrency: int,
    retry: Retry | None = None,
    progress: Progress | None = None,
) -> int:
    """Download ``key`` into the real file ``file`` (it needs a ``fileno``); returns the byte count.

    One streaming GET when the object fits in one part or ``max_concurrency == 1``; otherwise at most
    ``max_concurrency`` ranged GETs of equal size, each written at its offset with ``os.pwrite``.

    Every request, retries included, is pinned to the version ``head()`` returned, so the file holds exactly one
    version. If the object is replaced mid-load, the download starts over once from a fresh ``head()`` (progress
    then counts from 0 again); if it is replaced again, :class:`~ckptcloud.errors.ObjectChangedError` is raised.
    The first failure, or Ctrl-C, stops every range at its next chunk and is raised once they have all stopped.
    """
    retry = retry or Retry()
    options: dict[str, Any] = {"part_size": part_size, "max_concurrency": max_concurrency, "retry": retry}
    try:
        return _download_version(store, key, file.fileno(), progress=progress, **options)
    except ObjectChangedError:
        logger.info("%s was replaced while it was loaded; loading the new version", store.url(key))
    try:
        return _download_version(store, key, file.fileno(), progress=progress, **options)
    except ObjectChangedError as err:
        raise ObjectChangedError(
            f"{store.url(key)} kept changing while it was loaded (it was replaced during two loads in a row); "
            "nothing is damaged: load it again once it is no longer being overwritten"
        ) from err


def _download_version(
    store: Store, key: str, fd: int, *, part_size: int, max_concurrency: int, retry: Retry, progress: Progress | None
) -> int:
    """One download attempt of the version ``head()`` returns now (see :func:`download_to_file`)."""
    url = store.url(key)
    info = retry.call(lambda: store.head(key), f"reading the size of {url}")
    size = info.size
    pin: dict[str, Any] = {"version": info.version} if info.version is not None else {}
    meter = _Meter(progress, size)
    os.ftruncate(fd, size)
    if size <= part_size or max_concurrency == 1:
        ranges = [(0, size)]
    else:
        step = max(part_size, math.ceil(size / max_concurrency))
        ranges = [(start, min(start + step, size)) for start in range(0, size, step)]
    cancel = threading.Event()
    failures: list[BaseException] = []
    lock = threading.Lock()

    def fetch(start: int, end: int) -> None:
        offset = start

        def resume() -> None:  # a retry continues from the last byte written, pinned to the same version
            nonlocal offset
            chunks = store.read(key, offset, end, **pin)
            try:
                for chunk in chunks:
                    if cancel.is_set():
                        raise CancelledError(f"downloading {url} was cancelled")
                    view = memoryview(chunk)
                    while view:
                        written = os.pwrite(fd, view, offset)
                        offset += written
                        meter.add(written)
                        view = view[written:]
            finally:
                close = getattr(chunks, "close", None)  # ends the request now, also when we stop early
                if close is not None:
                    close()
            if offset != end:
                raise TransientError(f"short read of {url}: got bytes {start}..{offset}, expected ..{end}")

        try:
            retry.call(resume, f"downloading bytes {start}..{end} of {url}", cancel)
        except BaseException as err:
            with lock:
                if not cancel.is_set():  # the first failure; the ranges it stops fail with CancelledError
                    failures.append(err)
                cancel.set()
            raise

    if len(ranges) == 1:
        fetch(*ranges[0])
        return size
    executor = ThreadPoolExecutor(len(ranges), thread_name_prefix="ckptcloud-get")
    futures = [executor.submit(fetch, start, end) for start, end in ranges]
    try:
        wait(futures, return_when=FIRST_EXCEPTION)
    finally:  # on a failure or Ctrl-C: stop every range, and let none write to the file after we return
        cancel.set()
        executor.shutdown(wait=True, cancel_futures=True)
    if failures:
        raise failures[0]
    return size
