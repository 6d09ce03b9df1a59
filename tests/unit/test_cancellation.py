"""Failures and Ctrl-C stop the whole pipeline at once, and nothing is left behind or swallowed.

Covers: a cancelled retry stops at once; a part or range failing for good is reported without waiting out the
others; Ctrl-C during a load surfaces within about a second; Ctrl-C while ``abort()`` waits still discards the
upload; Ctrl-C is never replaced by a part's error; retry jitter leaves the user's ``random`` stream alone;
progress never goes backwards. Every wait here is bounded.
"""

from __future__ import annotations

import random
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import CancelledError

import pytest
import torch

import ckptcloud.serialization
from ckptcloud.download import download_to_file
from ckptcloud.remote import RemoteSaver
from ckptcloud.retry import Retry
from ckptcloud.stores.memory import MemoryStore
from ckptcloud.streaming import PartWriter

PART = 64 * 1024
CHUNK = 64 * 1024


@pytest.fixture(autouse=True)
def ctrl_c_raises_keyboard_interrupt() -> Iterator[None]:
    """Python's own SIGINT handler, as in a terminal. A process started in the background by a non-interactive shell
    (``cmd &``) inherits SIGINT ignored, and Python then installs no handler: Ctrl-C could not be simulated there."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def interrupt_main_after(seconds: float) -> tuple[threading.Timer, list[float]]:
    """Send SIGINT to the main thread (a real Ctrl-C, which wakes blocking waits) after ``seconds``.

    Returns the started timer (cancel it in ``finally``) and a list that receives the time the signal was sent.
    """
    sent: list[float] = []
    main = threading.main_thread().ident
    assert main is not None and threading.current_thread() is threading.main_thread()

    def fire() -> None:
        sent.append(time.monotonic())
        signal.pthread_kill(main, signal.SIGINT)

    timer = threading.Timer(seconds, fire)
    timer.start()
    return timer, sent


def wait_for_threads_to_end(prefix: str, timeout: float = 10.0) -> list[str]:
    """Names of threads starting with ``prefix`` still alive after up to ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while True:
        alive = [t.name for t in threading.enumerate() if t.name.startswith(prefix)]
        if not alive or time.monotonic() > end:
            return alive
        time.sleep(0.02)


class SlowReads(MemoryStore):
    """Serves each range in 64 KiB chunks, one every 50 ms (about 1.3 MiB/s per range).

    ``deny_start``: a range starting there fails with ``PermissionError`` after its first chunk.
    """

    def __init__(self, deny_start: int | None = None) -> None:
        super().__init__("bucket")
        self.deny_start = deny_start
        self.chunks_served = 0

    def read(self, key: str, start: int = 0, end: int | None = None, **kwargs: object) -> Iterator[bytes]:
        body = b"".join(super().read(key, start, end, **kwargs))
        for pos in range(0, len(body), CHUNK):
            time.sleep(0.05)
            with self._lock:
                self.chunks_served += 1
            yield body[pos : pos + CHUNK]
            if start == self.deny_start:
                raise PermissionError(f"access denied to bytes {start}..")


# --------------------------------------------------------------------------------------------------- retry
def test_a_cancelled_retry_stops_waiting_at_once():
    cancel = threading.Event()
    calls = []

    def down() -> None:
        calls.append(time.monotonic())
        raise ConnectionResetError("reset by peer")

    retry = Retry(max_attempts=50, initial_backoff=5.0, max_backoff=5.0, deadline=60.0)
    timer = threading.Timer(0.3, cancel.set)
    timer.start()
    start = time.monotonic()
    try:
        with pytest.raises(CancelledError) as info:
            retry.call(down, "a request to a flaky endpoint", cancel=cancel)
    finally:
        timer.cancel()
    elapsed = time.monotonic() - start
    assert elapsed < 1.5, f"a cancelled retry went on for {elapsed:.1f} s"
    assert isinstance(info.value.__cause__, ConnectionResetError)  # the last failure is kept as the cause
    n = len(calls)
    time.sleep(0.2)
    assert len(calls) == n, "an attempt was started after the cancel"


def test_a_retry_cancelled_before_it_starts_sends_nothing():
    cancel = threading.Event()
    cancel.set()
    calls = []
    with pytest.raises(CancelledError):
        Retry().call(lambda: calls.append(1), "a request", cancel=cancel)
    assert calls == []


def test_retry_jitter_leaves_the_users_seeded_random_stream_unchanged():
    random.seed(1234)
    expected = [random.random() for _ in range(3)]

    failures = [ConnectionResetError("reset")]

    def flaky() -> str:
        if failures:
            raise failures.pop()
        return "ok"

    random.seed(1234)
    assert Retry(initial_backoff=0.001).call(flaky, "a flaky request") == "ok"
    assert failures == []  # the call was retried once
    assert [random.random() for _ in range(3)] == expected


# --------------------------------------------------------------------------------------------------- saves
class OnePartDeniedOthersFlaky(MemoryStore):
    """Part 2 is denied for good (after a short while); every other part fails with connection resets forever."""

    def __init__(self) -> None:
        super().__init__("bucket", min_part_size=PART)

    def put_part(self, upload: object, number: int, data: memoryview) -> object:
        self._log(f"part {number}")
        if number == 2:
            time.sleep(0.2)
            raise PermissionError("part 2: access denied")
        raise ConnectionResetError(f"part {number}: reset by peer")


def test_a_part_failing_for_good_is_reported_without_waiting_out_the_other_parts_retries():
    retry = Retry(max_attempts=10_000, initial_backoff=0.3, max_backoff=0.3, deadline=8.0)
    saver = RemoteSaver(OnePartDeniedOthersFlaky(), part_size=PART, max_concurrency=3, retry=retry)
    start = time.monotonic()
    with pytest.raises(PermissionError, match="part 2"):
        saver({"w": torch.zeros(4 * PART // 4)}, "x.pt")  # four parts and a bit
    elapsed = time.monotonic() - start
    assert elapsed < 2.0, f"the denied part was reported after {elapsed:.1f} s (the others' deadline is 8 s)"
    assert wait_for_threads_to_end("ckptcloud-part") == []
    assert saver.store.uploads == {}  # the upload was aborted


class BlocksPartOne(MemoryStore):
    """Part 1 hangs in its request until ``gate`` opens (at most 10 s); part 2 is denied."""

    def __init__(self) -> None:
        super().__init__("bucket", min_part_size=PART)
        self.gate = threading.Event()

    def put_part(self, upload: object, number: int, data: memoryview) -> object:
        if number == 1:
            self.gate.wait(10)
            return super().put_part(upload, number, data)
        raise PermissionError(f"part {number}: access denied")


def test_ctrl_c_while_abort_waits_for_a_running_part_still_discards_the_upload():
    store = BlocksPartOne()
    writer = PartWriter(store, "k", part_size=PART, max_concurrency=2)
    writer.write(b"x" * (2 * PART))
    deadline = time.monotonic() + 5
    while writer.failure is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert isinstance(writer.failure, PermissionError)
    timer, _ = interrupt_main_after(0.3)  # part 1 is still in its request: abort() waits for it
    try:
        with pytest.raises(KeyboardInterrupt):
            writer.abort()
    finally:
        timer.cancel()
        store.gate.set()
    assert "abort" in store.requests, "no abort was sent to the store"
    assert store.uploads == {}, "the incomplete upload was left behind"
    assert wait_for_threads_to_end("ckptcloud-part") == []


class DeniesPartTwo(MemoryStore):
    def __init__(self) -> None:
        super().__init__("bucket", min_part_size=PART)

    def put_part(self, upload: object, number: int, data: memoryview) -> object:
        if number == 2:
            raise PermissionError("part 2: access denied")
        return super().put_part(upload, number, data)


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_ctrl_c_during_a_save_is_never_replaced_by_a_part_error(monkeypatch, interrupt):
    def save_then_interrupted(obj: object, writer: PartWriter, **kwargs: object) -> None:
        writer.write(b"y" * (2 * PART))  # parts 1 and 2 are sent; nothing waits on a buffer
        deadline = time.monotonic() + 5
        while writer.failure is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert isinstance(writer.failure, PermissionError)
        raise interrupt()  # the user pressed Ctrl-C (or the process is exiting) after part 2 failed

    monkeypatch.setattr(ckptcloud.serialization, "save", save_then_interrupted)
    saver = RemoteSaver(DeniesPartTwo(), part_size=PART, max_concurrency=2)
    with pytest.raises(interrupt) as info:
        saver({"w": torch.zeros(1)}, "x.pt")
    chained = info.value.__cause__ or info.value.__context__
    assert isinstance(chained, PermissionError), "the part error should be chained to the interrupt"
    assert saver.store.uploads == {}


# --------------------------------------------------------------------------------------------------- loads
def test_a_range_failing_for_good_is_reported_without_waiting_for_the_other_ranges():
    size = 4 * 2 * 1024 * 1024  # four ranges of 2 MiB: 32 chunks (1.6 s) each
    store = SlowReads(deny_start=0)
    store.put("k", memoryview(bytes(size)), {})
    start = time.monotonic()
    with tempfile.TemporaryFile() as file, pytest.raises(PermissionError):
        download_to_file(store, "k", file, part_size=1024 * 1024, max_concurrency=4)
    elapsed = time.monotonic() - start
    assert elapsed < 1.0, f"the denied range was reported after {elapsed:.1f} s"
    assert wait_for_threads_to_end("ckptcloud-get") == []


def test_ctrl_c_during_a_load_surfaces_within_a_second_and_stops_every_range():
    size = 4 * 4 * 1024 * 1024  # four ranges of 4 MiB: 64 chunks (3.2 s) each
    store = SlowReads()
    store.put("k", memoryview(bytes(size)), {})
    start = time.monotonic()
    timer, sent = interrupt_main_after(0.5)
    try:
        with tempfile.TemporaryFile() as file, pytest.raises(KeyboardInterrupt):
            download_to_file(store, "k", file, part_size=1024 * 1024, max_concurrency=4)
    finally:
        timer.cancel()
    surfaced = time.monotonic()
    assert sent, "the load finished before the Ctrl-C"
    assert surfaced - sent[0] < 1.0, f"Ctrl-C surfaced {surfaced - sent[0]:.2f} s after it was pressed"
    assert wait_for_threads_to_end("ckptcloud-get") == []
    served = store.chunks_served
    time.sleep(0.2)
    assert store.chunks_served == served, "a range kept downloading after Ctrl-C"
    assert served < size // CHUNK, f"everything was downloaded anyway ({surfaced - start:.1f} s)"


# ------------------------------------------------------------------------------------------------ progress
def test_progress_never_goes_backwards_and_ends_at_the_total():
    seen: list[int] = []
    jitter = random.Random(0)

    def progress(done: int, total: int | None) -> None:
        time.sleep(jitter.uniform(0, 0.002))  # a callback that takes a little while, as a progress bar does
        seen.append(done)

    store = MemoryStore("bucket", min_part_size=PART)
    payload = bytes(PART * 64)
    writer = PartWriter(store, "k", part_size=PART, max_concurrency=8, progress=progress)
    writer.write(payload)
    writer.commit()
    assert seen == sorted(seen), "bytes_done went backwards"
    assert seen[-1] == len(payload)

    seen.clear()
    with tempfile.TemporaryFile() as file:
        download_to_file(store, "k", file, part_size=PART, max_concurrency=8, progress=progress)
    assert seen == sorted(seen), "bytes_done went backwards"
    assert seen[-1] == len(payload)
