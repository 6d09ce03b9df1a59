"""``Store.delete_many``'s default (GCS, Azure, local folders): single deletes sent concurrently, bounded, and the
first failure stops the deletes not yet sent."""

from __future__ import annotations

import threading
import time

import pytest

from ckptcloud.stores.base import DELETE_CONCURRENCY, Store
from ckptcloud.stores.memory import MemoryStore


class SlowDeletes(MemoryStore):
    """A store whose single deletes take a while and count how many run at once; ``delete_many`` is the default."""

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
    store.delete_many(keys)
    elapsed = time.monotonic() - started
    assert sorted(store.deleted) == keys and store.list("run/") == []
    assert 1 < store.most <= DELETE_CONCURRENCY
    assert elapsed < 40 * 0.02  # not one after another


def test_the_first_failure_is_raised_and_stops_the_deletes_not_yet_sent():
    store = SlowDeletes(fail_on="run/k000")
    keys = [f"run/k{i:03d}" for i in range(200)]
    with pytest.raises(PermissionError, match="run/k000"):
        store.delete_many(keys)
    assert len(store.deleted) < len(keys) - 1  # the rest was cancelled, not sent


def test_one_key_is_one_plain_delete():
    store = SlowDeletes()
    store.delete_many(["run/absent.pt"])  # a key already gone is not an error
    assert store.most == 1
