"""Saves that run in the background: one worker thread, at most one save in flight.

``Checkpoint(..., async_save=True)`` takes a CPU snapshot of the state on the caller's thread (on the writing rank
only, with :meth:`BackgroundWriter.snapshot`, into host buffers reused from save to save), hands the upload to this
writer and returns. The caller's thread finishes each save later - at the next
save, :meth:`~BackgroundWriter.wait` or :meth:`~BackgroundWriter.close` - where every rank agrees on the outcome,
and only then does the kept list change and do evictions run. A background failure is logged when it happens and
raised at that next call.

At interpreter exit a pending save is finished before Python stops its thread pools: the exit hook is registered
with ``threading``'s own exit hooks, which run in reverse order of registration, after ``concurrent.futures``
registered its own, so part uploads can still be scheduled. The exit hook runs no coordination with other ranks
(they may be gone): the writer finishes its upload and its evictions on its own. A failure is printed on stderr.
"""

from __future__ import annotations

import atexit
import concurrent.futures.thread  # noqa: F401  (registers its exit hook first, so that ours runs before it)
import contextlib
import logging
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ckptcloud import distributed
from ckptcloud.snapshot import SnapshotPool

logger = logging.getLogger("ckptcloud")

_in_flight: set[BackgroundWriter] = set()  # writers with a save not yet finished (the exit hook finishes them)
_in_flight_lock = threading.Lock()


class BackgroundWriter:
    """Runs one write at a time on a worker thread; its ``finish`` step runs on the caller's thread.

    Args:
        save_on_rank: the rank whose outcome every rank agrees on.

    Example:
        >>> done = []
        >>> writer = BackgroundWriter(save_on_rank=0)
        >>> writer.submit(lambda: done.append("written"), lambda: done.append("finished"), "demo")
        >>> writer.wait()
        >>> done
        ['written', 'finished']
    """

    def __init__(self, save_on_rank: int) -> None:
        self._save_on_rank = save_on_rank
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="ckptcloud-save")
        self._pending: tuple[Future[None], Callable[[], None], str] | None = None
        self._closed = False
        self.pool = SnapshotPool()  # one buffer set: a save's snapshot is taken after the previous upload ended

    def snapshot(self, obj: Any) -> Any:
        """A CPU snapshot of ``obj`` in the pool's buffers, which stay leased until the next write has read them.

        ``Checkpoint`` takes it after :meth:`wait`, so the upload that read the buffers last is over: one buffer set
        is enough, and a save never waits for memory.
        """
        return self.pool.snapshot(obj)

    def submit(self, write: Callable[[], None], finish: Callable[[], None], what: str) -> None:
        """Finish the previous save (raising its error, if any), then start ``write`` in the background."""
        if self._closed:
            raise RuntimeError("this checkpoint was closed: no more saves")
        self.wait()
        writer = distributed.get_rank() == self._save_on_rank
        # handed over in a box that the worker empties, so the payload is freed as soon as the write returns
        self._pending = (self._executor.submit(self._run, [write], what, writer), finish, what)
        with _in_flight_lock:
            _in_flight.add(self)

    def _run(self, box: list[Callable[[], None]], what: str, writer: bool) -> None:
        write = box.pop()
        try:
            # the writer's heartbeat tells the ranks waiting for this outcome that the upload is still going
            with distributed.busy() if writer else contextlib.nullcontext(), distributed.local_only():
                self.pool.wait_for_copies()  # device-to-host copies of the snapshot have landed
                write()
        except BaseException as err:
            logger.error("background %s failed: %s (it is raised at the next save, wait() or close())", what, err)
            raise
        finally:
            del write  # the snapshot's last reference: its buffers are free again before the save is reported done
            self.pool.release()

    def wait(self, *, agree: bool = True) -> None:
        """Block until the save in flight is stored, then finish it; raise its error (on every rank).

        With ``agree=False`` nothing is coordinated with the other ranks: each finishes on its own.
        """
        if self._pending is None:
            return
        future, finish, what = self._pending
        error = future.exception()  # a Ctrl-C here leaves the save pending, to be finished later
        self._pending = None
        with _in_flight_lock:
            _in_flight.discard(self)
        if agree:
            distributed.agree(error, self._save_on_rank, what)
            finish()
            return
        if error is not None:
            raise error
        with distributed.local_only():
            finish()

    def close(self) -> None:
        """Finish what is pending and stop the worker."""
        try:
            self.wait()
        finally:
            self._closed = True
            self._executor.shutdown(wait=True)
            self.pool.clear()

    def _finish_at_exit(self) -> None:
        if self._pending is None:
            return
        what = self._pending[2]
        logger.warning("finishing %s, still in flight at interpreter exit", what)
        try:
            self.wait(agree=False)
        except BaseException as err:
            logger.error("%s FAILED at interpreter exit: %s", what, err)
            print(
                f"ckptcloud: {what} FAILED at interpreter exit: {err} ({type(err).__name__}). "
                "That checkpoint was not stored; the checkpoints stored before it are kept.",
                file=sys.stderr,
                flush=True,
            )


def _finish_all_at_exit() -> None:
    with _in_flight_lock:
        writers = list(_in_flight)
    for writer in writers:
        writer._finish_at_exit()


_register = getattr(threading, "_register_atexit", None)  # CPython 3.9+; runs before thread pools shut down
if _register is not None:
    _register(_finish_all_at_exit)
else:  # pragma: no cover - other interpreters
    atexit.register(_finish_all_at_exit)
