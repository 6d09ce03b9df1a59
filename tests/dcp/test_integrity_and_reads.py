"""Loads check every item's CRC32C, refuse foreign classes in ``.metadata``, and fetch only the bytes they need."""

from __future__ import annotations

import collections
import itertools
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from ckptcloud.dcp import CloudStorageReader, CloudStorageWriter, read_metadata
from ckptcloud.dcp.layout import ItemLocation
from ckptcloud.errors import IntegrityError
from ckptcloud.stores.memory import MemoryStore

from .helpers import PART, RecordingStore, blank_like, memory_saver, rank_failure, tensors_equal, training_state

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def _save(store: MemoryStore, state: dict, **options) -> None:
    dcp.save(state, storage_writer=CloudStorageWriter.from_saver(memory_saver(store, **options), "s"), no_dist=True)


def _reader(store: MemoryStore, **options) -> CloudStorageReader:
    return CloudStorageReader.from_saver(memory_saver(store, **options), "s")


def _data_key(store: MemoryStore) -> str:
    (key,) = [key for key in store.objects if key.endswith(".distcp")]
    return key


def _flip_byte(store: MemoryStore, key: str, position: int) -> None:
    body, meta, mtime = store.objects[key]
    changed = bytearray(body)
    changed[position] ^= 0x01
    store.objects[key] = (bytes(changed), meta, mtime)


def test_a_changed_byte_in_a_data_file_fails_the_load_naming_the_file_and_the_item():
    store = MemoryStore("bucket", min_part_size=PART)
    state = training_state()
    _save(store, state)
    loc = read_metadata(store, "runs/s").storage_data
    where = next(loc[i] for i in loc if i.fqn == "model.2.weight")
    _flip_byte(store, _data_key(store), where.offset + where.length // 2)
    with pytest.raises(CheckpointException) as caught:
        dcp.load(blank_like(state), storage_reader=_reader(store), no_dist=True)
    error = rank_failure(caught.value)
    assert isinstance(error, IntegrityError)
    assert f"mem://bucket/{_data_key(store)} is damaged" in str(error) and "'model.2.weight'" in str(error)


def test_a_damaged_metadata_fails_the_load_before_anything_is_loaded():
    store = MemoryStore("bucket", min_part_size=PART)
    state = training_state()
    _save(store, state)
    _flip_byte(store, "runs/s/.metadata", 40)
    loaded = blank_like(state)
    with pytest.raises(CheckpointException) as caught:
        dcp.load(loaded, storage_reader=_reader(store), no_dist=True)
    # DCP re-raises any read_metadata failure as an AssertionError that quotes it
    assert "mem://bucket/runs/s/.metadata is damaged: CRC32C" in str(rank_failure(caught.value))
    assert loaded["step"] == 0 and tensors_equal(loaded["model"], blank_like(state)["model"])


def test_metadata_that_references_other_classes_is_refused_unless_trusted():
    store = MemoryStore("bucket", min_part_size=PART)
    state = {"w": torch.arange(5.0)}
    _save(store, state)
    metadata = read_metadata(store, "runs/s")
    metadata.planner_data = collections.Counter(a=1)  # a custom planner's data: any class at all
    store.objects["runs/s/.metadata"] = (pickle.dumps(metadata), {}, 0.0)
    with pytest.raises(CheckpointException) as caught:
        dcp.load({"w": torch.zeros(5)}, storage_reader=_reader(store), no_dist=True)
    assert "references collections.Counter" in str(rank_failure(caught.value))
    assert "trust_metadata=True" in str(rank_failure(caught.value))
    loaded = {"w": torch.zeros(5)}
    trusting = CloudStorageReader.from_saver(memory_saver(store), "s", trust_metadata=True)
    dcp.load(loaded, storage_reader=trusting, no_dist=True)
    assert torch.equal(loaded["w"], state["w"])


RAN: list[str] = []


def _mark(what: str) -> str:
    RAN.append(what)
    return what


class _Runs:
    """Stands in for a pickle that runs code when unpickled: DCP's planner would call it with weights_only=False."""

    def __reduce__(self):
        return (_mark, ("unpickled",))


def test_a_non_tensor_item_the_safe_unpickler_refuses_is_never_unpickled_unless_trusted():
    store = MemoryStore("bucket", min_part_size=PART)
    _save(store, {"w": torch.arange(3.0), "extra": _Runs()})
    RAN.clear()
    with pytest.raises(CheckpointException) as caught:
        dcp.load({"w": torch.zeros(3), "extra": None}, storage_reader=_reader(store), no_dist=True)
    assert "weights_only" in str(rank_failure(caught.value))
    assert RAN == []  # refused before DCP's planner could unpickle it
    trusting = CloudStorageReader.from_saver(memory_saver(store), "s", trust_metadata=True)
    dcp.load({"w": torch.zeros(3), "extra": None}, storage_reader=trusting, no_dist=True)
    assert RAN == ["unpickled"]


def _four_tensors() -> dict:
    return {name: torch.full((25_000,), float(i)) for i, name in enumerate("abcd")}  # 100 kB each


def _item(store: MemoryStore, fqn: str) -> ItemLocation:
    locations = read_metadata(store, "runs/s").storage_data
    return next(loc for index, loc in locations.items() if index.fqn == fqn)


def test_loading_some_keys_reads_only_their_bytes():
    store = RecordingStore()
    _save(store, _four_tensors(), part_size=1024 * 1024)
    store.reads.clear()
    loaded = {"b": torch.zeros(25_000)}
    dcp.load(loaded, storage_reader=_reader(store, part_size=1024 * 1024), no_dist=True)
    b = _item(store, "b")
    data_reads = [r for r in store.reads if r[0].endswith(".distcp")]
    assert data_reads == [(_data_key(store), b.offset, b.offset + b.length)]
    assert torch.equal(loaded["b"], torch.full((25_000,), 1.0))


def test_adjacent_items_are_coalesced_into_one_read_and_gaps_are_not_fetched():
    store = RecordingStore()
    _save(store, _four_tensors(), part_size=1024 * 1024)
    a, b, c = (_item(store, name) for name in "abc")
    assert a.offset + a.length == b.offset and b.offset + b.length == c.offset  # written back to back
    store.reads.clear()
    dcp.load({n: torch.zeros(25_000) for n in "ab"}, storage_reader=_reader(store, part_size=1024 * 1024))
    assert [r[1:] for r in store.reads if r[0].endswith(".distcp")] == [(a.offset, b.offset + b.length)]
    store.reads.clear()
    dcp.load({n: torch.zeros(25_000) for n in "ac"}, storage_reader=_reader(store, part_size=1024 * 1024))
    reads = sorted(r[1:] for r in store.reads if r[0].endswith(".distcp"))
    assert reads == [(a.offset, a.offset + a.length), (c.offset, c.offset + c.length)]


def test_an_item_longer_than_a_part_is_fetched_as_concurrent_part_sized_pieces():
    store = RecordingStore()
    big = {"w": torch.randn(5 * PART // 4)}  # five parts of data
    _save(store, big)
    w = _item(store, "w")
    store.reads.clear()
    loaded = {"w": torch.zeros_like(big["w"])}
    dcp.load(loaded, storage_reader=_reader(store), no_dist=True)
    pieces = sorted(r[1:] for r in store.reads if r[0].endswith(".distcp"))
    assert pieces[0][0] == w.offset and pieces[-1][1] == w.offset + w.length
    assert all(end - start <= PART for start, end in pieces) and len(pieces) == -(-w.length // PART)
    assert all(prev[1] == nxt[0] for prev, nxt in itertools.pairwise(pieces))  # no byte twice
    assert torch.equal(loaded["w"], big["w"])


def test_reads_of_many_small_items_group_into_part_sized_requests():
    store = RecordingStore()
    many = {f"t{i:03d}": torch.full((100,), float(i)) for i in range(300)}
    _save(store, many)
    size = len(store.objects[_data_key(store)][0])
    store.reads.clear()
    loaded = {name: torch.zeros(100) for name in many}
    dcp.load(loaded, storage_reader=_reader(store), no_dist=True)
    data_reads = [r for r in store.reads if r[0].endswith(".distcp")]
    assert sum(end - start for _, start, end in data_reads) == size  # every byte once
    assert len(data_reads) <= -(-size // PART) + 1 < len(many)
    assert all(torch.equal(loaded[name], many[name]) for name in many)
