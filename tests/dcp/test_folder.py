"""Folder-level operations the retention, CLI and cleanup build on: committed or not, verify, delete."""

from __future__ import annotations

import pytest
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from ckptcloud.dcp import (
    CloudStorageReader,
    CloudStorageWriter,
    delete_folder,
    is_committed,
    list_folder,
    verify_folder,
)
from ckptcloud.errors import IntegrityError
from ckptcloud.stores.memory import MemoryStore

from .helpers import PART, memory_saver, rank_failure, training_state

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def _saved(folder: str = "s") -> MemoryStore:
    store = MemoryStore("bucket", min_part_size=PART)
    dcp.save(training_state(), storage_writer=CloudStorageWriter.from_saver(memory_saver(store), folder), no_dist=True)
    return store


def test_a_folder_without_metadata_is_not_a_checkpoint_and_does_not_load():
    store = _saved()
    data = [key for key in store.objects if key.endswith(".distcp")]
    store.delete("runs/s/.metadata")  # what a save killed before its commit leaves
    assert not is_committed(store, "runs/s") and data
    with pytest.raises(CheckpointException) as caught:
        dcp.load(training_state(), storage_reader=CloudStorageReader.from_saver(memory_saver(store), "s"))
    assert "no sharded checkpoint at mem://bucket/runs/s" in str(rank_failure(caught.value))


def test_delete_folder_removes_the_metadata_first_then_every_file_in_batches():
    store = _saved()
    store.put("runs/s/__9_leftover.distcp", memoryview(b"x"), {})  # a failed save's file
    store.put("runs/s-other/.metadata", memoryview(b"x"), {})  # a neighbour sharing the name's start
    store.requests.clear()
    assert delete_folder(store, "runs/s") == 2
    assert store.requests == ["delete", "delete_many"]  # .metadata alone, then the rest in one request
    assert list_folder(store, "runs/s") == [] and "runs/s-other/.metadata" in store.objects


def test_verify_folder_checks_every_file_whole_and_names_a_damaged_one():
    store = _saved()
    (checked,) = verify_folder(store, "runs/s", part_size=PART, max_concurrency=2)
    key = f"runs/s/{checked.name}"
    body, meta, mtime = store.objects[key]
    damaged = bytearray(body)
    damaged[-1] ^= 0x80  # the last byte: only a whole-file check sees bytes no item load needs first
    store.objects[key] = (bytes(damaged), meta, mtime)
    with pytest.raises(IntegrityError, match=f"mem://bucket/{key} is damaged: CRC32C"):
        verify_folder(store, "runs/s", part_size=PART)
    store.objects[key] = (body[:-1], meta, mtime)
    with pytest.raises(IntegrityError, match="bytes where"):
        verify_folder(store, "runs/s")
    store.delete(key)
    with pytest.raises(FileNotFoundError, match="is missing"):
        verify_folder(store, "runs/s")


def test_a_rank_with_nothing_to_write_writes_no_file():
    store = MemoryStore("bucket", min_part_size=PART)
    writer = CloudStorageWriter.from_saver(memory_saver(store), "s")
    dcp.save({}, storage_writer=writer, no_dist=True)
    assert sorted(store.objects) == ["runs/s/.metadata"]
    dcp.load({}, storage_reader=CloudStorageReader.from_saver(memory_saver(store), "s"), no_dist=True)
