"""Blob GC on the in-memory store: only unreferenced blobs older than the grace go, on eviction and by hand."""

from __future__ import annotations

import time

import pytest
import torch

from ckptcloud import Checkpoint
from ckptcloud.dedup import collect_garbage
from ckptcloud.remote import RemoteSaver
from ckptcloud.stores.memory import MemoryStore
from tests.helpers import MiB, assert_same


def saver(store: MemoryStore, **options) -> RemoteSaver:
    return RemoteSaver(store, "run", dedup=True, part_size=5 * MiB, require_empty=False, **options)


def blobs(store: MemoryStore) -> list[str]:
    return sorted(k for k in store.objects if "/.blobs/" in k)


def age(store: MemoryStore, seconds: float) -> None:
    """Make every blob ``seconds`` older."""
    for key in blobs(store):
        body, meta, mtime = store.objects[key]
        store.objects[key] = (body, meta, mtime - seconds)


class Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.base = torch.nn.Linear(512, 512)  # frozen, 1 MiB
        self.adapter = torch.nn.Linear(512, 64)  # trained, 128 KiB

    def step(self) -> None:
        with torch.no_grad():
            self.adapter.weight.add_(1.0)


def test_only_unreferenced_blobs_older_than_the_grace_are_collected():
    store = MemoryStore()
    s = saver(store, dedup_grace=10.0)
    s({"w": torch.randn(256, 1024)}, "model_1.pt")
    s({"w": torch.randn(256, 1024)}, "model_2.pt")
    store.put("run/.blobs/orphan", memoryview(b"x"), {})
    assert collect_garbage(store, "run/", 10.0).deleted == []  # everything young
    age(store, 11)
    store.objects.pop("run/model_1.pt")
    report = collect_garbage(store, "run/", 10.0, dry_run=True)
    assert len(report.deleted) == 2 and report.referenced == 1 and len(blobs(store)) == 3  # dry run: kept
    collect_garbage(store, "run/", 10.0)
    assert len(blobs(store)) == 1
    assert s.load("model_2.pt")["w"].shape == (256, 1024)


def test_eviction_collects_the_blobs_no_kept_checkpoint_references():
    store, model = MemoryStore(), Model()
    s = saver(store, dedup_grace=10.0)
    ckpt = Checkpoint({"model": model}, s, n_saved=2)
    for step in range(1, 5):
        model.step()
        ckpt.save(global_step=step)
        age(store, 11)  # each save's blobs look old to the next GC
    kept = s.list()
    assert len(kept) == 2
    referenced = set()
    for name in kept:
        from ckptcloud.dedup.gc import _references

        referenced |= _references(store, store.head(s.key(name)), s.retry)
    assert {k.rsplit("/", 1)[1] for k in blobs(store)} == referenced  # exactly the kept ones' blobs
    restored = Model()
    Checkpoint.load_objects({"model": restored}, s.load(kept[-1]))
    assert_same(restored.state_dict(), model.state_dict())


def test_gc_stops_without_deleting_when_a_manifest_cannot_be_read():
    store = MemoryStore()
    s = saver(store, dedup_grace=10.0)
    s({"w": torch.randn(256, 1024)}, "model_1.pt")
    age(store, 11)
    body, meta, mtime = store.objects["run/model_1.pt"]
    store.objects["run/model_1.pt"] = (body[:200], meta, mtime)  # damaged manifest
    with pytest.raises(ValueError):
        collect_garbage(store, "run/", 10.0)
    assert len(blobs(store)) == 1


def test_plain_checkpoints_in_the_prefix_are_sniffed_not_read_whole():
    store = MemoryStore()
    RemoteSaver(store, "run", require_empty=False)({"w": torch.randn(1024, 1024)}, "plain_1.pt")
    s = saver(store, dedup_grace=10.0)
    s({"w": torch.randn(256, 1024)}, "model_1.pt")
    before = len(store.requests)
    report = collect_garbage(store, "run/", 10.0)
    assert report.manifests == 1 and report.referenced == 1
    assert store.requests[before:].count("read") == 2  # the plain file's first 4 KiB, the manifest


def test_gc_grace_is_checked():
    s = saver(MemoryStore())
    with pytest.raises(ValueError, match="`grace`"):
        s.dedup.collect(s, grace=-1)
    assert time.time() > 0
