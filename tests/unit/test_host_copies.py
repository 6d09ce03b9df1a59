"""Host memory for device state: non-writing ranks copy nothing; async snapshots copy each storage once.

No GPU here, so a tensor subclass that reports a ``cuda`` device and counts every copy to the host stands in for
CUDA state (``torch.save`` itself handles real CUDA storages one at a time, on the writer, as it reaches them).
"""

from __future__ import annotations

import collections

import pytest
import torch

from ckptcloud import Checkpoint, DiskSaver, distributed
from ckptcloud.remote import RemoteSaver
from ckptcloud.snapshot import snapshot
from ckptcloud.stores.base import MiB
from ckptcloud.stores.memory import MemoryStore
from tests.helpers import CudaLikeTensor


class DeviceState:
    """An object whose state dict is "GPU" tensors."""

    def __init__(self) -> None:
        self.weights = {f"layer{i}": CudaLikeTensor(torch.full((256,), float(i))) for i in range(4)}

    def state_dict(self) -> dict:
        return dict(self.weights)


@pytest.fixture
def rank(monkeypatch):
    def set_rank(r: int) -> None:
        monkeypatch.setattr(distributed, "get_rank", lambda: r)

    return set_rank


@pytest.mark.parametrize("async_save", [False, True])
def test_ranks_that_do_not_write_copy_no_device_state_to_the_host(rank, async_save):
    rank(1)
    store = MemoryStore("bucket")
    saver = RemoteSaver(store, "run", part_size=5 * MiB, save_on_rank=0)
    ckpt = Checkpoint({"state": DeviceState()}, saver, n_saved=2, async_save=async_save)
    CudaLikeTensor.copies = 0
    ckpt.save(global_step=1)
    ckpt.close()
    assert CudaLikeTensor.copies == 0
    assert store.objects == {}


def test_the_writer_leaves_device_storages_to_torch_save_instead_of_copying_the_whole_state(rank):
    rank(0)
    saver = RemoteSaver(MemoryStore("bucket"), "run", part_size=5 * MiB)
    ckpt = Checkpoint({"state": DeviceState()}, saver, n_saved=2)
    CudaLikeTensor.copies = 0
    ckpt.save(global_step=1)
    assert CudaLikeTensor.copies == 0  # no up-front host copy of the state: torch.save copies storage by storage
    stored = saver.load("state_1.pt", weights_only=False)  # the stand-in class is not on the safe list
    assert torch.equal(stored["layer3"], torch.full((256,), 3.0))


def tied_model() -> torch.nn.Module:
    embedding = torch.nn.Embedding(1024, 1024)  # 4 MiB
    head = torch.nn.Linear(1024, 1024, bias=False)
    head.weight = embedding.weight  # tied, as in most language models
    return torch.nn.Sequential(embedding, head)


def test_tied_weights_survive_an_async_save_and_the_file_is_no_larger_than_a_sync_one(tmp_path):
    sizes = {}
    for async_save in (False, True):
        folder = tmp_path / ("async" if async_save else "sync")
        with Checkpoint({"model": tied_model()}, DiskSaver(folder), async_save=async_save) as ckpt:
            ckpt.save(global_step=1)
        sizes[async_save] = (folder / "model_1.pt").stat().st_size
        loaded = torch.load(folder / "model_1.pt", weights_only=True)
        assert loaded["0.weight"].untyped_storage().data_ptr() == loaded["1.weight"].untyped_storage().data_ptr()
        restored = torch.nn.Sequential(torch.nn.Embedding(1024, 1024), torch.nn.Linear(1024, 1024, bias=False))
        restored.load_state_dict(loaded)
    assert sizes[True] <= sizes[False] < 5 * MiB  # one 4 MiB storage, not two


def test_a_snapshot_copies_each_storage_once_and_keeps_views_of_it():
    base = torch.arange(12.0)
    state = {"a": base, "b": base, "view": base[2:5], "matrix": base.view(3, 4).t(), "other": torch.ones(2)}
    copied = snapshot(state)
    storages = {name: t.untyped_storage().data_ptr() for name, t in copied.items()}
    assert storages["a"] == storages["b"] == storages["view"] == storages["matrix"] != storages["other"]
    assert storages["a"] != base.untyped_storage().data_ptr()  # a copy, not the live memory
    for name, tensor in state.items():
        assert torch.equal(copied[name], tensor) and copied[name].stride() == tensor.stride()
    base.add_(100.0)  # training goes on: the snapshot does not change
    assert copied["view"].tolist() == [2.0, 3.0, 4.0]


@pytest.mark.parametrize("async_save", [False, True])
def test_anything_torch_save_saves_a_checkpoint_saves(tmp_path, async_save):
    class Holder:
        def state_dict(self) -> dict:
            counts = collections.defaultdict(int, {"steps": 3})
            return {"shape": torch.Size([2, 3]), "counts": counts, "w": torch.ones(2)}

    with Checkpoint({"holder": Holder()}, DiskSaver(tmp_path / str(async_save)), async_save=async_save) as ckpt:
        ckpt.save(global_step=1)
    loaded = torch.load(tmp_path / str(async_save) / "holder_1.pt", weights_only=False)
    assert loaded["shape"] == torch.Size([2, 3]) and loaded["counts"]["steps"] == 3
    assert isinstance(loaded["counts"], collections.defaultdict)
