"""How ranks agree without collectives: JSON records in the process group's key-value store.

The coordination model (the README's "Distributed training" section says the same for users):

* **One rank decides.** The writer (``save_on_rank``) computes every decision that must be the same everywhere
  (save or skip, the filename, the outcome of an upload or delete, ``resume()``'s listing) and publishes it as a
  JSON record under a step number. Every other rank (a *follower*) reads that record and follows it. Nothing is
  pickled, so nothing needs numpy, and a rank that computed something else gets a warning, not a hang.
* **The writer never waits** for the followers, and **no rank sits in a collective**: followers poll the store
  (``check``, a non-blocking request) with a backoff capped at :data:`MAX_POLL` seconds.
* **What times out when.** A follower waits for a record up to the process group's timeout. While the writer
  uploads or lists, it beats a heartbeat every :data:`BEAT_INTERVAL` seconds, and every beat pushes the
  followers' deadline one group timeout further out. So an upload may take longer than the group's timeout, and a
  writer that dies is noticed one group timeout after its last beat (at once when its process hosted the store).
* Each follower acknowledges the records it read; the last one deletes the record, so the store does not grow.

This module knows the store protocol only; :mod:`ckptcloud.distributed` decides when to use it.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

from ckptcloud.errors import RemoteSaveError

BEAT_INTERVAL = 1.0
"""Seconds between two heartbeats of a busy writer."""
MAX_POLL = 0.5
"""Longest sleep between two polls of a waiting follower (the first ones are a few milliseconds)."""
MAX_ERROR_TEXT = 2000


@contextlib.contextmanager
def heartbeat(store: Any, key: str, interval: float = BEAT_INTERVAL) -> Iterator[None]:
    """While in this block, set ``key`` in ``store`` to a growing counter every ``interval`` seconds (a daemon thread).

    The thread is stopped and joined when the block ends, also on an exception, so it never outlives the work it
    vouches for. A store that fails (the job is ending) ends the beating; the waiters find out on their own.

    Example:
        >>> import torch.distributed as dist
        >>> store = dist.HashStore()
        >>> with heartbeat(store, "beat/0"):
        ...     pass
        >>> int(store.get("beat/0")) >= 1
        True
    """
    stop = threading.Event()

    def beat() -> None:
        count = 0
        while True:
            count += 1
            try:
                store.set(key, str(count))
            except Exception:
                return
            if stop.wait(interval):
                return

    beater = threading.Thread(target=beat, name="ckptcloud-heartbeat", daemon=True)
    beater.start()
    try:
        yield
    finally:
        stop.set()
        beater.join(timeout=10 * interval + 10)  # a store call hung past this ends with the store's own timeout


class BeatWatch:
    """When the heartbeats of other ranks last changed, by this process's clock (hosts' clocks may differ).

    A rank whose beat did not change for ``stale_after`` seconds (counted from this watch's creation for a rank that
    never beat) is stale: dead, or cut off. Looks at the store at most every ``min_interval`` seconds, with two
    requests (``check`` and ``multi_get``) whatever the number of ranks once they all beat.

    Args:
        store: the key-value store every rank shares.
        keys: each watched rank's beat key.
        stale_after: seconds without a changed beat after which a rank is stale.
        min_interval: shortest time between two looks at the store.
    """

    def __init__(self, store: Any, keys: Mapping[int, str], stale_after: float, min_interval: float) -> None:
        self._store = store
        self._keys = dict(keys)
        self.stale_after = stale_after
        self._min_interval = min_interval
        now = time.monotonic()
        self._seen: dict[int, tuple[bytes | None, float]] = {rank: (None, now) for rank in self._keys}
        self._looked = float("-inf")
        self._stale: list[int] = []

    def stale(self) -> list[int]:
        """The ranks whose beat has not changed for :attr:`stale_after` seconds (sorted; empty while all beat)."""
        now = time.monotonic()
        if now - self._looked < self._min_interval:
            return self._stale
        self._looked = now
        ranks = list(self._keys)
        keys = [self._keys[rank] for rank in ranks]
        values: list[bytes | None] | None = None
        if keys and self._store.check(keys):
            with contextlib.suppress(AttributeError, NotImplementedError):  # a store without multi_get
                values = [bytes(v) for v in self._store.multi_get(keys)]
        if values is None:  # some rank has not beaten yet: key by key
            values = [bytes(self._store.get(k)) if self._store.check([k]) else None for k in keys]
        for rank, value in zip(ranks, values, strict=True):
            if value is not None and value != self._seen[rank][0]:
                self._seen[rank] = (value, now)
        self._stale = sorted(rank for rank, (_, seen) in self._seen.items() if now - seen > self.stale_after)
        return self._stale


class CoordinationTimeout(RemoteSaveError, TimeoutError):
    """A follower waited a whole process-group timeout for the writer's record, with no heartbeat meanwhile."""


class Board:
    """Records that one writer publishes and every other rank reads, in a c10d ``Store``.

    Args:
        store: the key-value store every rank shares (the default process group's, under a prefix).
        rank: this process's rank.
        world: the number of ranks.
        timeout: seconds a follower waits for a record while the writer shows no sign of work.

    Example:
        >>> import torch.distributed as dist
        >>> store = dist.HashStore()
        >>> writer, follower = Board(store, 0, 2, timeout=5), Board(store, 1, 2, timeout=5)
        >>> writer.publish(writer.next_step(), "saving", value={"filename": "model_3.pt"})
        >>> follower.read(follower.next_step(), 0, "saving")["value"]
        {'filename': 'model_3.pt'}
    """

    def __init__(self, store: Any, rank: int, world: int, timeout: float) -> None:
        self._store = store
        self.rank = rank
        self.world = world
        self.timeout = timeout
        self._step = 0
        self._busy = 0
        self._beats = 0
        self._beat_lock = threading.Lock()
        self._beater: threading.Thread | None = None

    def next_step(self) -> int:
        """The number of the next coordinated step; every rank counts the same steps in the same order."""
        self._step += 1
        return self._step

    # --------------------------------------------------------------------------------------------- writer
    def publish(self, step: int, what: str, *, value: Any = None, error: BaseException | None = None) -> None:
        """Publish the writer's outcome of ``step``: ``value`` (JSON-able), or ``error`` as text."""
        record: dict[str, Any] = {"step": step, "kind": _kind(what), "value": value, "error": None}
        if error is not None:
            record["error"] = f"{type(error).__name__}: {error}"[:MAX_ERROR_TEXT]
        self._store.set(f"record/{step}", json.dumps(record))

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """While in this block, beat a heartbeat so that followers keep waiting for this rank's record."""
        with self._beat_lock:
            self._busy += 1
            if self._beater is None:
                self._beater = threading.Thread(target=self._beat, name="ckptcloud-heartbeat", daemon=True)
                self._beater.start()
        try:
            yield
        finally:
            with self._beat_lock:
                self._busy -= 1

    def _beat(self) -> None:
        while True:
            with self._beat_lock:
                busy = self._busy > 0
                self._beats += 1
                beat = f"{self._beats} {int(busy)}"
                if not busy:
                    self._beater = None
            try:
                self._store.set(f"beat/{self.rank}", beat)
            except Exception:  # the store is gone (the job is ending): followers find out on their own
                return
            if not busy:
                return
            time.sleep(BEAT_INTERVAL)

    # ------------------------------------------------------------------------------------------- follower
    def read(self, step: int, src: int, what: str) -> dict[str, Any]:
        """Wait for rank ``src``'s record of ``step`` and return it (its ``error`` is not raised here).

        Raises:
            CoordinationTimeout: no record and no heartbeat from ``src`` for a whole timeout.
            RemoteSaveError: the record is for another kind of step (the ranks are out of step), or the store
                could not be reached.
        """
        key = f"record/{step}"
        start = time.monotonic()
        deadline = start + self.timeout
        next_beat_check = start + BEAT_INTERVAL
        last_beat: str | None = None
        delay = 0.001
        try:
            while not self._store.check([key]):
                now = time.monotonic()
                if now >= next_beat_check:
                    beat = self._beat_of(src)
                    if beat is not None and beat != last_beat:
                        last_beat = beat
                        if beat.endswith(" 1"):  # busy: uploading or listing
                            deadline = max(deadline, now + self.timeout)
                    next_beat_check = now + BEAT_INTERVAL
                if now >= deadline:
                    raise CoordinationTimeout(
                        f"{what}: rank {src} published no outcome in {now - start:.0f} s and showed no sign of work "
                        f"for {self.timeout:.0f} s (the process group's timeout); it may have crashed, or the ranks "
                        "took different paths through the training loop"
                    )
                time.sleep(delay)
                delay = min(delay * 2, MAX_POLL)
            record: dict[str, Any] = json.loads(self._store.get(key))
            self._acknowledge(step)
        except RemoteSaveError:
            raise
        except Exception as err:  # the store itself failed: typically the rank that hosts it is gone
            raise RemoteSaveError(
                f"{what}: lost contact with rank {src} through the process group's store: {err}"
            ) from err
        if record.get("step") != step or record.get("kind") != _kind(what):
            raise RemoteSaveError(
                f"ranks are out of step: rank {src} published {record.get('kind')!r} as step {step} while rank "
                f"{self.rank} expected {_kind(what)!r}; every rank must make the same checkpoint calls in the same "
                "order"
            )
        return record

    def _beat_of(self, src: int) -> str | None:
        key = f"beat/{src}"
        if not self._store.check([key]):
            return None
        return bytes(self._store.get(key)).decode()

    def _acknowledge(self, step: int) -> None:
        """Count this read; the last follower deletes the record (stores without deletion keep it: it is small)."""
        if self._store.add(f"ack/{step}", 1) >= self.world - 1:
            with contextlib.suppress(Exception):
                self._store.delete_key(f"record/{step}")
                self._store.delete_key(f"ack/{step}")


def _kind(what: str) -> str:
    """The kind of a step (its first word: "saving", "removing", ...), the same on every rank."""
    return what.split(" ", 1)[0]
