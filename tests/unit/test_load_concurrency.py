"""Loads keep more ranged GETs in flight than saves keep parts (``load_concurrency``), at no memory cost per range."""

from __future__ import annotations

import itertools
import tempfile
import threading
import time

import pytest
import torch

from ckptcloud.download import MIN_RANGE_SIZE, NEARBY_SECONDS, download_to_file, split_ranges
from ckptcloud.remote import DEFAULT_LOAD_CONCURRENCY, MAX_CONCURRENCY_LIMIT, RemoteSaver
from ckptcloud.stores.base import MiB
from ckptcloud.stores.memory import MemoryStore

PART = 64 * 1024


class RecordingStore(MemoryStore):
    """Records the most reads in flight at once; with ``barrier``, every read waits until that many are in flight."""

    def __init__(self, head_seconds: float = 0.02) -> None:
        super().__init__("bucket", min_part_size=PART)
        self.head_seconds = head_seconds  # 20 ms: a cloud server; under NEARBY_SECONDS: one on this host or LAN
        self.in_flight = 0
        self.max_in_flight = 0
        self.barrier: threading.Barrier | None = None
        self.gauge = threading.Lock()

    def head(self, key):
        time.sleep(self.head_seconds)
        return super().head(key)

    def read(self, key, start=0, end=None, *, version=None):
        with self.gauge:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.barrier is not None:
                self.barrier.wait(timeout=10)  # BrokenBarrierError unless that many reads run at once
            yield from super().read(key, start, end, version=version)
        finally:
            with self.gauge:
                self.in_flight -= 1


def _saved(store: RecordingStore, **options) -> tuple[RemoteSaver, dict]:
    saver = RemoteSaver(store, "run", part_size=PART, **options)
    state = {"w": torch.arange(2 * MiB, dtype=torch.int32)}  # 8 MiB: 128 parts of 64 KiB
    saver(state, "model_1.pt")
    return saver, state


def _load_with_barrier(store: RecordingStore, saver: RemoteSaver, parties: int) -> dict:
    store.barrier = threading.Barrier(parties)
    store.max_in_flight = 0
    return saver.load("model_1.pt")


def test_default_load_keeps_32_ranges_in_flight():
    store = RecordingStore()
    saver, state = _saved(store)  # max_concurrency left at its default (8)
    assert saver.load_concurrency == DEFAULT_LOAD_CONCURRENCY == 32
    back = _load_with_barrier(store, saver, 32)
    assert torch.equal(back["w"], state["w"])
    assert store.max_in_flight == 32


def test_default_load_keeps_more_ranges_in_flight_than_the_parts_a_save_uploads_at_once():
    store = RecordingStore()
    saver, state = _saved(store, max_concurrency=2)
    assert saver.load_concurrency == 32
    assert torch.equal(_load_with_barrier(store, saver, 32)["w"], state["w"])


def test_default_load_concurrency_is_at_least_max_concurrency():
    store = RecordingStore()
    saver, state = _saved(store, max_concurrency=48)
    assert saver.load_concurrency == 48
    assert torch.equal(_load_with_barrier(store, saver, 48)["w"], state["w"])


def test_default_load_keeps_8_ranges_in_flight_from_a_nearby_server():
    store = RecordingStore(head_seconds=0)
    saver, state = _saved(store)
    assert torch.equal(_load_with_barrier(store, saver, 8)["w"], state["w"])
    assert store.max_in_flight == 8
    store = RecordingStore(head_seconds=0)
    saver, state = _saved(store, max_concurrency=12)  # 8, as 0.1's default loads had, whatever saves use
    assert torch.equal(_load_with_barrier(store, saver, 8)["w"], state["w"])
    assert store.max_in_flight == 8


def test_nearby_means_a_head_answered_within_10_ms():
    assert NEARBY_SECONDS == 0.01
    assert RecordingStore().head_seconds > NEARBY_SECONDS


@pytest.mark.parametrize("head_seconds", [0, 0.02])
@pytest.mark.parametrize("load_concurrency", [1, 4, 32])
def test_load_concurrency_sets_the_ranges_in_flight(load_concurrency, head_seconds):
    store = RecordingStore(head_seconds)  # a load_concurrency given is kept, also for a nearby server
    saver, state = _saved(store, load_concurrency=load_concurrency)
    before = store.requests.count("read")
    assert torch.equal(_load_with_barrier(store, saver, load_concurrency)["w"], state["w"])
    assert store.requests.count("read") - before == load_concurrency  # one GET per range, none more
    assert store.max_in_flight == load_concurrency


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (0, ValueError, rf"`load_concurrency` should be between 1 and {MAX_CONCURRENCY_LIMIT}, but given 0"),
        (65, ValueError, rf"`load_concurrency` should be between 1 and {MAX_CONCURRENCY_LIMIT}, but given 65"),
        (2.0, TypeError, r"`load_concurrency` should be an int, but given <class 'float'>"),
        (True, TypeError, r"`load_concurrency` should be an int, but given <class 'bool'>"),
        ("8", TypeError, r"`load_concurrency` should be an int, but given <class 'str'>"),
    ],
)
def test_bad_load_concurrency_is_refused_naming_the_argument(value, error, message):
    with pytest.raises(error, match=message):
        RemoteSaver(MemoryStore(), load_concurrency=value)


def test_bad_max_concurrency_is_still_named_with_the_default_load_concurrency():
    with pytest.raises(ValueError, match=r"`max_concurrency` should be between 1 and 64, but given 0"):
        RemoteSaver(MemoryStore(), max_concurrency=0)


def test_ranges_are_equal_and_at_least_the_minimum_range_size():
    size = 256 * MiB
    ranges = split_ranges(size, 16 * MiB, 32)
    assert len(ranges) == 32 and {end - start for start, end in ranges} == {8 * MiB}
    assert ranges[0][0] == 0 and ranges[-1][1] == size
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    assert all(end - start >= MIN_RANGE_SIZE for start, end in split_ranges(40 * MiB, 16 * MiB, 32)[:-1])
    assert split_ranges(16 * MiB, 16 * MiB, 32) == [(0, 16 * MiB)]  # fits in one part: one GET
    assert split_ranges(size, 16 * MiB, 1) == [(0, size)]


def test_download_to_file_with_more_ranges_than_the_object_has_parts():
    store = MemoryStore("bucket", min_part_size=PART)
    body = bytes(range(256)) * 4099
    store.put("k", memoryview(body), {})
    with tempfile.TemporaryFile() as file:
        assert download_to_file(store, "k", file, part_size=1000, max_concurrency=64) == len(body)
        file.seek(0)
        assert file.read() == body
    assert store.requests.count("read") == 64


def test_s3_saver_pools_enough_connections_for_its_loads():
    pytest.importorskip("boto3")
    from ckptcloud.savers import S3Saver

    options = {"endpoint_url": "http://127.0.0.1:9", "region_name": "us-east-1", "check_bucket": False}
    saver = S3Saver("bucket", require_empty=False, **options)
    assert saver.store.client.meta.config.max_pool_connections >= saver.load_concurrency == 32
    saver = S3Saver("bucket", require_empty=False, max_concurrency=4, load_concurrency=2, **options)
    assert saver.store.client.meta.config.max_pool_connections >= 4


def test_default_saves_upload_16_parts_of_8_mib_at_once():
    saver = RemoteSaver(MemoryStore())
    assert (saver.part_size, saver.max_concurrency, saver.load_concurrency) == (8 * MiB, 16, 32)


def test_gcs_saves_keep_16_mib_parts_8_at_once_and_loads_as_many_ranges():
    """Fewer, larger parts keep 32 parts (one compose level) up to 512 MiB; the same memory as 8 MiB x 16."""
    from unittest import mock

    from ckptcloud.savers import GCSSaver

    options = {"client": mock.MagicMock(), "check_bucket": False, "require_empty": False}
    composite = GCSSaver("bucket", **options)
    assert (composite.part_size, composite.max_concurrency, composite.load_concurrency) == (16 * MiB, 8, 8)
    chosen = GCSSaver("bucket", max_concurrency=4, **options)
    assert (chosen.part_size, chosen.max_concurrency) == (16 * MiB, 4)
    resumable = GCSSaver("bucket", upload="resumable", **options)
    assert (resumable.part_size, resumable.max_concurrency, resumable.load_concurrency) == (8 * MiB, 2, 2)
    assert GCSSaver("bucket", load_concurrency=24, **options).load_concurrency == 24
