"""``Checkpoint(..., sharded=True)``: retention, resume and loading of sharded (DCP) checkpoint folders, in one
process, on a MemoryStore, a local folder and S3 (moto).

A folder counts as a checkpoint only once its ``.metadata`` exists; its retention metadata is that object's.
"""

from __future__ import annotations

import copy
from urllib.parse import unquote

import pytest
import torch

from ckptcloud import Checkpoint
from ckptcloud._retention import DEFAULT_N_SAVED
from ckptcloud.dcp import CloudStorageReader, is_committed
from ckptcloud.dcp.retention import ShardedSaver, list_sharded
from ckptcloud.remote import RemoteSaver
from ckptcloud.stores.memory import MemoryStore

from .helpers import tensors_equal

pytest.importorskip("numpy", reason="torch.distributed.checkpoint needs numpy (ckptcloud[dcp])")
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")

RETENTION_KEYS = {
    "ckptcloud_priority",
    "ckptcloud_score_name",
    "ckptcloud_basename",
    "ckptcloud_run",
    "ckptcloud_step",
    "ckptcloud_time",
    "ckptcloud_score",
}


class Trainer:
    """A model and its Adam optimizer, one step at a time, with a copy of their state at every step."""

    def __init__(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-2)
        self.states: dict[int, dict] = {}

    def objects(self) -> dict:
        return {"model": self.model, "optimizer": self.optimizer}

    def step(self, step: int) -> None:
        self.model(torch.randn(4, 8)).pow(2).sum().backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.states[step] = self.state()

    def state(self) -> dict:
        return copy.deepcopy({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()})


class RecordingStore(MemoryStore):
    """A MemoryStore that logs creates and deletes in order, and can fail the uploads of one folder."""

    def __init__(self) -> None:
        super().__init__("bucket", min_part_size=1024)
        self.log: list[tuple[str, str]] = []
        self.fail_under: str | None = None

    def _maybe_fail(self, key: str) -> None:
        if self.fail_under is not None and key.startswith(self.fail_under):
            raise PermissionError(f"AccessDenied: {key}")

    def put(self, key, data, metadata, when=None):
        self._maybe_fail(key)
        super().put(key, data, metadata, when)
        self.log.append(("put", key))

    def begin(self, key, metadata):
        self._maybe_fail(key)
        return super().begin(key, metadata)

    def complete(self, upload, parts, when=None):
        key = self.uploads[upload].key
        super().complete(upload, parts, when)
        self.log.append(("put", key))

    def delete(self, key):
        self.log.append(("delete", key))
        super().delete(key)

    def delete_many(self, keys):
        self.log.append(("delete_many", ",".join(keys)))
        super().delete_many(keys)


def folders(store: MemoryStore, prefix: str = "runs/") -> set[str]:
    return {key[len(prefix) :].split("/")[0] for key in store.objects if key.startswith(prefix)}


def make(store: MemoryStore, trainer: Trainer, **kwargs) -> Checkpoint:
    saver = RemoteSaver(store, "runs", check_bucket=False, require_empty=False, part_size=1024)
    kwargs.setdefault("n_saved", 2)
    kwargs.setdefault("score_name", "acc")
    return Checkpoint(trainer.objects(), saver, sharded=True, **kwargs)


SCORES = [(1, 0.5), (2, 0.9), (3, 0.7), (4, 0.6), (5, 0.8)]


def train_and_save(store: MemoryStore, trainer: Trainer, **kwargs) -> Checkpoint:
    ckpt = make(store, trainer, **kwargs)
    for step, acc in SCORES:
        trainer.step(step)
        ckpt.save(global_step=step, score=acc)
    return ckpt


def test_n_saved_2_leaves_exactly_the_2_best_committed_folders_and_nothing_else():
    store, trainer = MemoryStore("bucket", min_part_size=1024), Trainer()
    ckpt = train_and_save(store, trainer)
    kept = ["checkpoint_5_acc=0.8000", "checkpoint_2_acc=0.9000"]  # folder names: the single-file names minus .pt
    assert ckpt.state_dict() == {"_saved": [(0.8, kept[0]), (0.9, kept[1])]}
    assert ckpt.last_checkpoint == kept[1]
    assert folders(store) == set(kept)  # evicted folders are gone whole, not just their .metadata
    listed = list_sharded(ckpt.save_handler.saver)
    assert sorted(listed) == sorted(kept)
    for name, info in listed.items():
        assert info.key == f"runs/{name}/.metadata"
        assert RETENTION_KEYS <= set(info.metadata)
        assert unquote(info.metadata["ckptcloud_basename"]) == "checkpoint"
    best = listed[kept[1]].metadata
    assert (best["ckptcloud_priority"], best["ckptcloud_score"], best["ckptcloud_step"]) == ("0.9", "0.9", "2")
    assert best["ckptcloud_score_name"] == "acc" and best["ckptcloud_run"] == ckpt.run_id


def test_resume_restores_the_kept_list_and_records_from_the_committed_folders():
    store, trainer = MemoryStore("bucket", min_part_size=1024), Trainer()
    first = train_and_save(store, trainer)
    again = make(store, Trainer(seed=1), resume=True)
    assert again.state_dict() == first.state_dict()
    assert again.run_id == first.run_id
    assert again.last_checkpoint == first.last_checkpoint
    assert again._records == first._records  # step, save time and score: what keep= policies read


def test_load_objects_of_a_kept_folder_restores_model_and_optimizer_bit_identically():
    store, trainer = MemoryStore("bucket", min_part_size=1024), Trainer()
    ckpt = train_and_save(store, trainer)
    fresh = Trainer(seed=1)
    again = make(store, fresh, resume=True)
    again.load_objects(fresh.objects(), again.last_checkpoint)  # checkpoint_2_acc=0.9000: the state after step 2
    assert tensors_equal(fresh.state(), trainer.states[2])
    other = Trainer(seed=2)
    ckpt.load_objects(other.objects(), ckpt.save_handler.url("checkpoint_5_acc=0.8000"))  # by URL, through the saver
    assert tensors_equal(other.state(), trainer.states[5])
    assert "checkpoint_2_acc=0.9000" in again.guarded  # the loaded folder is kept until a newer commit


def test_static_load_objects_takes_a_local_folder_path_a_file_url_or_a_reader(tmp_path):
    trainer = Trainer()
    ckpt = Checkpoint(trainer.objects(), tmp_path / "run", sharded=True, n_saved=1)
    trainer.step(7)
    assert ckpt.save(global_step=7) == "checkpoint_7"
    folder = tmp_path / "run" / "checkpoint_7"
    assert (folder / ".metadata").is_file()
    for source in (folder, str(folder), folder.as_uri(), CloudStorageReader(folder.as_uri())):
        fresh = Trainer(seed=3)
        Checkpoint.load_objects(fresh.objects(), source)
        assert tensors_equal(fresh.state(), trainer.states[7])


def test_an_uncommitted_folder_is_never_counted_by_resume_nor_deleted_by_it():
    store, trainer = MemoryStore("bucket", min_part_size=1024), Trainer()
    train_and_save(store, trainer)
    leftover = "runs/checkpoint_9_acc=0.9900/__0_deadbeef.distcp"  # a killed save: a data file, no .metadata
    store.put(leftover, memoryview(b"x" * 10), {})
    again = make(store, Trainer(seed=1), resume=True, n_saved=1)  # resume trims to 1: it deletes surplus folders
    assert [name for _, name in again.state_dict()["_saved"]] == ["checkpoint_2_acc=0.9000"]
    assert "checkpoint_9_acc=0.9900" not in list_sharded(again.save_handler.saver)
    assert leftover in store.objects  # not a checkpoint: left for `ckptcloud cleanup`
    assert folders(store) == {"checkpoint_2_acc=0.9000", "checkpoint_9_acc=0.9900"}


def test_a_failed_save_raises_and_leaves_the_kept_list_and_older_folders_intact():
    store, trainer = RecordingStore(), Trainer()
    ckpt = make(store, trainer)
    for step, acc in SCORES[:2]:
        trainer.step(step)
        ckpt.save(global_step=step, score=acc)
    before, objects_before = ckpt.state_dict(), dict(store.objects)
    store.fail_under = "runs/checkpoint_3_acc=0.7000/"
    trainer.step(3)
    with pytest.raises(PermissionError, match="AccessDenied"):  # the store's own error, not DCP's wrapper
        ckpt.save(global_step=3, score=0.7)  # would evict model_1 (0.5) had it committed
    assert ckpt.state_dict() == before
    assert store.objects == objects_before  # nothing evicted, nothing of the failed save left
    assert all(is_committed(store, f"runs/{name}") for _, name in before["_saved"])


def test_eviction_deletes_the_old_folder_only_after_the_new_metadata_is_created_metadata_first():
    store, trainer = RecordingStore(), Trainer()
    ckpt = make(store, trainer)
    for step, acc in SCORES[:3]:
        trainer.step(step)
        ckpt.save(global_step=step, score=acc)
    log = store.log
    commit = log.index(("put", "runs/checkpoint_3_acc=0.7000/.metadata"))
    evictions = [i for i, (op, keys) in enumerate(log) if op.startswith("delete") and "checkpoint_1_acc=0.5000" in keys]
    assert evictions and min(evictions) > commit
    first_delete = log[min(evictions)]
    assert first_delete[1] == "runs/checkpoint_1_acc=0.5000/.metadata"  # from then on it is not a checkpoint


def test_resume_removes_surplus_folders_in_batched_deletes():
    store, trainer = RecordingStore(), Trainer()
    ckpt = make(store, trainer, n_saved=None)
    for step, acc in SCORES:
        trainer.step(step)
        ckpt.save(global_step=step, score=acc)
    store.log.clear()
    again = make(store, Trainer(seed=1), resume=True, n_saved=1)
    assert [name for _, name in again.state_dict()["_saved"]] == ["checkpoint_2_acc=0.9000"]
    assert folders(store) == {"checkpoint_2_acc=0.9000"}
    assert [op for op, _ in store.log] == ["delete_many", "delete_many"]  # the 4 markers, then the 4 data files


def test_same_name_is_not_saved_twice_and_a_committed_folder_is_never_replaced():
    store, trainer = MemoryStore("bucket", min_part_size=1024), Trainer()
    ckpt = make(store, trainer, n_saved=2, score_name=None)
    trainer.step(1)
    assert ckpt.save(global_step=1) == "checkpoint_1"
    with pytest.warns(RuntimeWarning, match="a sharded checkpoint of that name is kept"):
        assert ckpt.save(global_step=1) is None


def test_include_self_stores_the_kept_list_in_each_folder_and_load_objects_restores_it():
    store, trainer = MemoryStore("bucket", min_part_size=1024), Trainer()
    ckpt = train_and_save(store, trainer, include_self=True)
    assert ckpt.last_checkpoint == "checkpoint_2_acc=0.9000"
    other = Checkpoint({"model": trainer.model}, RemoteSaver(MemoryStore("other"), "runs"), sharded=True, n_saved=2)
    assert other.state_dict()["_saved"] == []
    ckpt.load_objects({"checkpointer": other, "model": trainer.model}, "checkpoint_2_acc=0.9000")
    # the state right after step 2 was saved: steps 1 and 2 kept then (ignite's include_self semantics)
    assert [tuple(item) for item in other.state_dict()["_saved"]] == [
        (0.5, "checkpoint_1_acc=0.5000"),
        (0.9, "checkpoint_2_acc=0.9000"),
    ]
    assert tensors_equal(trainer.model.state_dict(), trainer.states[2]["model"])
    with pytest.raises(ValueError, match="checkpointer"):
        Checkpoint({"checkpointer": trainer.model}, RemoteSaver(MemoryStore(), "x"), sharded=True, include_self=True)


def test_sharded_refuses_handlers_that_cannot_hold_folders(tmp_path):
    model = torch.nn.Linear(2, 1)
    with pytest.raises(TypeError, match="save_handler"):
        Checkpoint({"model": model}, lambda checkpoint, filename: None, sharded=True)
    with pytest.raises(TypeError, match="sharded"):
        Checkpoint({"model": model}, tmp_path, sharded="yes")


def test_an_optimizer_without_its_model_in_to_save_is_refused_naming_it():
    model = torch.nn.Linear(2, 1)
    ckpt = Checkpoint(
        {"optimizer": torch.optim.SGD(model.parameters(), lr=0.1)},
        RemoteSaver(MemoryStore("b"), "r", check_bucket=False),
        sharded=True,
    )
    with pytest.raises(ValueError, match="optimizer 'optimizer' updates parameters of no model"):
        ckpt.save(global_step=1)


def test_a_prefix_with_committed_folders_needs_resume(tmp_path):
    trainer = Trainer()
    Checkpoint(trainer.objects(), tmp_path, sharded=True).save(global_step=1)
    with pytest.raises(ValueError, match="resume=True"):
        Checkpoint(trainer.objects(), tmp_path, sharded=True)
    assert Checkpoint(trainer.objects(), tmp_path, sharded=True, resume=True).last_checkpoint == "checkpoint_1"


def test_filename_pattern_names_the_folder_and_resume_reads_it_back():
    store, trainer = MemoryStore("bucket", min_part_size=1024), Trainer()
    pattern = "{name}-step{global_step}.{ext}"
    ckpt = make(store, trainer, n_saved=1, score_name=None, filename_pattern=pattern)
    trainer.step(3)
    assert ckpt.save(global_step=3) == "checkpoint-step3"
    again = make(store, Trainer(seed=1), n_saved=1, score_name=None, filename_pattern=pattern, resume=True)
    assert again.state_dict() == {"_saved": [(3, "checkpoint-step3")]}


def test_list_sharded_and_the_saver_see_committed_folders_directly_under_the_prefix_only():
    store = MemoryStore("bucket")
    saver = RemoteSaver(store, "runs", check_bucket=False)
    ShardedSaver(saver)({"w": torch.ones(2)}, "a", {"priority": 1, "basename": "x", "score_name": None})
    store.put("runs/b/__0_x.distcp", memoryview(b"x"), {})  # uncommitted
    store.put("runs/c/d/.metadata", memoryview(b"x"), {})  # nested: not directly under the prefix
    assert sorted(list_sharded(saver)) == ["a"]
    assert list_sharded(saver, select=lambda name: name != "a") == {}
    with pytest.raises(ValueError, match="'/'"):
        ShardedSaver(saver)({"w": torch.ones(2)}, "c/d", None)


def test_s3_sharded_checkpoint_keeps_n_saved_resumes_and_loads_bit_identically(s3_endpoint, s3_bucket, s3_client):
    pytest.importorskip("boto3")
    from ckptcloud import S3Saver

    def saver() -> S3Saver:
        return S3Saver(s3_bucket, "run", endpoint_url=s3_endpoint.url, region_name="us-east-1", require_empty=False)

    trainer = Trainer()
    ckpt = Checkpoint(trainer.objects(), saver(), sharded=True, n_saved=2, score_name="acc")
    for step, acc in SCORES:
        trainer.step(step)
        ckpt.save(global_step=step, score=acc)
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=s3_bucket).get("Contents", [])]
    assert {key.split("/")[1] for key in keys} == {"checkpoint_5_acc=0.8000", "checkpoint_2_acc=0.9000"}
    fresh = Trainer(seed=1)
    again = Checkpoint(fresh.objects(), saver(), sharded=True, n_saved=2, score_name="acc", resume=True)
    assert again.state_dict() == ckpt.state_dict()
    url = f"s3://{s3_bucket}/run/{again.last_checkpoint}"
    again.load_objects(fresh.objects(), url)
    assert tensors_equal(fresh.state(), trainer.states[2])
    other = Trainer(seed=2)
    reader = CloudStorageReader(
        f"s3://{s3_bucket}/run/checkpoint_5_acc=0.8000", endpoint_url=s3_endpoint.url, region_name="us-east-1"
    )
    Checkpoint.load_objects(other.objects(), reader)
    assert tensors_equal(other.state(), trainer.states[5])


def test_reload_objects_loads_the_folder_its_filename_components_name():
    store, trainer = MemoryStore("bucket", min_part_size=1024), Trainer()
    ckpt = train_and_save(store, trainer)
    fresh = Trainer(seed=1)
    ckpt.reload_objects(fresh.objects(), global_step=5, score=0.8)
    assert tensors_equal(fresh.state(), trainer.states[5])
    assert "checkpoint_5_acc=0.8000" in ckpt.guarded


def test_a_keep_policy_decides_which_folders_remain_and_resume_keeps_its_records():
    from ckptcloud.policies import BestN, LatestN

    store, trainer = MemoryStore("bucket", min_part_size=1024), Trainer()
    ckpt = train_and_save(store, trainer, n_saved=DEFAULT_N_SAVED, keep=BestN(1) | LatestN(1))
    kept = {"checkpoint_2_acc=0.9000", "checkpoint_5_acc=0.8000"}  # the best, and the latest
    assert {name for _, name in ckpt.state_dict()["_saved"]} == kept
    assert folders(store) == kept
    again = make(store, Trainer(seed=1), n_saved=DEFAULT_N_SAVED, keep=BestN(1) | LatestN(1), resume=True)
    assert again.state_dict() == ckpt.state_dict()  # with "_records": step, save time and score of each


def test_writer_metadata_is_stored_on_the_metadata_object_and_bad_metadata_is_refused_at_construction(tmp_path):
    import pickle

    import torch.distributed.checkpoint as dcp

    from ckptcloud.dcp import CloudStorageWriter

    store = MemoryStore("bucket")
    saver = RemoteSaver(store, "runs", check_bucket=False)
    writer = CloudStorageWriter.from_saver(saver, "step-1", metadata={"ckptcloud_step": "1"})
    dcp.save({"w": torch.ones(2)}, storage_writer=writer, no_dist=True)
    assert store.head("runs/step-1/.metadata").metadata["ckptcloud_step"] == "1"
    by_url = CloudStorageWriter((tmp_path / "x").as_uri(), metadata={"k": "v"})
    assert pickle.loads(pickle.dumps(by_url))._metadata == {"k": "v"}  # process-mode async_save keeps it
    for bad, error in [({"a-b": "v"}, ValueError), ({"k": "é"}, ValueError), ({"k": 1}, TypeError)]:
        with pytest.raises(error, match="`metadata`"):
            CloudStorageWriter.from_saver(saver, "step-2", metadata=bad)
    with pytest.raises(ValueError, match="the writer sets it"):
        CloudStorageWriter.from_saver(saver, "step-2", metadata={"ckptcloud_dcp_save": "x"})


def test_async_sharded_saves_store_the_state_at_save_time_and_evict_only_after_each_commit():
    store, trainer = RecordingStore(), Trainer()
    with make(store, trainer, async_save=True) as ckpt:
        for step, acc in SCORES:
            trainer.step(step)
            ckpt.save(global_step=step, score=acc)  # returns once DCP copied the state; training goes on
        ckpt.wait()
        assert ckpt.state_dict() == {"_saved": [(0.8, "checkpoint_5_acc=0.8000"), (0.9, "checkpoint_2_acc=0.9000")]}
        assert folders(store) == {"checkpoint_5_acc=0.8000", "checkpoint_2_acc=0.9000"}
        log = store.log
        commit = log.index(("put", "runs/checkpoint_3_acc=0.7000/.metadata"))
        assert min(i for i, (op, keys) in enumerate(log) if op.startswith("delete") and "_1_acc" in keys) > commit
    for step in (2, 5):
        fresh = Trainer(seed=1)
        ckpt.load_objects(fresh.objects(), f"checkpoint_{step}_acc={dict(SCORES)[step]:.4f}")
        assert tensors_equal(fresh.state(), trainer.states[step])


def test_a_failed_async_sharded_save_raises_at_wait_and_changes_nothing():
    store, trainer = RecordingStore(), Trainer()
    ckpt = make(store, trainer, async_save=True)
    trainer.step(1)
    ckpt.save(global_step=1, score=0.5)
    ckpt.wait()
    before, objects_before = ckpt.state_dict(), dict(store.objects)
    store.fail_under = "runs/checkpoint_2_acc=0.9000/"
    trainer.step(2)
    ckpt.save(global_step=2, score=0.9)
    with pytest.raises(PermissionError, match="AccessDenied"):
        ckpt.wait()
    assert ckpt.state_dict() == before and store.objects == objects_before
    ckpt.close()


def test_loading_an_uncommitted_local_folder_says_it_is_not_a_committed_checkpoint(tmp_path):
    folder = tmp_path / "checkpoint_1"
    folder.mkdir()
    (folder / "__0_ab.distcp").write_bytes(b"x")  # a killed save's data file, no .metadata
    with pytest.raises(FileNotFoundError, match="not yet committed"):
        Checkpoint.load_objects(Trainer().objects(), folder)
