"""What resume, ``ckptcloud ls`` and ``prune`` cost in requests (trial 15).

The store here behaves like S3: its listing carries no user metadata, so every checkpoint ckptcloud needs to know
more about costs a HEAD. Foreign objects must cost none, HEADs go out concurrently, and surplus checkpoints are
deleted in one batch.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
import torch

from ckptcloud import Checkpoint
from ckptcloud.contract import ObjectInfo
from ckptcloud.errors import TransientError
from ckptcloud.remote import RemoteSaver
from ckptcloud.retry import Retry
from ckptcloud.stores.memory import MemoryStore

FAST = Retry(initial_backoff=0.0, max_backoff=0.0)


class S3LikeStore(MemoryStore):
    """A ``MemoryStore`` whose listing omits metadata (like S3), counting HEADs, deletes and HEADs in flight."""

    def __init__(self, head_delay: float = 0.0) -> None:
        super().__init__("bucket")
        self.head_delay = head_delay
        self.heads: Counter[str] = Counter()
        self.deleted_one_by_one: list[str] = []
        self.batches: list[list[str]] = []
        self.in_flight = self.max_in_flight = 0
        self.failures: dict[str, list[BaseException]] = {}  # key -> errors its next HEADs raise
        self.vanish: set[str] = set()  # keys deleted right after the listing saw them
        self._count = threading.Lock()

    def list(self, prefix: str) -> list[ObjectInfo]:
        listed = [ObjectInfo(o.key, o.size, o.last_modified) for o in super().list(prefix)]
        for key in self.vanish:
            self.objects.pop(key, None)
        return listed

    def head(self, key: str) -> ObjectInfo:
        with self._count:
            self.heads[key] += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            failure = self.failures.get(key, []).pop(0) if self.failures.get(key) else None
        try:
            time.sleep(self.head_delay)
            if failure is not None:
                raise failure
            return super().head(key)
        finally:
            with self._count:
                self.in_flight -= 1

    def delete(self, key: str) -> None:
        self.deleted_one_by_one.append(key)
        super().delete(key)

    def delete_many(self, keys: list[str]) -> None:
        self.batches.append(list(keys))
        super().delete_many(keys)


def store_with(own: int, foreign: int, head_delay: float = 0.0) -> S3LikeStore:
    """``own`` checkpoints ``run/model_{i}.pt`` (metadata: priority i, basename model) and ``foreign`` others."""
    store = S3LikeStore(head_delay)
    for i in range(1, own + 1):
        meta = {"ckptcloud_priority": str(i), "ckptcloud_basename": "model"}
        store.put(f"run/model_{i}.pt", memoryview(b"x"), meta)
    for i in range(1, foreign + 1):
        store.put(f"run/other_{i}.pt", memoryview(b"x"), {})
        store.put(f"run/model_{i}_acc=0.5.pt", memoryview(b"x"), {})  # another pattern: not this checkpoint's
    return store


def resume(store: S3LikeStore, n_saved: int | None = 3, **options) -> Checkpoint:
    saver = RemoteSaver(store, "run", require_empty=False, retry=FAST, **options)
    return Checkpoint({"model": torch.nn.Linear(2, 1)}, saver, n_saved=n_saved, resume=True)


# ------------------------------------------------------------------------------------------------- resume
def test_resume_sends_no_head_for_objects_its_pattern_cannot_match():
    store = store_with(own=30, foreign=20)
    ckpt = resume(store)
    assert [f for _, f in ckpt.state_dict()["_saved"]] == ["model_28.pt", "model_29.pt", "model_30.pt"]
    assert sorted(store.heads) == sorted(f"run/model_{i}.pt" for i in range(1, 31))  # no foreign key HEADed
    assert set(store.heads.values()) == {1}


def test_resume_deletes_the_surplus_in_one_batch_and_leaves_foreign_objects():
    store = store_with(own=30, foreign=20)
    resume(store)
    assert store.batches == [[f"run/model_{i}.pt" for i in range(1, 28)]]  # lowest priorities first
    assert store.deleted_one_by_one == []
    left = sorted(store.objects)
    assert [k for k in left if k.startswith("run/model_") and "acc" not in k] == [
        "run/model_28.pt",
        "run/model_29.pt",
        "run/model_30.pt",
    ]
    assert len(left) == 3 + 2 * 20


def test_resume_with_one_surplus_checkpoint_removes_it_alone():
    store = store_with(own=4, foreign=0)
    resume(store)
    assert store.deleted_one_by_one == ["run/model_1.pt"] and store.batches == []


def test_resume_through_a_saver_without_remove_many_removes_one_by_one(tmp_path):
    """Ignite-compatible savers (``DiskSaver``, ignite's own) have no ``remove_many``: each surplus file goes."""
    first = Checkpoint({"model": torch.nn.Linear(2, 1)}, str(tmp_path), n_saved=None)
    for step in range(1, 6):
        first.save(global_step=step)
    (tmp_path / "other_1.pt").write_bytes(b"not ours")
    again = Checkpoint({"model": torch.nn.Linear(2, 1)}, str(tmp_path), n_saved=2, resume=True)
    assert [f for _, f in again.state_dict()["_saved"]] == ["model_4.pt", "model_5.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_4.pt", "model_5.pt", "other_1.pt"]


def test_a_failed_batch_delete_on_resume_is_warned_and_the_kept_list_stands():
    store = store_with(own=6, foreign=0)

    def refuse(keys: list[str]) -> None:
        raise PermissionError("access denied to mem://bucket/run (deleting): AccessDenied")

    store.delete_many = refuse  # type: ignore[method-assign]
    with pytest.warns(RuntimeWarning, match=r"could not remove 3 surplus checkpoint\(s\) found on resume"):
        ckpt = resume(store)
    assert [f for _, f in ckpt.state_dict()["_saved"]] == ["model_4.pt", "model_5.pt", "model_6.pt"]


# --------------------------------------------------------------------------------------------- describe
def test_heads_go_out_concurrently_up_to_max_concurrency_and_results_stay_sorted():
    store = store_with(own=40, foreign=0, head_delay=0.02)
    saver = RemoteSaver(store, "run", require_empty=False, max_concurrency=8, retry=FAST)
    start = time.monotonic()
    described = saver.describe()
    elapsed = time.monotonic() - start
    assert list(described) == sorted(f"model_{i}.pt" for i in range(1, 41))
    assert all(info.metadata["ckptcloud_priority"] == name[6:-3] for name, info in described.items())
    assert 1 < store.max_in_flight <= 8
    assert elapsed < 40 * 0.02 / 2  # sequential HEADs would take 0.8 s


def test_max_concurrency_1_heads_one_at_a_time():
    store = store_with(own=5, foreign=0)
    RemoteSaver(store, "run", require_empty=False, max_concurrency=1, retry=FAST).describe()
    assert store.max_in_flight == 1 and sum(store.heads.values()) == 5


def test_a_checkpoint_deleted_between_listing_and_head_is_left_out():
    store = store_with(own=5, foreign=0)
    store.vanish = {"run/model_5.pt"}
    ckpt = resume(store, n_saved=3)
    assert [f for _, f in ckpt.state_dict()["_saved"]] == ["model_2.pt", "model_3.pt", "model_4.pt"]
    assert store.batches == [["run/model_1.pt"]] or store.deleted_one_by_one == ["run/model_1.pt"]


def test_a_transient_head_failure_is_retried_for_that_object_only():
    store = store_with(own=6, foreign=0)
    store.failures["run/model_3.pt"] = [TransientError("S3 answered 503 for run/model_3.pt")]
    described = RemoteSaver(store, "run", require_empty=False, retry=FAST).describe()
    assert len(described) == 6 and described["model_3.pt"].metadata["ckptcloud_priority"] == "3"
    assert store.heads["run/model_3.pt"] == 2 and store.heads["run/model_4.pt"] == 1


def test_a_denied_head_fails_the_listing_naming_the_object():
    store = store_with(own=100, foreign=0, head_delay=0.005)
    store.failures["run/model_2.pt"] = [PermissionError("access denied to mem://bucket/run/model_2.pt")]
    saver = RemoteSaver(store, "run", require_empty=False, max_concurrency=4, retry=FAST)
    with pytest.raises(PermissionError, match=r"access denied to mem://bucket/run/model_2\.pt"):
        saver.describe()
    assert store.in_flight == 0  # every HEAD in flight finished before describe() raised
    assert sum(store.heads.values()) < 100  # and the ones not yet started were not sent


# --------------------------------------------------------------------------------------- remove_many, CLI
def test_remove_many_is_one_store_request():
    store = store_with(own=5, foreign=0)
    saver = RemoteSaver(store, "run", require_empty=False, retry=FAST)
    saver.remove_many(["model_1.pt", "model_2.pt", "absent.pt"])
    saver.remove_many([])
    assert store.batches == [["run/model_1.pt", "run/model_2.pt", "run/absent.pt"]]
    assert sorted(store.objects) == ["run/model_3.pt", "run/model_4.pt", "run/model_5.pt"]


def test_prune_deletes_in_one_batch(monkeypatch, capsys):
    from ckptcloud import cli

    store = store_with(own=10, foreign=0)
    saver = RemoteSaver(store, "run", require_empty=False, retry=FAST)
    monkeypatch.setattr(cli, "_folder_saver", lambda url: saver)
    assert cli.main(["prune", "mem://bucket/run", "--keep", "2", "--by", "step", "--yes"]) == 0
    assert "deleted 8 checkpoint(s), kept 2" in capsys.readouterr().out
    assert store.batches == [[f"run/model_{i}.pt" for i in range(8, 0, -1)]] and store.deleted_one_by_one == []
    assert sorted(store.objects) == ["run/model_10.pt", "run/model_9.pt"]
