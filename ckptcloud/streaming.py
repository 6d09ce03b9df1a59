"""The upload pipeline shared by every remote store: buffering, threads, the memory bound, commit or abort.

Upload (``PartWriter``): ``torch.save`` writes into a write-only stream. Bytes are copied into part buffers of
``part_size`` taken from a pool of ``max_concurrency + 1`` buffers; a full buffer is uploaded by a worker thread
and returns to the pool when its request ends. ``write`` blocks while every buffer is in flight, so::

    peak extra memory <= (max_concurrency + 1) * part_size  (+ the SDKs' own small per-request buffers)

No view of the caller's memory outlives a ``write`` call (``torch.save`` hands over each tensor as one memoryview
of live memory). A stream that never fills a part is sent with one ``put``; otherwise the multipart upload begins
with the first full part and is either completed once (``commit``) or aborted (``abort``, on any exception).

Downloads are in :mod:`ckptcloud.download`.

Cancellation: each upload shares one ``threading.Event`` with its requests' retries. The first failure, ``abort``
or Ctrl-C sets it: queued parts never start and retries stop waiting, so a failure is reported at once rather than
after the other parts' retries.
"""

from __future__ import annotations

import ctypes
import io
import logging
import math
import queue
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import Any

from ckptcloud.errors import ObjectChangedError
from ckptcloud.retry import Retry
from ckptcloud.stores.base import ObjectInfo, Precondition, Store, StoreLimits

logger = logging.getLogger("ckptcloud")

Progress = Callable[[int, "int | None"], None]
"""``progress(bytes_done, bytes_total)``: called from worker threads as parts/ranges finish; total may be None."""


class Meter:
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


class _PyBuffer(ctypes.Structure):
    """CPython's ``Py_buffer``, to read the address of a (possibly read-only) buffer."""

    _fields_ = (
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    )


GIL_FREE_COPY_MIN = 1024 * 1024
"""Copies into part buffers of at least this many bytes run without the GIL (``ctypes.memmove``)."""


def _make_gil_free_copy() -> Callable[[bytearray, int, memoryview], None] | None:
    """``copy(dst, offset, src)``: ``dst[offset:offset + len(src)] = src`` with the GIL released, or ``None`` where
    ``ctypes.pythonapi`` is missing (not CPython).

    ``bytearray`` slice assignment copies while holding the GIL: a 16 MiB part took 2-5 ms here, during which the
    part threads could not get back from ``sendall`` or start their next request (profiled with py-spy: those
    threads waited for the GIL ~20 % of a save's samples). ``ctypes.memmove`` is a foreign call, which releases it.
    ``torch.save``'s tensor views are read-only, so their address comes from ``PyObject_GetBuffer`` (the caller's
    memoryview keeps the memory alive during the copy).
    """
    try:  # private prototypes (PYFUNCTYPE: called with the GIL), not ctypes.pythonapi's shared attributes
        api = ctypes.pythonapi
        get_buffer = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int)(
            ("PyObject_GetBuffer", api)
        )
        release = ctypes.PYFUNCTYPE(None, ctypes.POINTER(_PyBuffer))(("PyBuffer_Release", api))
    except (AttributeError, OSError):  # pragma: no cover - not CPython
        return None
    memmove = ctypes.memmove  # a foreign call: the GIL is released while it copies

    def copy(dst: bytearray, offset: int, src: memoryview) -> None:
        n = len(src)
        if offset < 0 or offset + n > len(dst) or not src.c_contiguous:
            raise ValueError("copy out of bounds or from a non-contiguous buffer")
        target = (ctypes.c_char * n).from_buffer(dst, offset)  # an export: dst cannot be resized meanwhile
        info = _PyBuffer()
        if get_buffer(src, ctypes.byref(info), 0) != 0:  # PyBUF_SIMPLE: read-only is fine
            raise BufferError("cannot read the buffer's address")
        try:
            memmove(target, info.buf, n)
        finally:
            release(ctypes.byref(info))
            del target

    return copy


_gil_free_copy = _make_gil_free_copy()


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
        self._meter = Meter(progress, expected_size)
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
        self._written = 0
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

    def tell(self) -> int:
        """Bytes written so far: the offset the next write starts at (``torch.distributed.checkpoint`` records
        each item's offset and length this way). Costs nothing: the stream never seeks."""
        return self._written

    def cancel(self, error: BaseException) -> None:
        """Fail this upload from any thread with ``error`` (unless it already failed).

        Queued parts never start, running ones stop retrying, and the thread that writes raises the first error at
        its next ``write`` or ``commit`` (also when it waits for a free buffer); it then calls :meth:`abort`, as
        after any failure. Another rank's failure stops this rank's upload this way.
        """
        with self._lock:
            if self._error is None:
                self._error = error
        self._cancel.set()

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
            if take >= GIL_FREE_COPY_MIN and _gil_free_copy is not None:
                _gil_free_copy(self._buf, self._fill, view[pos : pos + take])
            else:
                self._buf[self._fill : self._fill + take] = view[pos : pos + take]
            self._fill += take
            pos += take
            if self._fill == self._part_size:
                self._submit_part()
        view.release()
        self._written += total
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
        self._raise_if_failed()  # cancelled (cancel()) before anything was sent: publish nothing
        if self._upload is None:
            view = memoryview(self._buf or b"")[: self._fill]
            with view:
                self._publish(lambda when=None: self._store.put(self._key, view, self._metadata, when), "uploading")
            self._meter.add(self._fill)
            self._finish()
            return
        if self._fill:
            self._submit_part()
        wait(self._futures, return_when=FIRST_EXCEPTION)  # a failed part cancels the others: no waiting them out
        self._raise_if_failed()
        tokens = [future.result() for future in self._futures]
        self._publish(lambda when=None: self._store.complete(self._upload, tokens, when), "completing")
        self._finish()

    def _publish(self, send: Callable[..., None], what: str) -> None:
        """Make the object visible with ``send(when)``, ``when`` a :class:`Precondition` or nothing.

        Without ``claim``, unconditionally. With it, as a new object (``Precondition()``); if one is already
        there, ``claim(its info)`` decides (it raises to refuse), and the write replaces exactly the version it
        judged (``Precondition(version)``), so a concurrent writer can never be overwritten unseen.
        """
        doing = f"{what} {self._url}"
        if self._claim is None:
            self._retry.call(send, doing, self._cancel)
            return
        try:
            self._retry.call(lambda: send(Precondition()), doing, self._cancel)
        except ObjectChangedError:
            info = self._retry.call(lambda: self._store.head(self._key), f"reading {self._url}", self._cancel)
            self._claim(info)
            self._retry.call(lambda: send(Precondition(info.version)), doing, self._cancel)

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
