"""dcp.save / dcp.load / dcp.async_save through CloudStorageWriter and CloudStorageReader, in one process."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp

from ckptcloud.dcp import CloudStorageReader, CloudStorageWriter, files_of, is_committed, read_metadata
from ckptcloud.stores.memory import MemoryStore

from .helpers import PART, RecordingStore, blank_like, memory_saver, tensors_equal, training_state

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def test_round_trip_restores_model_optimizer_and_plain_values_exactly():
    store = RecordingStore()
    saver = memory_saver(store)
    state = training_state()
    dcp.save(state, storage_writer=CloudStorageWriter.from_saver(saver, "step-7"), no_dist=True)
    loaded = blank_like(state)
    dcp.load(loaded, storage_reader=CloudStorageReader.from_saver(saver, "step-7"), no_dist=True)
    assert tensors_equal(loaded, state)
    assert is_committed(store, "runs/step-7")


def test_each_rank_streams_one_file_in_parts_with_no_part_held_back():
    store = RecordingStore()
    state = training_state()
    dcp.save(state, storage_writer=CloudStorageWriter.from_saver(memory_saver(store), "s"), no_dist=True)
    (data,) = [key for key in store.objects if key.endswith(".distcp")]
    size = len(store.objects[data][0])
    assert size > 10 * PART  # really multipart
    assert store.requests.count("put_part") == -(-size // PART)  # every part full but the last: flush() sent nothing
    assert store.requests.count("begin") == 1 and store.requests.count("complete") == 1
    assert store.requests.count("put") == 1  # .metadata, small: one request


def test_flush_after_every_item_costs_no_request():
    store = MemoryStore("bucket", min_part_size=PART)
    many_small = {f"t{i}": torch.full((10,), float(i)) for i in range(200)}  # torch.save flushes after each one
    dcp.save(many_small, storage_writer=CloudStorageWriter.from_saver(memory_saver(store), "s"), no_dist=True)
    (data,) = [key for key in store.objects if key.endswith(".distcp")]
    size = len(store.objects[data][0])
    assert store.requests.count("put_part") == -(-size // PART)  # only full parts, and the last: no short ones


def test_file_url_round_trip_is_readable_by_torch_filesystem_reader(tmp_path):
    state = training_state()
    url = (tmp_path / "ck" / "step-7").as_uri()
    dcp.save(state, storage_writer=CloudStorageWriter(url, part_size=PART), no_dist=True)
    mine = blank_like(state)
    dcp.load(mine, storage_reader=CloudStorageReader(url), no_dist=True)
    assert tensors_equal(mine, state)
    theirs = blank_like(state)
    dcp.load(theirs, storage_reader=dcp.FileSystemReader(tmp_path / "ck" / "step-7"), no_dist=True)
    assert tensors_equal(theirs, state)
    names = sorted(p.name for p in (tmp_path / "ck" / "step-7").iterdir() if p.is_file())
    assert names[0] == ".metadata" and len(names) == 2 and names[1].endswith(".distcp")


def test_reader_loads_checkpoints_written_by_torch_filesystem_writer(tmp_path):
    state = training_state()
    dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp_path / "fs"), no_dist=True)
    loaded = blank_like(state)
    dcp.load(loaded, storage_reader=CloudStorageReader((tmp_path / "fs").as_uri()), no_dist=True)
    assert tensors_equal(loaded, state)


def test_metadata_records_each_file_size_and_crc32c():
    store = MemoryStore("bucket", min_part_size=PART)
    dcp.save(training_state(), storage_writer=CloudStorageWriter.from_saver(memory_saver(store), "s"), no_dist=True)
    from ckptcloud.checksum import crc32c

    (record,) = files_of(read_metadata(store, "runs/s")).values()
    body = store.objects[f"runs/s/{record.name}"][0]
    assert (record.size, record.crc32c) == (len(body), crc32c(body))


def test_checkpoint_id_saves_to_another_folder_of_the_same_bucket(tmp_path):
    writer = CloudStorageWriter((tmp_path / "a").as_uri())
    dcp.save({"w": torch.ones(2)}, checkpoint_id=(tmp_path / "b").as_uri(), storage_writer=writer, no_dist=True)
    assert (tmp_path / "b" / ".metadata").is_file() and not (tmp_path / "a").exists()
    with pytest.raises(ValueError, match="not in s3://other/"):
        CloudStorageWriter("s3://other/x", endpoint_url="http://127.0.0.1:1").reset("s3://elsewhere/y")


def test_async_save_in_thread_mode_commits_when_the_future_completes(tmp_path):
    url = (tmp_path / "async").as_uri()
    state = training_state()
    future = dcp.async_save(state, storage_writer=CloudStorageWriter(url), no_dist=True)
    future.result(timeout=120)
    loaded = blank_like(state)
    dcp.load(loaded, storage_reader=CloudStorageReader(url), no_dist=True)
    assert tensors_equal(loaded, state)


def test_writer_pickles_its_url_and_options_and_rebuilds_its_store(tmp_path):
    writer = CloudStorageWriter((tmp_path / "p").as_uri(), part_size=PART, max_concurrency=2)
    clone = pickle.loads(pickle.dumps(writer))
    assert clone._target._saver is None  # nothing built until used
    dcp.save({"w": torch.arange(3.0)}, storage_writer=clone, no_dist=True)
    assert (clone._target.part_size, clone._target.max_concurrency) == (PART, 2)
    state = {"w": torch.zeros(3)}
    dcp.load(state, storage_reader=pickle.loads(pickle.dumps(CloudStorageReader((tmp_path / "p").as_uri()))))
    assert torch.equal(state["w"], torch.arange(3.0))


def test_a_writer_whose_options_do_not_pickle_says_which_option(tmp_path):
    writer = CloudStorageWriter((tmp_path / "p").as_uri(), progress=lambda done, total: None)
    with pytest.raises(TypeError, match=r"option `progress`.*thread mode"):
        pickle.dumps(writer)
    with pytest.raises(TypeError, match="made from a saver"):
        pickle.dumps(CloudStorageWriter.from_saver(memory_saver(MemoryStore(min_part_size=PART)), "x"))


def test_options_are_checked_when_the_writer_is_made(tmp_path):
    url = (tmp_path / "o").as_uri()
    with pytest.raises(TypeError, match="unexpected option"):
        CloudStorageWriter(url, pickle_protocol=2)
    with pytest.raises(TypeError, match="save_on_rank is not an option"):
        CloudStorageWriter(url, save_on_rank=1)
    with pytest.raises(ValueError, match="part_size"):
        CloudStorageWriter("s3://bucket/ck", part_size=1024, endpoint_url="http://127.0.0.1:1")
    with pytest.raises(ValueError, match="should name a folder"):
        CloudStorageReader("file:///")


def test_per_rank_metadata_without_collectives_is_refused(tmp_path):
    with pytest.raises(BaseException, match="use_collectives=True"):
        dcp.save({"w": torch.ones(1)}, storage_writer=CloudStorageWriter((tmp_path / "c").as_uri()),
                 no_dist=True, use_collectives=False)  # fmt: skip
    assert not (tmp_path / "c" / ".metadata").exists()
