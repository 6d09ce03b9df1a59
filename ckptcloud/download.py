"""The download pipeline shared by every remote store: ranged GETs into a file, pinned to one object version.

``download_to_file``: one streaming GET, or up to ``max_concurrency`` ranged GETs written with ``os.pwrite`` into a
file, so a load never holds a second in-memory copy of the checkpoint. Every range, and every retry of one, is
pinned to the version ``head()`` saw, so the file holds exactly one version of the object; if the object changes,
the download restarts once from the new version.

Cancellation: the ranges share one ``threading.Event`` with their retries. The first failure or Ctrl-C sets it:
retries stop waiting and ranges stop at their next chunk, so a failure is reported at once.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from concurrent.futures import FIRST_EXCEPTION, CancelledError, ThreadPoolExecutor, wait
from typing import IO, Any

from ckptcloud.errors import ObjectChangedError, TransientError
from ckptcloud.retry import Retry
from ckptcloud.stores.base import Store
from ckptcloud.streaming import Meter, Progress

logger = logging.getLogger("ckptcloud")


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
    meter = Meter(progress, size)
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
