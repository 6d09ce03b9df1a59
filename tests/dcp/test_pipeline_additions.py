"""What the sharded path added to the shared pipeline: PartWriter.tell/cancel, fetch_ranges, crc32c_combine,
LocalStore (file://) and the cross-rank save agreement."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch.distributed as dist

from ckptcloud.checksum import crc32c, crc32c_combine
from ckptcloud.coordination import CoordinationTimeout
from ckptcloud.dcp.agreement import SaveAgreement
from ckptcloud.download import fetch_ranges
from ckptcloud.errors import ObjectChangedError, RemoteSaveError
from ckptcloud.retry import NO_RETRY
from ckptcloud.stores.base import Precondition
from ckptcloud.stores.local import TMP_DIR, LocalStore
from ckptcloud.stores.memory import MemoryStore
from ckptcloud.streaming import PartWriter

PART = 1024


# ------------------------------------------------------------------------------------------- PartWriter
def test_tell_is_the_count_of_bytes_written_and_costs_no_request():
    store = MemoryStore("b", min_part_size=PART)
    writer = PartWriter(store, "k", part_size=PART, max_concurrency=2)
    assert writer.tell() == 0
    writer.write(b"x" * 1500)
    writer.write(memoryview(b"y" * 10))
    assert writer.tell() == 1510
    writer.commit()
    assert store.requests == ["begin", "put_part", "put_part", "complete"]


def test_cancel_from_another_thread_stops_a_write_waiting_for_a_buffer_and_nothing_is_published():
    gate = threading.Event()

    class Stuck(MemoryStore):
        def put_part(self, upload, number, data):
            gate.wait(10)
            return super().put_part(upload, number, data)

    store = Stuck("b", min_part_size=PART)
    writer = PartWriter(store, "k", part_size=PART, max_concurrency=1)
    reason = RemoteSaveError("rank 1 failed")
    threading.Timer(0.2, lambda: (writer.cancel(reason), gate.set())).start()
    with pytest.raises(RemoteSaveError, match="rank 1 failed"):
        writer.write(b"z" * PART * 10)  # blocks: one part in flight, one buffer spare, until cancelled
    writer.abort()
    assert "k" not in store.objects and store.uploads == {}
    assert store.requests.count("put_part") <= 2


def test_commit_after_cancel_publishes_nothing():
    store = MemoryStore("b", min_part_size=PART)
    writer = PartWriter(store, "k", part_size=PART, max_concurrency=1)
    writer.write(b"small")
    writer.cancel(RemoteSaveError("another rank failed"))
    with pytest.raises(RemoteSaveError):
        writer.commit()
    writer.abort()
    assert store.objects == {} and "put" not in store.requests


# ------------------------------------------------------------------------------------------ fetch_ranges
class Gauged(MemoryStore):
    def __init__(self) -> None:
        super().__init__("b", min_part_size=PART)
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = 0

    def read(self, key, start=0, end=None, *, version=None):
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            time.sleep(0.01)
            yield from super().read(key, start, end, version=version)
        finally:
            with self.lock:
                self.in_flight -= 1


def test_fetch_ranges_yields_each_range_in_order_with_bounded_concurrency():
    store = Gauged()
    body = os.urandom(20 * PART)
    store.put("k", memoryview(body), {})
    ranges = [("k", i * PART, i * PART + 700) for i in range(15)] + [("k", 0, 5 * PART)]
    got = [bytes(view) for view in fetch_ranges(store, ranges, part_size=PART, max_concurrency=3)]
    assert got == [body[start:end] for _, start, end in ranges]
    assert 1 < store.max_in_flight <= 3


def test_fetch_ranges_raises_the_first_failure_and_starts_no_new_request():
    class Denied(Gauged):
        def read(self, key, start=0, end=None, *, version=None):
            if start >= 4 * PART:
                raise PermissionError("AccessDenied")
            yield from super().read(key, start, end, version=version)

    store = Denied()
    store.put("k", memoryview(bytes(40 * PART)), {})
    ranges = [("k", i * PART, (i + 1) * PART) for i in range(40)]
    with pytest.raises(PermissionError):
        list(fetch_ranges(store, ranges, part_size=PART, max_concurrency=2, retry=NO_RETRY))
    assert store.requests.count("read") < 20


def test_fetch_ranges_stopped_early_by_the_caller_cancels_what_is_in_flight():
    store = Gauged()
    store.put("k", memoryview(bytes(50 * PART)), {})
    reads = fetch_ranges(store, [("k", i * PART, (i + 1) * PART) for i in range(50)], part_size=PART, max_concurrency=2)
    next(reads)
    reads.close()
    assert store.in_flight == 0 and store.requests.count("read") < 10


# ----------------------------------------------------------------------------------------- crc32c_combine
def test_combined_crc32c_equals_the_crc32c_of_the_concatenation():
    for size_a, size_b in [(0, 0), (0, 7), (9, 0), (1, 1), (1000, 65537), (3, 1 << 20)]:
        a, b = os.urandom(size_a), os.urandom(size_b)
        assert crc32c_combine(crc32c(a), crc32c(b), len(b)) == crc32c(a + b)


# ---------------------------------------------------------------------------------------------- LocalStore
def test_local_store_conditional_create_refuses_an_existing_file_atomically(tmp_path):
    store, key = LocalStore(), str(tmp_path / "x" / ".metadata").lstrip("/")
    store.put(key, memoryview(b"first"), {}, Precondition())
    with pytest.raises(ObjectChangedError):
        store.put(key, memoryview(b"second"), {}, Precondition())
    assert b"".join(store.read(key)) == b"first"
    assert os.listdir(tmp_path / "x" / TMP_DIR) == []  # no temporary file left behind


def test_local_store_multipart_upload_is_invisible_until_complete_and_abort_leaves_nothing(tmp_path):
    store, key = LocalStore(), str(tmp_path / "f.bin").lstrip("/")
    upload = store.begin(key, {})
    tokens = [store.put_part(upload, n, memoryview(bytes([n]) * 3)) for n in (2, 1, 3)]
    assert store.list(str(tmp_path).lstrip("/") + "/") == []
    assert [u.key for u in store.list_incomplete(str(tmp_path).lstrip("/") + "/")] == [key]
    store.complete(upload, sorted(tokens))
    assert b"".join(store.read(key)) == b"\x01\x01\x01\x02\x02\x02\x03\x03\x03"
    assert b"".join(store.read(key, 2, 5)) == b"\x01\x02\x02"
    other = store.begin(key + ".2", {})
    store.put_part(other, 1, memoryview(b"abc"))
    store.abort(other)
    assert [o.key for o in store.list(str(tmp_path).lstrip("/") + "/")] == [key]
    assert store.list_incomplete(str(tmp_path).lstrip("/") + "/") == []


def test_local_store_read_pinned_to_a_replaced_version_fails(tmp_path):
    store, key = LocalStore(), str(tmp_path / "v").lstrip("/")
    store.put(key, memoryview(b"one"), {})
    version = store.head(key).version
    time.sleep(0.01)
    store.put(key, memoryview(b"two!"), {})
    with pytest.raises(ObjectChangedError):
        b"".join(store.read(key, version=version))
    with pytest.raises(FileNotFoundError, match="no object at file:///"):
        store.head(key + "-missing")


# -------------------------------------------------------------------------------------------- agreement
def test_a_rank_that_fails_stops_the_ranks_still_writing():
    store = dist.HashStore()
    failing, writing = SaveAgreement(store, "t1", 0, 2, 5.0), SaveAgreement(store, "t1", 1, 2, 5.0)
    told: list[str] = []
    with writing.watch(told.append):
        failing.report(PermissionError("AccessDenied"))
        deadline = time.monotonic() + 5
        while not told and time.monotonic() < deadline:
            time.sleep(0.01)
    assert told == ["rank 0: PermissionError: AccessDenied"]
    with pytest.raises(RemoteSaveError, match="failed on rank 0: PermissionError"):
        writing.wait_for_all("saving x")


def test_ranks_that_finish_wait_for_each_other_and_a_missing_rank_times_out():
    store = dist.HashStore()
    ranks = [SaveAgreement(store, "t2", r, 3, 5.0) for r in range(3)]
    threads = [threading.Thread(target=a.wait_for_all, args=("saving x",)) for a in ranks[1:]]
    for thread in threads:
        thread.start()
    ranks[0].wait_for_all("saving x")
    for thread in threads:
        thread.join(5)
        assert not thread.is_alive()
    lonely = SaveAgreement(store, "t3", 0, 2, 0.2)
    with pytest.raises(CoordinationTimeout, match="only 1 of 2 ranks finished"):
        lonely.wait_for_all("saving y")
