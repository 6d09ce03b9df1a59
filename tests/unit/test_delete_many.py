"""The pipeline's deletes (``ckptcloud.deleting.delete_keys``) for stores without a batch delete (GCS, Azure,
local folders): single deletes sent concurrently, bounded, each retried, and the first failure stops the rest."""

from __future__ import annotations

import threading
import time

import pytest

from ckptcloud.deleting import DELETE_CONCURRENCY, delete_keys, has_batch_delete
from ckptcloud.retry import Retry
from ckptcloud.stores.base import Store
from ckptcloud.stores.memory import MemoryStore


class SlowDeletes(MemoryStore):
    """A store without a batch delete whose single deletes take a while and count how many run at once."""

    delete_many = Store.delete_many

    def __init__(self, fail_on: str | None = None) -> None:
        super().__init__("bucket")
        self.fail_on = fail_on
        self.deleted: list[str] = []
        self.running = 0
        self.most = 0
        self.count_lock = threading.Lock()

    def delete(self, key: str) -> None:
        with self.count_lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            time.sleep(0.02)
            if key == self.fail_on:
                raise PermissionError(f"access denied to mem://bucket/{key} (deleting)")
            super().delete(key)
            with self.count_lock:
                self.deleted.append(key)
        finally:
            with self.count_lock:
                self.running -= 1


def test_many_deletes_run_concurrently_up_to_the_bound_and_every_key_goes():
    store = SlowDeletes()
    keys = [f"run/k{i:03d}" for i in range(40)]
    for key in keys:
        store.put(key, memoryview(b"x"), {})
    started = time.monotonic()
    delete_keys(store, keys)
    elapsed = time.monotonic() - started
    assert sorted(store.deleted) == keys and store.list("run/") == []
    assert 1 < store.most <= DELETE_CONCURRENCY
    assert elapsed < 40 * 0.02  # not one after another


def test_the_first_failure_is_raised_and_stops_the_deletes_not_yet_sent():
    store = SlowDeletes(fail_on="run/k000")
    keys = [f"run/k{i:03d}" for i in range(200)]
    with pytest.raises(PermissionError, match="run/k000"):
        delete_keys(store, keys)
    assert len(store.deleted) < len(keys) - 1  # the rest was cancelled, not sent


def test_one_key_is_one_plain_delete():
    store = SlowDeletes()
    delete_keys(store, ["run/absent.pt"])  # a key already gone is not an error
    assert store.most == 1


def test_a_transient_failure_of_one_delete_is_retried_alone():
    store = SlowDeletes()
    failures = {"run/k003": 1}
    delete = store.delete

    def flaky(key: str) -> None:
        if failures.get(key):
            failures[key] -= 1
            raise ConnectionResetError("reset by peer")
        delete(key)

    store.delete = flaky  # type: ignore[method-assign]
    keys = [f"run/k{i:03d}" for i in range(10)]
    delete_keys(store, keys, Retry(initial_backoff=0.001))
    assert sorted(store.deleted) == keys


def test_stores_with_a_batch_delete_get_batches_and_the_others_single_deletes():
    from ckptcloud.stores.memory import MemoryStore

    assert has_batch_delete(MemoryStore("b")) and not has_batch_delete(SlowDeletes())
    store = MemoryStore("b")
    keys = [f"run/{i}.pt" for i in range(2500)]
    delete_keys(store, keys)
    assert [r for r in store.requests if r == "delete_many"] == ["delete_many"] * 3  # 1,000 + 1,000 + 500
