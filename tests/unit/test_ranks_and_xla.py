"""Rank gating and the move to CPU, with simulated ranks and an XLA-like tensor (no torch_xla needed).

Real torch_xla and multi-process groups are tested in their own suite; here ``distributed.get_rank`` is patched
to play another rank, and a tensor subclass reports an ``xla`` device the way torch_xla tensors do.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from ckptcloud import DiskSaver, distributed
from ckptcloud.remote import RemoteSaver
from ckptcloud.retry import NO_RETRY
from ckptcloud.stores.base import MiB
from ckptcloud.stores.memory import MemoryStore
from tests.helpers import XlaLikeTensor


@pytest.fixture
def rank(monkeypatch):
    def set_rank(r: int) -> None:
        monkeypatch.setattr(distributed, "get_rank", lambda: r)

    return set_rank


def test_only_save_on_rank_uploads_and_deletes(rank):
    store = MemoryStore("bucket")
    rank(0)
    saver = RemoteSaver(store, "p", part_size=5 * MiB, save_on_rank=1)
    saver({"w": torch.ones(2)}, "a.pt")
    assert store.objects == {}
    rank(1)
    saver({"w": torch.ones(2)}, "a.pt")
    assert list(store.objects) == ["p/a.pt"]
    rank(0)
    saver.remove("a.pt")
    assert list(store.objects) == ["p/a.pt"]
    rank(1)
    saver.remove("a.pt")
    assert store.objects == {}


def test_non_writing_rank_does_not_touch_the_bucket_at_construction(rank):
    class Exploding(MemoryStore):
        def check_bucket(self):
            raise AssertionError("only the writing rank checks the bucket")

    rank(3)
    RemoteSaver(Exploding("bucket"), save_on_rank=0)


def test_disk_saver_writes_only_on_its_rank(rank, tmp_path):
    rank(1)
    saver = DiskSaver(tmp_path, save_on_rank=0)
    saver({"w": torch.ones(1)}, "m.pt")
    assert list(tmp_path.iterdir()) == []


def test_xla_like_tensors_are_moved_to_cpu_before_saving(monkeypatch):
    synced = []
    fake_xla = types.ModuleType("torch_xla")
    fake_xla.sync = lambda: synced.append(True)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch_xla", fake_xla)
    XlaLikeTensor.copies = 0
    store = MemoryStore("bucket")
    saver = RemoteSaver(store, part_size=5 * MiB)
    weight = XlaLikeTensor(torch.arange(6.0))
    saver({"model": {"w": weight, "b": torch.zeros(1)}, "step": 4}, "x.pt")
    assert XlaLikeTensor.copies == 1 and synced == [True]
    back = saver.load("x.pt")
    assert type(back["model"]["w"]) is torch.Tensor
    assert back["model"]["w"].device.type == "cpu"
    assert torch.equal(back["model"]["w"], torch.arange(6.0))


def test_cpu_only_checkpoint_is_not_copied():
    state = {"w": torch.ones(3), "nested": [torch.zeros(1)]}
    assert distributed.xla_to_cpu(state) is state and distributed.sync_xla(state) is False


def test_writer_failure_propagates_on_the_writing_rank(rank):
    class Failing(MemoryStore):
        def put(self, key, data, metadata, when=None):
            raise ConnectionError("store unreachable")

    rank(0)
    saver = RemoteSaver(Failing("bucket"), part_size=5 * MiB, retry=NO_RETRY)
    with pytest.raises(ConnectionError, match="unreachable"):
        saver({"w": torch.ones(1)}, "a.pt")
