"""The shared upload/download pipeline with in-process stores: memory bound, all-or-nothing, one put when small."""

from __future__ import annotations

import tempfile
import threading
import time

import pytest
import torch

from ckptcloud.download import download_to_file
from ckptcloud.remote import RemoteSaver
from ckptcloud.retry import NO_RETRY, Retry
from ckptcloud.stores.base import MiB, StoreLimits
from ckptcloud.stores.memory import MemoryStore
from ckptcloud.streaming import PartWriter, choose_part_size

PART = 64 * 1024


class SlowStore(MemoryStore):
    """Records the most part uploads in flight at once; each part takes a little while."""

    def __init__(self) -> None:
        super().__init__("bucket", min_part_size=PART)
        self.in_flight = 0
        self.max_in_flight = 0
        self.gauge = threading.Lock()

    def put_part(self, upload, number, data):
        with self.gauge:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        time.sleep(0.005)
        try:
            return super().put_part(upload, number, data)
        finally:
            with self.gauge:
                self.in_flight -= 1


def test_buffers_and_parts_in_flight_never_exceed_the_bound():
    store = SlowStore()
    writer = PartWriter(store, "k", part_size=PART, max_concurrency=3)
    payload = bytes(range(256)) * (PART * 40 // 256)
    writer.write(memoryview(payload))  # one huge write, as torch.save does for a tensor
    writer.commit()
    assert writer._buffers_made <= 3 + 1
    assert store.max_in_flight <= 3
    assert store.objects["k"][0] == payload
    assert store.requests.count("put_part") == 40


def test_writer_keeps_no_view_of_caller_memory_after_write():
    store = MemoryStore("bucket", min_part_size=PART)
    writer = PartWriter(store, "k", part_size=PART, max_concurrency=2)
    source = bytearray(b"a" * (PART * 3 + 10))
    writer.write(memoryview(source))
    source[:] = b"b" * len(source)  # training changes the weights right after the write
    writer.commit()
    assert store.objects["k"][0] == b"a" * (PART * 3 + 10)


@pytest.mark.parametrize("size", [0, 1, PART - 1])
def test_stream_smaller_than_a_part_is_one_put(size):
    store = MemoryStore("bucket", min_part_size=PART)
    writer = PartWriter(store, "k", part_size=PART, max_concurrency=2)
    writer.write(b"x" * size)
    writer.commit()
    assert store.requests == ["put"]
    assert store.objects["k"][0] == b"x" * size


def test_exactly_one_part_is_a_single_part_upload():
    store = MemoryStore("bucket", min_part_size=PART)
    writer = PartWriter(store, "k", part_size=PART, max_concurrency=2)
    writer.write(b"y" * PART)
    writer.commit()
    assert store.requests == ["begin", "put_part", "complete"]
    assert store.objects["k"][0] == b"y" * PART


@pytest.mark.parametrize("fail_at", [1, 2, 5])
def test_failed_part_aborts_and_publishes_nothing(fail_at):
    class Failing(MemoryStore):
        def put_part(self, upload, number, data):
            if number == fail_at:
                raise ConnectionResetError(f"part {number} lost")
            return super().put_part(upload, number, data)

    store = Failing("bucket", min_part_size=PART)
    store.put("k", memoryview(b"old"), {})
    writer = PartWriter(store, "k", part_size=PART, max_concurrency=2, retry=NO_RETRY)
    with pytest.raises(ConnectionResetError, match=f"part {fail_at} lost"):
        for _ in range(8):
            writer.write(b"z" * PART)
        writer.commit()
    writer.abort()
    assert store.objects["k"][0] == b"old"
    assert store.uploads == {}
    assert "abort" in store.requests and "complete" not in store.requests


def test_commit_twice_and_write_after_commit_are_errors():
    writer = PartWriter(MemoryStore("bucket"), "k", part_size=5 * MiB, max_concurrency=1)
    writer.write(b"abc")
    writer.commit()
    with pytest.raises(ValueError, match="twice"):
        writer.commit()
    with pytest.raises(ValueError, match="committed or aborted"):
        writer.write(b"more")


def test_part_size_grows_to_respect_the_part_count_limit():
    limits = StoreLimits(min_part_size=5 * MiB, max_part_size=5 * 1024 * MiB, max_parts=10_000, part_alignment=1)
    assert choose_part_size(limits, 8 * MiB, 1024 * MiB) == 8 * MiB
    grown = choose_part_size(limits, 8 * MiB, 200 * 1024 * MiB)  # 200 GiB would need 25,600 parts of 8 MiB
    assert grown * 10_000 >= 200 * 1024 * MiB
    aligned = StoreLimits(256 * 1024, 5 * 1024 * MiB, 100, part_alignment=256 * 1024)
    assert choose_part_size(aligned, 256 * 1024, 100 * MiB) % (256 * 1024) == 0
    with pytest.raises(ValueError, match="does not fit"):
        choose_part_size(StoreLimits(1, 10, 2), 5, 100)


def test_too_many_parts_is_a_clear_error():
    store = MemoryStore("bucket", min_part_size=1)
    store.limits = StoreLimits(1, 1024, 3)
    writer = PartWriter(store, "k", part_size=4, max_concurrency=1)
    with pytest.raises(ValueError, match=r"more than 3 parts.*`part_size`"):
        writer.write(b"x" * 20)
    writer.abort()
    assert store.uploads == {} and "k" not in store.objects


@pytest.mark.parametrize("concurrency", [1, 3, 8])
def test_download_to_file_reassembles_ranges(concurrency):
    store = MemoryStore("bucket")
    body = bytes(range(256)) * 4099
    store.put("k", memoryview(body), {})
    with tempfile.TemporaryFile() as file:
        assert download_to_file(store, "k", file, part_size=1000, max_concurrency=concurrency) == len(body)
        file.seek(0)
        assert file.read() == body
    reads = store.requests.count("read")
    assert reads == (1 if concurrency == 1 else concurrency)


def test_remote_saver_round_trip_and_metadata_on_memory_store():
    store = MemoryStore("bucket")
    saver = RemoteSaver(store, "/runs/a/", part_size=5 * MiB, max_concurrency=2)
    state = {"w": torch.randn(3 * MiB), "step": 3}  # 12 MiB: multipart
    saver(state, "model_3.pt", {"basename": "model", "score_name": "acc", "priority": 0.123456789})
    assert saver.list() == ["model_3.pt"]
    _, meta, _ = store.objects["runs/a/model_3.pt"]
    assert meta == {"ckptcloud_priority": "0.123456789", "ckptcloud_score_name": "acc", "ckptcloud_basename": "model"}
    back = saver.load("model_3.pt")
    assert torch.equal(back["w"], state["w"]) and back["step"] == 3
    assert (
        repr(saver) == "RemoteSaver(url='mem://bucket/runs/a/', part_size=5242880, max_concurrency=2, save_on_rank=0)"
    )


FAST = Retry(max_attempts=4, initial_backoff=0.001, max_backoff=0.002)


def test_transient_part_failures_are_retried_and_the_object_completes():
    class Flaky(MemoryStore):
        def put_part(self, upload, number, data):
            self.attempts.append(number)
            if self.failures.get(number, 0):
                self.failures[number] -= 1
                raise ConnectionResetError(f"part {number} reset")
            return super().put_part(upload, number, data)

    store = Flaky("bucket", min_part_size=PART)
    store.attempts = []
    store.failures = {2: 2, 3: 1}  # part number -> how many times it fails first
    writer = PartWriter(store, "k", part_size=PART, max_concurrency=2, retry=FAST)
    writer.write(b"r" * (PART * 4))
    writer.commit()
    assert store.objects["k"][0] == b"r" * (PART * 4)
    assert sorted(store.attempts) == [1, 2, 2, 2, 3, 3, 4]


def test_permanent_failures_are_not_retried():
    class Denied(MemoryStore):
        def put(self, key, data, metadata, when=None):
            self.requests.append("put")
            raise PermissionError("access denied")

    store = Denied("bucket")
    writer = PartWriter(store, "k", part_size=5 * MiB, max_concurrency=1, retry=FAST)
    writer.write(b"x")
    with pytest.raises(PermissionError):
        writer.commit()
    assert store.requests == ["put"]


def test_retries_give_up_after_max_attempts_with_a_note():
    class Down(MemoryStore):
        def head(self, key):
            self.requests.append("size")
            raise TimeoutError("read timed out")

    store = Down("bucket")
    with tempfile.TemporaryFile() as file, pytest.raises(TimeoutError) as info:
        download_to_file(store, "k", file, part_size=PART, max_concurrency=1, retry=FAST)
    assert store.requests == ["size"] * 4
    assert "gave up after 4 attempt(s)" in "".join(getattr(info.value, "__notes__", []))


def test_download_resumes_a_broken_range_where_it_stopped():
    class Breaking(MemoryStore):
        broke = False

        def read(self, key, start=0, end=None, *, version=None):
            body = self.objects[key][0][start:end]
            self.requests.append(f"read {start}")
            if not self.broke:
                self.broke = True
                yield body[:1000]
                raise ConnectionResetError("connection reset mid-body")
            yield body

    store = Breaking("bucket")
    body = bytes(range(256)) * 40
    store.objects["k"] = (body, {}, 0.0)
    with tempfile.TemporaryFile() as file:
        download_to_file(store, "k", file, part_size=1 << 20, max_concurrency=1, retry=FAST)
        file.seek(0)
        assert file.read() == body
    assert store.requests == ["read 0", "read 1000"]


@pytest.mark.parametrize("kwargs", [{"max_attempts": 0}, {"deadline": -1}, {"initial_backoff": "x"}])
def test_bad_retry_settings_are_named(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"`{name}`"):
        Retry(**kwargs)


def test_progress_reports_every_byte_of_a_save_and_a_load():
    seen: list[tuple[int, int | None]] = []
    saver = RemoteSaver(
        MemoryStore("bucket"), part_size=5 * MiB, max_concurrency=2, progress=lambda d, t: seen.append((d, t))
    )
    saver({"w": torch.zeros(3 * MiB)}, "p.pt")  # 12 MiB of tensors: three parts
    stored = len(saver.store.objects["p.pt"][0])
    assert seen[-1] == (stored, 12 * MiB)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and len(seen) == 3
    seen.clear()
    saver.load("p.pt")
    assert seen[-1] == (stored, stored)


def test_saver_load_retries_a_broken_download():
    class BreaksOnce(MemoryStore):
        broken = False

        def read(self, key, start=0, end=None, *, version=None):
            if not self.broken:
                self.broken = True
                raise ConnectionResetError("reset before the first byte")
            yield from super().read(key, start, end, version=version)

    saver = RemoteSaver(BreaksOnce("bucket"), part_size=5 * MiB, retry=FAST)
    saver({"w": torch.arange(10.0)}, "x.pt")
    assert torch.equal(saver.load("x.pt")["w"], torch.arange(10.0))
    assert saver.store.broken


QUIET_SCRIPT = """
import torch
from ckptcloud.remote import RemoteSaver
from ckptcloud.retry import Retry
from ckptcloud.stores.memory import MemoryStore

class Flaky(MemoryStore):
    failed = False
    def put(self, key, data, metadata, when=None):
        if not self.failed:
            self.failed = True
            raise ConnectionResetError("reset")
        super().put(key, data, metadata, when)

saver = RemoteSaver(Flaky("b"), retry=Retry(initial_backoff=0.001))
saver({"w": torch.ones(1)}, "x.pt")
print("saved", saver.store.failed)
"""


def test_the_library_prints_nothing_by_default_even_when_it_retries():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", QUIET_SCRIPT], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "saved True"
    assert "retrying" not in out.stderr and "reset" not in out.stderr


def test_the_size_estimate_counts_each_storage_once_and_whole():
    from ckptcloud.remote import _estimate_nbytes

    big = torch.zeros(1024, 1024)  # 4 MiB
    assert _estimate_nbytes({"tied": big, "again": big, "view": big[:1]}) == 4 * MiB  # was 8 MiB + 4 KiB
    assert _estimate_nbytes({"row": big[0]}) == 4 * MiB  # torch.save writes the whole storage (was 4 KiB)


def test_progress_total_matches_what_is_written_for_tied_weights():
    calls = []
    saver = RemoteSaver(MemoryStore("b", min_part_size=MiB), "p", part_size=MiB, progress=lambda d, t: calls.append(t))
    big = torch.zeros(1024, 1024)
    saver({"a": big, "b": big}, "m.pt")
    written = len(saver.store.objects["p/m.pt"][0])
    assert 4 * MiB <= calls[-1] <= written  # the estimate is the tensors' bytes, written adds pickle and trailer
