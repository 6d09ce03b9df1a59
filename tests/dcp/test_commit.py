"""All or nothing: ``.metadata`` is created last, only once every file is committed, and only if absent."""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from ckptcloud.dcp import CheckpointExistsError, CloudStorageReader, CloudStorageWriter, is_committed
from ckptcloud.errors import CkptcloudError, TransientError
from ckptcloud.stores.memory import MemoryStore

from .helpers import PART, blank_like, memory_saver, rank_failure, tensors_equal, training_state

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def _save(store: MemoryStore, folder: str, state: dict) -> None:
    dcp.save(state, storage_writer=CloudStorageWriter.from_saver(memory_saver(store), folder), no_dist=True)


def _load(store: MemoryStore, folder: str, like: dict) -> dict:
    loaded = blank_like(like)
    dcp.load(loaded, storage_reader=CloudStorageReader.from_saver(memory_saver(store), folder), no_dist=True)
    return loaded


def _keys(store: MemoryStore, folder: str) -> list[str]:
    return sorted(key for key in store.objects if key.startswith(f"runs/{folder}/"))


class WatchesTheCommit(MemoryStore):
    """Records, when ``.metadata`` is published, which data files exist and which uploads are still open."""

    def __init__(self) -> None:
        super().__init__("bucket", min_part_size=PART)
        self.published: list[str] = []
        self.at_commit: tuple[list[str], int] | None = None

    def _record(self, key: str) -> None:
        if key.endswith("/.metadata"):
            data = [k for k in self.objects if k.endswith(".distcp")]
            self.at_commit = (data, len(self.uploads))
        self.published.append(key)

    def put(self, key, data, metadata, when=None):
        self._record(key)
        super().put(key, data, metadata, when)

    def complete(self, upload, parts, when=None):
        self._record(self.uploads[upload].key)
        super().complete(upload, parts, when)


def test_metadata_is_created_last_and_only_after_every_data_file_is_committed():
    store = WatchesTheCommit()
    _save(store, "s", training_state())
    assert store.published[-1] == "runs/s/.metadata"
    data_files, open_uploads = store.at_commit
    assert len(data_files) == 1 and open_uploads == 0


def test_a_failing_file_upload_leaves_no_metadata_nothing_in_the_folder_and_the_older_checkpoint_intact():
    class DeniesPartThree(MemoryStore):
        def put_part(self, upload, number, data):
            if "step-2" in self.uploads[upload].key and number == 3:
                raise PermissionError("AccessDenied: bucket policy")
            return super().put_part(upload, number, data)

    store = DeniesPartThree("bucket", min_part_size=PART)
    old = training_state()
    _save(store, "step-1", old)
    with pytest.raises(CheckpointException) as caught:
        _save(store, "step-2", training_state(seed=2))
    assert isinstance(rank_failure(caught.value), PermissionError)
    assert _keys(store, "step-2") == [] and store.uploads == {}  # the upload was aborted, nothing published
    assert not is_committed(store, "runs/step-2")
    assert tensors_equal(_load(store, "step-1", old), old)


def test_a_committed_id_is_refused_before_anything_is_uploaded():
    store = MemoryStore("bucket", min_part_size=PART)
    first = training_state()
    _save(store, "s", first)
    before = list(store.requests)
    with pytest.raises(CheckpointException) as caught:
        _save(store, "s", training_state(seed=2))
    assert isinstance(rank_failure(caught.value), CheckpointExistsError)
    assert "already committed at mem://bucket/runs/s" in str(rank_failure(caught.value))
    assert not {"begin", "put", "put_part"} & set(store.requests[len(before) :])
    assert tensors_equal(_load(store, "s", first), first)


def test_two_saves_racing_for_one_id_commit_exactly_one_and_the_loser_removes_only_its_own_files():
    store = MemoryStore("bucket", min_part_size=PART)
    winner, loser = training_state(seed=3), training_state(seed=4)

    class CommitsAnotherSaveMeanwhile(CloudStorageWriter):
        def write_data(self, plan, planner):
            result = super().write_data(plan, planner)
            _save(store, "s", winner)  # another job commits the same id while this one is still writing
            return result

    slow = CommitsAnotherSaveMeanwhile.from_saver(memory_saver(store), "s")
    with pytest.raises(CheckpointException) as caught:
        dcp.save(loser, storage_writer=slow, no_dist=True)
    error = rank_failure(caught.value)
    assert isinstance(error, CheckpointExistsError) and isinstance(error, FileExistsError)
    assert "another save committed mem://bucket/runs/s first" in str(error)
    assert len([k for k in _keys(store, "s") if k.endswith(".distcp")]) == 1  # the winner's file only
    assert tensors_equal(_load(store, "s", winner), winner)


def test_a_retried_create_whose_first_answer_was_lost_commits():
    class LosesTheFirstAnswer(MemoryStore):
        lost = False

        def put(self, key, data, metadata, when=None):
            super().put(key, data, metadata, when)
            if key.endswith("/.metadata") and not self.lost:
                self.lost = True
                raise TransientError("connection reset after the object was stored")

    store = LosesTheFirstAnswer("bucket", min_part_size=PART)
    state = training_state()
    _save(store, "s", state)
    assert store.lost and tensors_equal(_load(store, "s", state), state)


def test_a_create_whose_answers_were_all_lost_is_found_committed_by_its_token():
    class LosesEveryAnswer(MemoryStore):
        def put(self, key, data, metadata, when=None):
            super().put(key, data, metadata, when)
            if key.endswith("/.metadata"):
                raise TransientError("connection reset after the object was stored")

    store = LosesEveryAnswer("bucket", min_part_size=PART)
    state = training_state()
    _save(store, "s", state)  # the retries run out, then a HEAD finds this save's own .metadata
    assert tensors_equal(_load(store, "s", state), state)


def test_the_commit_is_refused_when_a_data_file_vanished_during_the_save():
    class LifecycleRuleDeletes(MemoryStore):
        def complete(self, upload, parts, when=None):
            key = self.uploads[upload].key
            super().complete(upload, parts, when)
            self.delete(key)

    store = LifecycleRuleDeletes("bucket", min_part_size=PART)
    with pytest.raises(CheckpointException) as caught:
        _save(store, "s", training_state())
    error = rank_failure(caught.value)
    assert isinstance(error, CkptcloudError) and "missing or not at the size written" in str(error)
    assert not is_committed(store, "runs/s")


def test_a_failure_while_resolving_an_item_aborts_the_upload_and_commits_nothing():
    store = MemoryStore("bucket", min_part_size=PART)

    class Exploding(torch.Tensor):
        pass

    state = training_state()
    state["model"]["0.weight"] = torch.randn(300, 300)  # several parts before the failing item
    state["zz"] = torch.ones(3).as_subclass(Exploding)

    def explode(*args, **kwargs):
        raise RuntimeError("device lost while copying to the host")

    Exploding.detach = explode  # type: ignore[method-assign]
    with pytest.raises(CheckpointException) as caught:
        _save(store, "s", state)
    assert "device lost" in str(rank_failure(caught.value))
    assert store.requests.count("put_part") >= 2 and store.requests[-1] == "abort"  # parts went up, then aborted
    assert _keys(store, "s") == [] and store.uploads == {}


def test_on_a_local_folder_too_only_one_of_two_racing_saves_commits(tmp_path):
    url = (tmp_path / "ck").as_uri()
    winner, loser = {"w": torch.ones(4)}, {"w": torch.zeros(4)}

    class CommitsAnotherSaveMeanwhile(CloudStorageWriter):
        def write_data(self, plan, planner):
            result = super().write_data(plan, planner)
            dcp.save(winner, storage_writer=CloudStorageWriter(url), no_dist=True)
            return result

    with pytest.raises(CheckpointException) as caught:
        dcp.save(loser, storage_writer=CommitsAnotherSaveMeanwhile(url), no_dist=True)
    assert isinstance(rank_failure(caught.value), CheckpointExistsError)
    assert len(list((tmp_path / "ck").glob("*.distcp"))) == 1
    loaded = {"w": torch.full((4,), 7.0)}
    dcp.load(loaded, storage_reader=CloudStorageReader(url), no_dist=True)
    assert torch.equal(loaded["w"], winner["w"])
