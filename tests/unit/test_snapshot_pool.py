"""Async saves copy the state into host buffers reused from save to save (ckptcloud.snapshot.SnapshotPool).

Invariants: after the first save a snapshot allocates nothing; every save stores the state as it was when that save
returned; tied weights and views stay shared; a storage that changes size gets a buffer of its new size; the pool
holds one buffer set, never hands out a buffer that something still reads, and CUDA storages go to pinned memory
that the upload reads only after the copies' event. No GPU here: the CUDA path runs with its device hooks faked.
"""

from __future__ import annotations

import threading

import pytest
import torch

from ckptcloud import Checkpoint
from ckptcloud import snapshot as snapshot_module
from ckptcloud.remote import RemoteSaver
from ckptcloud.retry import NO_RETRY
from ckptcloud.snapshot import SnapshotPool
from ckptcloud.stores.base import MiB
from ckptcloud.stores.memory import MemoryStore


class GatedStore(MemoryStore):
    """A store whose puts wait for ``gate``; ``fail_next`` makes the next put raise."""

    def __init__(self) -> None:
        super().__init__("bucket")
        self.gate = threading.Event()
        self.gate.set()
        self.puts = 0
        self.fail_next = False

    def put(self, key, data, metadata, when=None):
        assert self.gate.wait(10), "test forgot to open the gate"
        self.puts += 1
        if self.fail_next:
            self.fail_next = False
            raise ConnectionError("network gone")
        super().put(key, data, metadata, when)


def make(model: torch.nn.Module, store: MemoryStore, **objects) -> Checkpoint:
    saver = RemoteSaver(store, "run", part_size=5 * MiB, retry=NO_RETRY)
    return Checkpoint({"model": model, **objects}, saver, n_saved=None, async_save=True)


def pool_of(ckpt: Checkpoint) -> SnapshotPool:
    return ckpt._background.pool


def buffer_ptrs(pool: SnapshotPool) -> set[int]:
    return {buffer.data_ptr() for buffer, _ in pool._buffers.values()}


def state_bytes(state: dict) -> int:
    return sum(t.untyped_storage().nbytes() for t in state.values())


def test_after_the_first_save_every_async_save_reuses_the_same_buffers_and_allocates_nothing():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    ckpt = make(model, MemoryStore("bucket"))
    ckpt.save(global_step=1)
    ckpt.wait()
    pool = pool_of(ckpt)
    first, allocations = buffer_ptrs(pool), pool.allocations
    assert allocations == 4 and pool.nbytes == state_bytes(model.state_dict())
    for step in range(2, 6):
        ckpt.save(global_step=step)
        ckpt.wait()
        assert buffer_ptrs(pool) == first and pool.allocations == allocations
    ckpt.close()


def test_each_save_stores_the_state_as_it_was_when_save_returned_although_training_goes_on_at_once():
    store = GatedStore()
    model = torch.nn.Linear(32, 32)
    ckpt = make(model, store)
    expected = {}
    for step in range(1, 5):
        store.gate.clear()  # the upload is still running while training mutates the live weights
        ckpt.save(global_step=step)
        expected[step] = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            model.weight.add_(1.0)
            model.bias.mul_(-2.0)
        store.gate.set()
        ckpt.wait()
    # the state was cloned after save() returned, before it changed: that is the state each save must hold
    with torch.no_grad():
        model.weight.sub_(1.0)
    for step, state in expected.items():
        stored = ckpt.save_handler.load(f"model_{step}.pt")
        assert all(torch.equal(stored[k], v) for k, v in state.items()), step
    ckpt.close()


def test_tied_weights_and_views_share_one_pooled_buffer_and_load_back_tied():
    embedding = torch.nn.Embedding(16, 8)
    head = torch.nn.Linear(8, 16, bias=False)
    head.weight = embedding.weight
    model = torch.nn.Sequential(embedding, head)
    base = torch.arange(24.0)
    extra = {"state_dict": lambda self: {"base": base, "window": base[4:10], "grid": base.view(4, 6).t()}}
    holder = type("Holder", (), extra)()
    ckpt = make(model, MemoryStore("bucket"), extra=holder)
    for step in (1, 2):
        base.add_(1.0)
        ckpt.save(global_step=step)
        ckpt.wait()
        assert pool_of(ckpt).allocations == 2  # one buffer for the tied weight, one for base and its views
        stored = ckpt.save_handler.load(ckpt.last_checkpoint)
        weights = stored["model"]
        assert weights["0.weight"].untyped_storage().data_ptr() == weights["1.weight"].untyped_storage().data_ptr()
        assert torch.equal(weights["1.weight"], embedding.weight)
        views = stored["extra"]
        assert torch.equal(views["window"], base[4:10]) and torch.equal(views["grid"], base.view(4, 6).t())
        assert views["grid"].untyped_storage().data_ptr() == views["base"].untyped_storage().data_ptr()
    ckpt.close()


def test_storages_that_appear_or_change_size_get_buffers_of_their_size_and_the_rest_are_reused():
    model = torch.nn.Linear(16, 16)
    optimizer = torch.optim.Adam(model.parameters())
    ckpt = make(model, MemoryStore("bucket"), optimizer=optimizer)
    ckpt.save(global_step=1)  # before the first step: Adam has no state yet
    ckpt.wait()
    pool = pool_of(ckpt)
    model_buffers = buffer_ptrs(pool)
    assert pool.allocations == 2
    model(torch.randn(4, 16)).sum().backward()
    optimizer.step()  # exp_avg, exp_avg_sq and step appear for both parameters
    ckpt.save(global_step=2)
    ckpt.wait()
    assert pool.allocations == 2 + 6 and model_buffers <= buffer_ptrs(pool)
    stored = ckpt.save_handler.load(ckpt.last_checkpoint)
    assert torch.equal(stored["optimizer"]["state"][0]["exp_avg"], optimizer.state[model.weight]["exp_avg"])
    assert pool.nbytes == state_bytes(model.state_dict()) + sum(
        t.untyped_storage().nbytes() for s in optimizer.state.values() for t in s.values()
    )
    ckpt.close()


def test_a_storage_resized_in_place_gets_a_new_buffer_of_its_new_size():
    pool = SnapshotPool()
    weights = torch.ones(4)
    pool.snapshot({"w": weights})
    pool.release()
    weights.resize_(32).fill_(3.0)  # same storage object, eight times the bytes
    copied = pool.snapshot({"w": weights})
    pool.release()
    assert torch.equal(copied["w"], weights) and pool.allocations == 2 and pool.nbytes == 32 * 4


def test_a_storage_that_is_gone_leaves_its_buffer_to_a_new_storage_of_the_same_size():
    pool = SnapshotPool()
    pool.snapshot({"w": torch.ones(8)})
    pool.release()
    replacement = torch.full((8,), 5.0)  # e.g. optimizer.load_state_dict() replaced the tensors
    copied = pool.snapshot({"w": replacement})
    pool.release()
    assert pool.allocations == 1 and torch.equal(copied["w"], replacement)


def test_the_pool_holds_one_buffer_set_and_a_snapshot_while_it_is_leased_gets_unpooled_memory():
    pool = SnapshotPool()
    state = {"w": torch.arange(8.0)}
    uploading = pool.snapshot(state)  # leased: an upload reads it
    state["w"].add_(10.0)
    second = pool.snapshot(state)
    assert second["w"].data_ptr() != uploading["w"].data_ptr()
    assert uploading["w"].tolist() == list(range(8)) and torch.equal(second["w"], state["w"])
    assert pool.nbytes == 32 and pool.allocations == 1  # the second set is not kept


def test_a_buffer_that_an_earlier_snapshot_still_views_is_never_handed_out_again():
    pool = SnapshotPool()
    state = {"w": torch.zeros(8)}
    kept = pool.snapshot(state)  # e.g. a save handler that keeps the payload, or a failed upload's traceback
    pool.release()
    state["w"].fill_(1.0)
    fresh = pool.snapshot(state)
    pool.release()
    assert kept["w"].tolist() == [0.0] * 8 and fresh["w"].data_ptr() != kept["w"].data_ptr()
    assert pool.nbytes == 32  # the pool replaced the buffer instead of holding both


def test_without_torchs_use_count_no_buffer_is_reused_and_every_snapshot_is_still_right(monkeypatch):
    monkeypatch.setattr(snapshot_module, "_use_count", None)
    pool = SnapshotPool()
    state = {"w": torch.zeros(8)}
    kept = pool.snapshot(state)
    pool.release()
    state["w"].fill_(1.0)
    again = pool.snapshot(state)
    pool.release()
    assert pool.allocations == 2 and kept["w"].tolist() == [0.0] * 8 and again["w"].tolist() == [1.0] * 8


def test_a_save_handler_that_keeps_the_payload_keeps_each_save_as_it_was():
    kept = []

    def handler(checkpoint, filename, metadata=None):
        kept.append(checkpoint)  # an in-memory "store": the payload must never change afterwards

    model = torch.nn.Linear(4, 4)
    with Checkpoint({"model": model}, handler, n_saved=None, async_save=True) as ckpt:
        expected = []
        for step in range(1, 4):
            ckpt.save(global_step=step)
            expected.append(model.weight.detach().clone())
            with torch.no_grad():
                model.weight.add_(1.0)
            ckpt.wait()
    assert all(torch.equal(payload["weight"], weight) for payload, weight in zip(kept, expected, strict=True))


def test_a_failed_upload_still_lets_the_next_save_store_the_right_state():
    store = GatedStore()
    model = torch.nn.Linear(8, 8)
    ckpt = make(model, store)
    store.fail_next = True
    ckpt.save(global_step=1)
    with pytest.raises(ConnectionError):
        ckpt.wait()
    with torch.no_grad():
        model.weight.fill_(7.0)
    ckpt.save(global_step=2)
    ckpt.close()
    assert torch.equal(ckpt.save_handler.load("model_2.pt")["weight"], torch.full((8, 8), 7.0))
    assert ckpt.save_handler.list() == ["model_2.pt"]


def test_close_releases_the_pool():
    ckpt = make(torch.nn.Linear(8, 8), MemoryStore("bucket"))
    ckpt.save(global_step=1)
    ckpt.close()
    assert pool_of(ckpt).nbytes == 0


def test_cuda_storages_go_to_pinned_buffers_and_the_upload_reads_them_only_after_the_copies_event(monkeypatch):
    order: list[str] = []
    pinned_requests: list[bool] = []

    class Event:
        def synchronize(self) -> None:
            order.append("copies done")

    def allocate(nbytes: int, pinned: bool) -> torch.UntypedStorage:
        pinned_requests.append(pinned)
        return torch.UntypedStorage(nbytes)

    class RecordingStore(MemoryStore):
        def put(self, key, data, metadata, when=None):
            order.append("upload reads")
            super().put(key, data, metadata, when)

    monkeypatch.setattr(snapshot_module, "_needs_pinned", lambda storage: True)  # as for storage.device.type == "cuda"
    monkeypatch.setattr(snapshot_module, "_allocate", allocate)
    monkeypatch.setattr(snapshot_module, "_record_copies_done", lambda devices: [Event() for _ in devices])
    model = torch.nn.Linear(4, 4)
    ckpt = make(model, RecordingStore("bucket"))
    for step in (1, 2):
        ckpt.save(global_step=step)
        ckpt.wait()
    ckpt.close()
    assert pinned_requests == [True, True]  # weight and bias, once: the second save reuses them
    assert order == ["copies done", "upload reads"] * 2


def test_a_cuda_storage_is_copied_into_pinned_memory_with_a_non_blocking_copy(monkeypatch):
    copies: list[bool] = []
    real_copy = torch.UntypedStorage.copy_

    def copy_(self, src, non_blocking=False):
        copies.append(non_blocking)
        return real_copy(self, src, non_blocking)

    monkeypatch.setattr(torch.UntypedStorage, "copy_", copy_)
    monkeypatch.setattr(snapshot_module, "_needs_pinned", lambda storage: True)
    monkeypatch.setattr(snapshot_module, "_allocate", lambda nbytes, pinned: torch.UntypedStorage(nbytes))
    monkeypatch.setattr(snapshot_module, "_record_copies_done", lambda devices: [])
    SnapshotPool().snapshot({"w": torch.ones(4), "b": torch.zeros(2)})
    assert copies == [True, True]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu_the_snapshot_is_pinned_and_matches_the_state_after_training_goes_on():
    weights = torch.randn(1024, 1024, device="cuda")
    expected = weights.cpu()
    pool = SnapshotPool()
    copied = pool.snapshot({"w": weights})
    weights.add_(1.0)  # queued after the copy on the same stream
    pool.wait_for_copies()
    assert copied["w"].is_pinned() and torch.equal(copied["w"], expected)
