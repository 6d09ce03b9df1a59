"""How the ranks of one sharded save stop together: two flags in the process group's key-value store.

DCP itself learns of a rank's failure only after every rank has finished writing (its ``all_reduce`` of the write
results), so one rank's denied upload would let the others upload gigabytes for nothing, and leave their files.
Here, while a rank uploads, a watcher thread polls the save's ``failed`` key (a non-blocking ``check``, every
:data:`POLL` seconds): the first rank that fails sets it, and every other rank cancels its upload in flight
(:meth:`~ckptcloud.streaming.PartWriter.cancel`) and raises. A rank that finished counts itself in ``done`` and
waits until every rank did, or one failed: then it deletes the file it committed, so a failed save leaves nothing.
That wait costs nothing: DCP's own gather waits for the slowest rank right after.

A rank that dies without a word (SIGKILL, a lost host) is noticed by its heartbeat: from the start of its
``write_data`` until it leaves :meth:`SaveAgreement.wait_for_all`, every rank beats ``beat/<rank>`` every second
(:func:`ckptcloud.coordination.heartbeat`). A rank uploading or waiting checks the others' beats; one whose beat has
not changed for :data:`STALE_AFTER` seconds (``CKPTCLOUD_DCP_STALE_AFTER`` overrides it) is declared dead: the
watching rank reports a :class:`~ckptcloud.errors.RankFailedError` naming it in ``failed`` (every rank cancels its
uploads) and raises it, without waiting for the process group's timeout. A slow rank keeps beating, so it is
waited for however long its upload takes.

No collective is held open during uploads, nothing is pickled, and keys are per save (its token), so saves of
different process groups never meet. With one rank, or without an initialized process group, there is nothing to
agree on (:meth:`SaveAgreement.join` returns ``None``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import torch

from ckptcloud.coordination import BEAT_INTERVAL, BeatWatch, CoordinationTimeout, heartbeat
from ckptcloud.errors import RankFailedError, RemoteSaveError

from .layout import RankFiles

POLL = 0.1
"""Seconds between two looks at the ``failed`` key while uploading."""
MAX_WAIT_POLL = 0.5
MAX_ERROR_TEXT = 2000
KEY_PREFIX = "ckptcloud/dcp"
STALE_AFTER = 60.0
"""Seconds without a heartbeat after which a rank of a save is declared dead (env ``CKPTCLOUD_DCP_STALE_AFTER``)."""
STALE_AFTER_ENV = "CKPTCLOUD_DCP_STALE_AFTER"

logger = logging.getLogger("ckptcloud")


def default_stale_after() -> float:
    """The staleness bound in force: ``CKPTCLOUD_DCP_STALE_AFTER`` (seconds) if set, else :data:`STALE_AFTER`."""
    text = os.environ.get(STALE_AFTER_ENV)
    if not text:
        return STALE_AFTER
    try:
        seconds = float(text)
    except ValueError as err:
        raise ValueError(f"{STALE_AFTER_ENV} should be a number of seconds, but given {text!r}") from err
    if not seconds > 0:
        raise ValueError(f"{STALE_AFTER_ENV} should be a positive number of seconds, but given {text!r}")
    return seconds


def require_numpy_across_ranks() -> None:
    """Fail now, on every rank, when DCP will need numpy and it is missing.

    DCP's planning collectives (``gather_object``, ``scatter_object_list``, ``broadcast_object_list``) call
    ``tensor.numpy()`` on the receiving ranks. Without numpy the coordinator fails inside a collective and the other
    ranks wait in the next one until the process group's timeout; a writer or reader made on a process group of
    several ranks refuses at once instead. One process (``no_dist``, or no process group) needs no numpy.

    Raises:
        ImportError: a process group of two or more ranks is initialized and numpy cannot be imported.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    try:
        import numpy  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "sharded checkpoints on several ranks need numpy (torch.distributed.checkpoint's object collectives "
            "call tensor.numpy() on the receiving ranks): pip install ckptcloud[dcp]"
        ) from err


def remote_error(what: str, text: str) -> RemoteSaveError:
    """The error to raise for another rank's failure ``text`` (``"rank N: Error: message"``): a
    :class:`~ckptcloud.errors.RankFailedError` when that rank found a dead one, else a ``RemoteSaveError``."""
    parts = text.split(": ", 2)
    cls = RankFailedError if len(parts) > 1 and parts[1] == RankFailedError.__name__ else RemoteSaveError
    return cls(f"{what} failed on {text}")


class SaveAgreement:
    """The ``failed`` and ``done`` flags and the heartbeats of one save, in a c10d ``Store`` every rank shares.

    Args:
        store: the process group's key-value store.
        token: the save's token (from the coordinator's global plan): the keys' namespace.
        rank: this rank's index in the save.
        world: how many ranks write.
        timeout: seconds :meth:`wait_for_all` waits for ranks that neither finish nor fail.
        stale_after: seconds without a heartbeat after which another rank is declared dead (default
            :func:`default_stale_after`).

    Example:
        >>> import torch.distributed as dist
        >>> store = dist.HashStore()
        >>> a, b = SaveAgreement(store, "t", 0, 2, 5.0), SaveAgreement(store, "t", 1, 2, 5.0)
        >>> a.report(PermissionError("denied"))
        >>> b.failure()
        'rank 0: PermissionError: denied'
    """

    def __init__(
        self, store: Any, token: str, rank: int, world: int, timeout: float, stale_after: float | None = None
    ) -> None:
        self._store = store
        self.rank = rank
        self.world = world
        self.timeout = timeout
        self._failed = f"{KEY_PREFIX}/{token}/failed"
        self._done = f"{KEY_PREFIX}/{token}/done"
        self._beat_keys = {r: f"{KEY_PREFIX}/{token}/beat/{r}" for r in range(world)}
        bound = default_stale_after() if stale_after is None else stale_after
        others = {r: key for r, key in self._beat_keys.items() if r != rank}
        self._beats = BeatWatch(store, others, bound, min_interval=max(BEAT_INTERVAL, bound / 10))
        self._beats_lock = threading.Lock()
        self.dead: RankFailedError | None = None
        """The error this rank raised or cancelled its upload with after it found another rank dead, if it did."""

    @classmethod
    def join(cls, files: RankFiles) -> SaveAgreement | None:
        """The agreement of the save ``files`` belongs to; ``None`` with one rank or no process group."""
        dist = torch.distributed
        if files.world < 2 or not dist.is_available() or not dist.is_initialized():
            return None
        store = dist.distributed_c10d._get_default_store()
        timeout = getattr(store, "timeout", None)
        seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else 1800.0
        return cls(store, files.token, files.rank, files.world, seconds)

    def failure(self) -> str | None:
        """The first failure a rank reported (``"rank N: Error: text"``), or ``None``."""
        if not self._store.check([self._failed]):
            return None
        return bytes(self._store.get(self._failed)).decode(errors="replace")

    def report(self, error: BaseException) -> None:
        """Tell every rank that this one failed with ``error`` (the first report is the one kept)."""
        if self._store.check([self._failed]):
            return
        text = f"rank {self.rank}: {type(error).__name__}: {error}"[:MAX_ERROR_TEXT]
        self._store.set(self._failed, text)

    @contextlib.contextmanager
    def alive(self) -> Iterator[None]:
        """While in this block, beat this rank's heartbeat (a daemon thread, stopped and joined when it ends)."""
        with heartbeat(self._store, self._beat_keys[self.rank]):
            yield

    def check_alive(self, what: str) -> None:
        """Raise if another rank's heartbeat is stale (after reporting it to every rank, once).

        Raises:
            RankFailedError: a rank showed no heartbeat for ``stale_after`` seconds; the message names it and
                ``what`` (which names the checkpoint).
        """
        with self._beats_lock:  # the watcher thread and wait_for_all may both look
            if self.dead is None:
                dead = self._beats.stale()
                if not dead:
                    return
                names = ", ".join(str(r) for r in dead)
                self.dead = RankFailedError(
                    f"{what}: rank{'s' if len(dead) > 1 else ''} {names} showed no heartbeat for "
                    f"{self._beats.stale_after:.0f} s (killed, or its host lost) before finishing its part of the "
                    f"save; rank {self.rank} stopped its uploads and nothing was committed"
                )
                self.dead.ranks = tuple(dead)
                logger.error("%s", self.dead)
                with contextlib.suppress(Exception):
                    self.report(self.dead)
        raise self.dead

    @contextlib.contextmanager
    def watch(self, on_failure: Callable[[str], None], what: str = "saving") -> Iterator[None]:
        """While in this block, call ``on_failure(text)`` (once, from a watcher thread) when a rank fails or is found
        dead (:meth:`check_alive`; then :attr:`dead` holds the error)."""
        stop = threading.Event()

        def poll() -> None:
            while not stop.wait(POLL):
                try:
                    text = self.failure()
                    if text is None:
                        self.check_alive(what)
                except RankFailedError as err:
                    text = f"rank {self.rank}: {type(err).__name__}: {err}"
                except Exception:  # the store is gone (the job is ending): the write itself will fail or finish
                    return
                if text is not None:
                    on_failure(text)
                    return

        watcher = threading.Thread(target=poll, name="ckptcloud-dcp-watch", daemon=True)
        watcher.start()
        try:
            yield
        finally:
            stop.set()
            watcher.join()

    def wait_for_all(self, what: str) -> None:
        """Count this rank as done, and return once every rank is.

        Raises:
            RemoteSaveError: another rank failed (its error is in the message), or the store could not be reached.
            RankFailedError: a rank that had not finished stopped beating its heartbeat (:meth:`check_alive`).
            CoordinationTimeout: some rank neither finished nor failed within :attr:`timeout` seconds.
        """
        try:
            self._wait_for_all(what)
        except RemoteSaveError:
            raise
        except Exception as err:  # the store itself failed: typically rank 0, which hosts it, is gone
            raise RankFailedError(
                f"{what}: lost contact with the other ranks through the process group's store (rank 0 hosts it "
                f"and may be dead): {err}"
            ) from err

    def _wait_for_all(self, what: str) -> None:
        self._store.add(self._done, 1)
        start = time.monotonic()
        delay = 0.001
        while True:
            text = self.failure()
            if text is not None:
                raise remote_error(what, text)
            done = self._store.add(self._done, 0)
            if done >= self.world:
                return
            self.check_alive(what)  # every rank beats until it leaves here, so a stale one did not finish
            if time.monotonic() - start > self.timeout:
                raise CoordinationTimeout(
                    f"{what}: only {done} of {self.world} ranks finished writing in {self.timeout:.0f} s (the process "
                    "group's timeout) and none reported a failure; a rank may have been killed"
                )
            time.sleep(delay)
            delay = min(delay * 2, MAX_WAIT_POLL)

    def clear(self) -> None:
        """Remove the save's keys (the coordinator does, once every rank is past :meth:`wait_for_all`)."""
        for key in (self._failed, self._done, *self._beat_keys.values()):
            with contextlib.suppress(Exception):
                self._store.delete_key(key)
