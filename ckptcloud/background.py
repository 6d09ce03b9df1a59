"""Saves that run in the background: one worker thread, at most one save in flight.

``Checkpoint(..., async_save=True)`` takes a CPU snapshot of the state on the caller's thread (one copy of the
state), hands the upload to this writer and returns. The caller's thread finishes each save later - at the next
save, :meth:`wait` or :meth:`close` - where every rank agrees on the outcome, and only then does the kept list
change and do evictions run. A background failure is logged when it happens and raised at that next call.
At interpreter exit a pending save is finished; if it fails, that is logged as an error and printed to stderr.
"""

from __future__ import annotations

import atexit
import logging
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from ckptcloud import distributed

logger = logging.getLogger("ckptcloud")


class BackgroundWriter:
    """Runs one write at a time on a worker thread; its ``finish`` step runs on the caller's thread.

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
        atexit.register(self._at_exit)

    @property
    def pending(self) -> bool:
        """Whether a save is in flight or not yet finished."""
        return self._pending is not None

    def submit(self, write: Callable[[], None], finish: Callable[[], None], what: str) -> None:
        """Finish the previous save (raising its error, if any), then start ``write`` in the background."""
        if self._closed:
            raise RuntimeError("this checkpoint was closed: no more saves")
        self.wait()
        self._pending = (self._executor.submit(self._run, write, what), finish, what)

    @staticmethod
    def _run(write: Callable[[], None], what: str) -> None:
        try:
            with distributed.local_only():
                write()
        except BaseException as err:
            logger.error("background %s failed: %s (it is raised at the next save, wait() or close())", what, err)
            raise

    def wait(self, *, agree: bool = True) -> None:
        """Block until the save in flight is stored, then finish it; raise its error (on every rank)."""
        if self._pending is None:
            return
        future, finish, what = self._pending
        self._pending = None
        error = future.exception()
        if agree:
            distributed.agree(error, self._save_on_rank, what)
        elif error is not None:
            raise error
        finish()

    def close(self) -> None:
        """Finish what is pending and stop the worker."""
        try:
            self.wait()
        finally:
            self._closed = True
            self._executor.shutdown(wait=True)

    def _at_exit(self) -> None:
        if self._pending is None:
            return
        what = self._pending[2]
        logger.warning("finishing %s, still in flight at interpreter exit", what)
        try:
            self.wait(agree=False)  # other ranks may be gone: no collective now
        except BaseException as err:
            logger.error("%s FAILED at interpreter exit: %s", what, err)
            print(f"ckptcloud: {what} FAILED at interpreter exit: {err}", file=sys.stderr)
