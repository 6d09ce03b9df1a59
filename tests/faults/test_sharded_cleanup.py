"""``cleanup_uncommitted`` on a MemoryStore: what it removes (old uncommitted folders, their incomplete uploads,
with ``orphans`` unreferenced data files of committed folders) and what it never touches."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed.checkpoint as dcp

from ckptcloud.dcp import CloudStorageReader, CloudStorageWriter
from ckptcloud.dcp.cleanup import cleanup_uncommitted
from ckptcloud.remote import RemoteSaver
from ckptcloud.stores.memory import MemoryStore

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")

HOUR = 3600.0


def put(store: MemoryStore, key: str, age: float = 0.0, body: bytes = b"data") -> None:
    store.put(key, memoryview(body), {})
    data, meta, _ = store.objects[key]
    store.objects[key] = (data, meta, time.time() - age)


def begin(store: MemoryStore, key: str, age: float = 0.0) -> object:
    upload = store.begin(key, {})
    store.put_part(upload, 1, memoryview(b"x" * 10))
    store.uploads[upload].started = time.time() - age
    return upload


def saver(store: MemoryStore) -> RemoteSaver:
    return RemoteSaver(store, "run", require_empty=False, check_bucket=False, part_size=64 * 1024)


def keys(store: MemoryStore) -> list[str]:
    return sorted(store.objects)


def test_old_uncommitted_folders_go_with_their_uploads_and_committed_folders_and_loose_files_stay():
    store = MemoryStore()
    put(store, "run/step-1/__0_a.distcp", age=2 * HOUR)
    put(store, "run/step-1/.metadata", age=2 * HOUR)
    put(store, "run/model.pt", age=2 * HOUR)  # a single-file checkpoint next to the folders
    put(store, "run/step-2/__0_b.distcp", age=2 * HOUR)
    begin(store, "run/step-2/__1_b.distcp", age=2 * HOUR)
    begin(store, "run/step-3/__1_c.distcp", age=2 * HOUR)  # a folder holding only a killed rank's upload
    put(store, "other/step-9/__0_z.distcp", age=2 * HOUR)  # outside the prefix
    removed = cleanup_uncommitted(store, "run", older_than=HOUR)
    assert removed == ["run/step-2/", "run/step-3/"]
    assert keys(store) == [
        "other/step-9/__0_z.distcp",
        "run/model.pt",
        "run/step-1/.metadata",
        "run/step-1/__0_a.distcp",
    ]
    assert store.uploads == {}


def test_a_folder_whose_newest_file_or_upload_is_young_is_kept_as_a_save_in_progress():
    store = MemoryStore()
    put(store, "run/step-2/__0_b.distcp", age=2 * HOUR)
    put(store, "run/step-2/__1_b.distcp", age=10)
    put(store, "run/step-3/__0_c.distcp", age=2 * HOUR)
    begin(store, "run/step-3/__1_c.distcp", age=10)
    assert cleanup_uncommitted(store, "run/", older_than=HOUR) == []
    assert len(keys(store)) == 3 and len(store.uploads) == 1
    assert cleanup_uncommitted(store, "run/", older_than=0) == ["run/step-2/", "run/step-3/"]
    assert keys(store) == [] and store.uploads == {}


def test_a_folder_committed_between_listing_and_deleting_is_kept():
    store = MemoryStore()
    put(store, "run/step-2/__0_b.distcp", age=2 * HOUR)
    listed = store.list

    def list_then_commit(prefix: str):
        out = listed(prefix)
        if "run/step-2/.metadata" not in store.objects:
            put(store, "run/step-2/.metadata")
        return out

    store.list = list_then_commit  # type: ignore[method-assign]
    assert cleanup_uncommitted(store, "run", older_than=0) == []
    assert keys(store) == ["run/step-2/.metadata", "run/step-2/__0_b.distcp"]


def test_deletes_are_batched_a_thousand_keys_a_request():
    store = MemoryStore()
    for i in range(2500):
        put(store, f"run/step-2/__{i}_b.distcp", age=2 * HOUR, body=b"")
    calls: list[int] = []
    delete_many = store.delete_many
    store.delete_many = lambda batch: (calls.append(len(batch)), delete_many(batch))[1]  # type: ignore[method-assign]
    assert cleanup_uncommitted(store, "run") == ["run/step-2/"]
    assert calls == [1000, 1000, 500] and keys(store) == []


def test_orphans_removes_only_old_unreferenced_data_files_of_a_committed_checkpoint_which_still_loads():
    store = MemoryStore("bucket", min_part_size=64 * 1024)
    state = {"w": torch.arange(1000, dtype=torch.float32)}
    dcp.save(state, storage_writer=CloudStorageWriter.from_saver(saver(store), "step-1"), no_dist=True)
    put(store, "run/step-1/__0_loser.distcp", age=2 * HOUR)  # a racer that lost the id and was killed
    put(store, "run/step-1/__1_fresh.distcp", age=10)  # too young: perhaps a racer still running
    put(store, "run/step-1/notes.txt", age=2 * HOUR)  # not a data file: kept
    begin(store, "run/step-1/__1_loser.distcp", age=2 * HOUR)
    assert cleanup_uncommitted(store, "run", older_than=HOUR) == []  # without orphans: committed folders untouched
    assert cleanup_uncommitted(store, "run", older_than=HOUR, orphans=True) == ["run/step-1/__0_loser.distcp"]
    assert "run/step-1/__1_fresh.distcp" in store.objects and "run/step-1/notes.txt" in store.objects
    assert store.uploads == {}
    loaded = {"w": torch.zeros(1000)}
    dcp.load(loaded, storage_reader=CloudStorageReader.from_saver(saver(store), "step-1"), no_dist=True)
    assert torch.equal(loaded["w"], state["w"])


def test_a_folder_holding_anything_a_sharded_save_does_not_write_is_never_removed():
    store = MemoryStore()
    put(store, "runs/run-a/model_1.pt", age=2 * HOUR)  # another run's single-file checkpoints, prefix one level up
    put(store, "runs/run-b/__0_x.distcp", age=2 * HOUR)
    put(store, "runs/run-b/config.yaml", age=2 * HOUR)  # a data file next to something else: not ours to judge
    begin(store, "runs/run-c/model_2.pt", age=2 * HOUR)  # a single-file save's upload, not a data file
    put(store, "runs/run-d/__0_y.distcp", age=2 * HOUR)
    put(store, "runs/run-d/.ckptcloud-tmp/abc/1", age=2 * HOUR)  # a store's temporary part (GCS): ours
    assert cleanup_uncommitted(store, "runs", older_than=0) == ["runs/run-d/"]
    assert keys(store) == ["runs/run-a/model_1.pt", "runs/run-b/__0_x.distcp", "runs/run-b/config.yaml"]
    assert len(store.uploads) == 1


def test_on_a_local_folder_a_killed_ranks_temporary_upload_and_the_emptied_folder_go(tmp_path):
    from ckptcloud.stores.local import LocalStore

    store = LocalStore()
    base = str(tmp_path).lstrip("/") + "/run"
    state = {"w": torch.arange(100, dtype=torch.float32)}
    url = f"file://{tmp_path}/run/step-1"
    dcp.save(state, storage_writer=CloudStorageWriter(url), no_dist=True)
    upload = store.begin(f"{base}/step-2/__1_ab.distcp", {})  # a rank killed mid-upload: only its temporary part
    store.put_part(upload, 1, memoryview(b"x" * 10))
    store.put(f"{base}/step-3/__0_cd.distcp", memoryview(b"data"), {})
    assert cleanup_uncommitted(store, base, older_than=0) == [f"{base}/step-2/", f"{base}/step-3/"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["step-1"]
    loaded = {"w": torch.zeros(100)}
    dcp.load(loaded, storage_reader=CloudStorageReader(url), no_dist=True)
    assert torch.equal(loaded["w"], state["w"])


def test_on_stores_that_list_uploads_per_folder_only_the_uploads_of_listed_folders_are_found_and_aborted(
    monkeypatch,
):
    from ckptcloud.dcp import cleanup

    monkeypatch.setattr(cleanup, "_pending_uploads", lambda store, base: None)  # as on GCS and Azure
    store = MemoryStore()
    put(store, "run/step-2/__0_b.distcp", age=2 * HOUR)
    begin(store, "run/step-2/__1_b.distcp", age=2 * HOUR)
    begin(store, "run/step-3/__1_c.distcp", age=2 * HOUR)  # no object: such stores cannot see this folder
    assert cleanup_uncommitted(store, "run", older_than=HOUR) == ["run/step-2/"]
    assert keys(store) == [] and [u.key for u in store.uploads.values()] == ["run/step-3/__1_c.distcp"]
