"""The download pipeline shared by every remote store: ranged GETs into a file, pinned to one object version.

``download_to_file``: one streaming GET, or up to ``max_concurrency`` ranged GETs (all in flight at once) written
with ``os.pwrite`` into a file, so a load never holds a second in-memory copy of the checkpoint. Every range, and
every retry of one, is pinned to the version ``head()`` saw, so the file holds exactly one version of the object;
if the object changes, the download restarts once from the new version. Where ``os.pwrite`` is missing, each write
seeks and writes under a lock instead (:func:`pwrite`: the same bytes, one range writing at a time).

Local disk limits: a full disk, a quota or a file-size limit (``ENOSPC``, ``EDQUOT``, ``EFBIG``), or any other
failure to write the local file, raises :class:`LocalWriteError` (an ``OSError`` with the same ``errno``), which
names the object, its size, the folder and what to do (by default: pass ``tmp_dir=`` or set ``TMPDIR``).

Cancellation: the ranges share one ``threading.Event`` with their retries. The first failure or Ctrl-C sets it:
retries stop waiting and ranges stop at their next chunk, so a failure is reported at once.
"""

from __future__ import annotations

import collections
import errno
import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, CancelledError, Future, ThreadPoolExecutor, wait
from typing import IO, Any

from ckptcloud.errors import LocalWriteError, ObjectChangedError, TransientError
from ckptcloud.retry import Retry
from ckptcloud.stores.base import Store
from ckptcloud.streaming import Meter, Progress

logger = logging.getLogger("ckptcloud")

MIN_RANGE_SIZE = 8 * 1024 * 1024
"""The shortest range :func:`download_to_file` splits a download into (or ``part_size``, if smaller): each range
costs a request and its round trip, and 8-16 MiB is where S3 reaches a connection's full speed."""

NEARBY_SECONDS = 0.01
"""A HEAD answered faster than this (10 ms) means a server on this host or LAN (the cloud's first requests take
longer): see ``nearby_concurrency`` of :func:`download_to_file`."""

TMP_DIR_HINT = "free space there, or pass tmp_dir= (or set TMPDIR) to a folder with room"
"""What :func:`download_to_file` suggests by default: its file is a load's temporary file."""


def local_write_error(err: OSError, what: str, where: str, hint: str) -> LocalWriteError:
    """A :class:`LocalWriteError` for ``err``, raised while writing ``what`` into the folder or file ``where``.

    Example:
        >>> import errno
        >>> print(local_write_error(OSError(errno.ENOSPC, "No space left on device"), "a.pt", "/tmp", "free space"))
        could not write a.pt into /tmp (No space left on device): free space
    """
    reason = err.strerror or str(err)
    if err.errno == errno.EFBIG:
        reason += ": more than the file system or the process's file-size limit (ulimit -f) allows"
    message = f"could not write {what} into {where} ({reason}): {hint}"
    return LocalWriteError(err.errno or 0, err.strerror or str(err), where, message)


def _folder_of(file: IO[bytes], fd: int) -> str:
    """The folder ``file`` lives in, for messages; also for a ``TemporaryFile``, which has no name."""
    name = getattr(file, "name", None)
    if isinstance(name, str) and os.path.isabs(name):
        return os.path.dirname(name)
    try:  # Linux: "/tmp/#1234 (deleted)" for an unnamed temporary file
        return os.path.dirname(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        pass
    try:  # macOS
        import fcntl

        path = fcntl.fcntl(fd, fcntl.F_GETPATH, bytes(1024)).split(b"\0", 1)[0]  # type: ignore[attr-defined]
        if path:
            return os.path.dirname(os.fsdecode(path))
    except (ImportError, AttributeError, OSError):
        pass
    return f"the temporary folder (TMPDIR, here {tempfile.gettempdir()}, unless tmp_dir= says otherwise)"


_seek_write_lock = threading.Lock()


def pwrite(fd: int, data: memoryview, offset: int) -> int:
    """``os.pwrite``; where it is missing, ``lseek`` then ``write`` under one lock (the ranges take turns)."""
    native = getattr(os, "pwrite", None)
    if native is not None:
        return native(fd, data, offset)
    with _seek_write_lock:
        os.lseek(fd, offset, os.SEEK_SET)
        return os.write(fd, data)


def download_to_file(
    store: Store,
    key: str,
    file: IO[bytes],
    *,
    part_size: int,
    max_concurrency: int,
    retry: Retry | None = None,
    progress: Progress | None = None,
    space_hint: str = TMP_DIR_HINT,
    nearby_concurrency: int | None = None,
) -> int:
    """Download ``key`` into the real file ``file`` (it needs a ``fileno``); returns the byte count.

    One streaming GET when the object fits in one part or ``max_concurrency == 1``; otherwise up to
    ``max_concurrency`` ranged GETs of equal size, all in flight at once, each written at its offset with
    ``os.pwrite`` as it arrives (memory per range: one 1 MiB chunk). Ranges are at least
    ``min(part_size, MIN_RANGE_SIZE)`` long, so small objects take fewer requests.

    Every request, retries included, is pinned to the version ``head()`` returned, so the file holds exactly one
    version. If the object is replaced mid-load, the download starts over once from a fresh ``head()`` (progress
    then counts from 0 again); if it is replaced again, :class:`~ckptcloud.errors.ObjectChangedError` is raised.
    The first failure, or Ctrl-C, stops every range at its next chunk and is raised once they have all stopped.

    ``nearby_concurrency``: when given and the HEAD was answered within :data:`NEARBY_SECONDS` (a server on this
    host or LAN, where a connection is not the bottleneck), at most this many ranges: more would only add threads
    competing for the CPU (measured on loopback: 32 ranges took 1.3-1.8x the time of 8).

    Raises:
        LocalWriteError: ``file`` could not be written (full disk, quota, file-size limit, ...): "could not write
            the N-byte download of URL into FOLDER (No space left on device): " + ``space_hint``. Callers that
            download somewhere else than a load's temporary file pass their own ``space_hint``.
    """
    retry = retry or Retry()
    fd = file.fileno()
    options: dict[str, Any] = {"part_size": part_size, "max_concurrency": max_concurrency, "retry": retry}
    options["nearby_concurrency"] = nearby_concurrency
    options["local_error"] = lambda err, size: local_write_error(
        err, f"the {size}-byte download of {store.url(key)}", _folder_of(file, fd), space_hint
    )
    try:
        return _download_version(store, key, fd, progress=progress, **options)
    except ObjectChangedError:
        logger.info("%s was replaced while it was loaded; loading the new version", store.url(key))
    try:
        return _download_version(store, key, fd, progress=progress, **options)
    except ObjectChangedError as err:
        raise ObjectChangedError(
            f"{store.url(key)} kept changing while it was loaded (it was replaced during two loads in a row); "
            "nothing is damaged: load it again once it is no longer being overwritten"
        ) from err


def _download_version(
    store: Store,
    key: str,
    fd: int,
    *,
    part_size: int,
    max_concurrency: int,
    retry: Retry,
    progress: Progress | None,
    local_error: Callable[[OSError, int], LocalWriteError],
    nearby_concurrency: int | None,
) -> int:
    """One download attempt of the version ``head()`` returns now (see :func:`download_to_file`)."""
    url = store.url(key)
    asked = time.monotonic()
    info = retry.call(lambda: store.head(key), f"reading the size of {url}")
    answered = time.monotonic()
    if nearby_concurrency is not None and answered - asked < NEARBY_SECONDS:
        max_concurrency = min(max_concurrency, nearby_concurrency)
    size = info.size
    pin: dict[str, Any] = {"version": info.version} if info.version is not None else {}
    meter = Meter(progress, size)
    try:
        os.ftruncate(fd, size)  # EFBIG here for a file-size limit; a full disk fails at a write
    except OSError as err:
        raise local_error(err, size) from err
    ranges = split_ranges(size, part_size, max_concurrency)
    logger.debug("loading %s: HEAD answered in %.1f ms; %d range(s)", url, (answered - asked) * 1000, len(ranges))
    cancel = threading.Event()
    failures: list[BaseException] = []
    lock = threading.Lock()

    def write_at(offset: int, view: memoryview) -> int:
        try:
            return pwrite(fd, view, offset)
        except OSError as err:
            raise local_error(err, size) from err

    def fetch(start: int, end: int) -> None:
        try:
            read_range(store, key, start, end, write_at, retry=retry, cancel=cancel, meter=meter, **pin)
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


def split_ranges(size: int, part_size: int, max_concurrency: int) -> list[tuple[int, int]]:
    """``[start, end)`` ranges covering ``size`` bytes: one when it fits in ``part_size`` or ``max_concurrency`` is
    1, else up to ``max_concurrency`` ranges of equal size, each at least ``min(part_size, MIN_RANGE_SIZE)``.

    Example:
        >>> MiB = 1024 * 1024
        >>> len(split_ranges(256 * MiB, 16 * MiB, 32)), len(split_ranges(256 * MiB, 16 * MiB, 8))
        (32, 8)
        >>> len(split_ranges(40 * MiB, 16 * MiB, 32)), split_ranges(10, 4, 2)
        (5, [(0, 5), (5, 10)])
    """
    if size <= part_size or max_concurrency == 1:
        return [(0, size)]
    step = max(min(part_size, MIN_RANGE_SIZE), math.ceil(size / max_concurrency))
    return [(start, min(start + step, size)) for start in range(0, size, step)]


def read_range(
    store: Store,
    key: str,
    start: int,
    end: int,
    sink: Callable[[int, memoryview], int],
    *,
    retry: Retry,
    cancel: threading.Event,
    meter: Meter,
    version: str | None = None,
) -> None:
    """Read bytes ``[start, end)`` of ``key`` into ``sink(offset, view) -> bytes taken``, retried.

    A retry continues from the last byte the sink took, pinned to ``version`` (when given) like the first request.
    A short read is retried (:class:`~ckptcloud.errors.TransientError`); once ``cancel`` is set, the read stops at
    its next chunk and no retry starts.
    """
    url = store.url(key)
    pin: dict[str, Any] = {"version": version} if version is not None else {}
    offset = start

    def resume() -> None:
        nonlocal offset
        chunks = store.read(key, offset, end, **pin)
        try:
            for chunk in chunks:
                if cancel.is_set():
                    raise CancelledError(f"downloading {url} was cancelled")
                view = memoryview(chunk)
                while view:
                    taken = sink(offset, view)
                    offset += taken
                    meter.add(taken)
                    view = view[taken:]
        finally:
            close = getattr(chunks, "close", None)  # ends the request now, also when we stop early
            if close is not None:
                close()
        if offset != end:
            raise TransientError(f"short read of {url}: got bytes {start}..{offset}, expected ..{end}")

    retry.call(resume, f"downloading bytes {start}..{end} of {url}", cancel)


def fetch_ranges(
    store: Store,
    ranges: Sequence[tuple[str, int, int]],
    *,
    part_size: int,
    max_concurrency: int,
    retry: Retry | None = None,
    progress: Progress | None = None,
) -> Iterator[memoryview]:
    """Ranged GETs into memory: yields the bytes of each ``(key, start, end)`` of ``ranges``, in order.

    Up to ``max_concurrency`` requests run at once; a range longer than ``part_size`` is fetched as several
    concurrent requests of at most ``part_size`` bytes into one buffer. Ranges are fetched ahead while the bytes
    held (fetched or in flight, not yet handed over) stay within ``max_concurrency * part_size``, or one range,
    so peak memory is about ``(max_concurrency + 1) * part_size`` plus the range being used, whatever the total.
    The caller owns each yielded buffer; this function keeps no reference to it once it moves on.

    The first failure (or Ctrl-C, or the caller stopping early) stops every request at its next chunk and starts
    no new one; the failure is raised once they have all stopped. Reads are not pinned to a version: callers read
    objects that never change once written (a sharded checkpoint's data files have names used once).

    Example:
        >>> from ckptcloud.stores.memory import MemoryStore
        >>> store = MemoryStore()
        >>> store.put("a", memoryview(b"0123456789"), {})
        >>> [bytes(view) for view in fetch_ranges(store, [("a", 0, 3), ("a", 5, 10)], part_size=4, max_concurrency=2)]
        [b'012', b'56789']
    """
    retry = retry or Retry()
    meter = Meter(progress, sum(end - start for _, start, end in ranges))
    cancel = threading.Event()
    failures: list[BaseException] = []
    lock = threading.Lock()
    budget = max_concurrency * part_size

    def fetch(key: str, start: int, end: int, into: memoryview) -> None:
        def copy(offset: int, view: memoryview) -> int:
            into[offset - start : offset - start + len(view)] = view
            return len(view)

        try:
            read_range(store, key, start, end, copy, retry=retry, cancel=cancel, meter=meter)
        except BaseException as err:
            with lock:
                if not cancel.is_set():  # the first failure; the requests it stops fail with CancelledError
                    failures.append(err)
                cancel.set()
            raise

    executor = ThreadPoolExecutor(max_concurrency, thread_name_prefix="ckptcloud-get")
    pending: collections.deque[tuple[bytearray, list[Future[None]]]] = collections.deque()
    held = 0
    upcoming = iter(ranges)
    following = next(upcoming, None)
    try:
        while pending or following is not None:
            while following is not None and (not pending or held + following[2] - following[1] <= budget):
                key, start, end = following
                buffer = bytearray(end - start)
                view = memoryview(buffer)
                futures = [
                    executor.submit(fetch, key, piece, min(piece + part_size, end), view[piece - start :])
                    for piece in range(start, end, part_size)
                ]
                pending.append((buffer, futures))
                held += end - start
                following = next(upcoming, None)
            buffer, futures = pending.popleft()
            wait(futures, return_when=FIRST_EXCEPTION)
            if failures:
                break
            held -= len(buffer)
            yield memoryview(buffer)
            del buffer
    finally:  # on a failure, Ctrl-C or the caller stopping: stop every request, and let none write after we return
        cancel.set()
        executor.shutdown(wait=True, cancel_futures=True)
    if failures:
        raise failures[0]
