"""The resume guard: the checkpoint a run resumed from, or loaded through ``ckpt.load_objects``, is never deleted
until this run commits a newer checkpoint, whatever ``n_saved`` or the policy says.

The first tests replay Lightning#21813 (a resumed run on remote storage deleted the only checkpoint it had resumed
from): with ``n_saved=1`` and with ``keep=BestN(1)``, the resumed run's first save is worse or fails, and the
checkpoint it resumed from must still be there, across three restarts.
"""

from __future__ import annotations

import inspect
import threading

import pytest
import torch

from ckptcloud import Checkpoint, DiskSaver
from ckptcloud.policies import BestN, LatestN
from ckptcloud.remote import RemoteSaver
from ckptcloud.retry import NO_RETRY
from ckptcloud.stores.base import MiB
from ckptcloud.stores.memory import MemoryStore


class FlakyStore(MemoryStore):
    """A bucket whose uploads can be made to fail (``fail = True``) or to wait for ``gate``."""

    def __init__(self) -> None:
        super().__init__("bucket")
        self.fail = False
        self.gate = threading.Event()
        self.gate.set()

    def put(self, key, data, metadata, when=None):
        assert self.gate.wait(10), "test forgot to open the gate"
        if self.fail:
            raise PermissionError("upload refused: the bucket policy changed")
        super().put(key, data, metadata, when)

    def names(self) -> list[str]:
        return sorted(key.removeprefix("run/") for key in self.objects)


RETENTION = [pytest.param({"n_saved": 1}, id="n_saved=1"), pytest.param({"keep": BestN(1)}, id="BestN(1)")]


def saver(store: MemoryStore) -> RemoteSaver:
    return RemoteSaver(store, "run", part_size=5 * MiB, require_empty=False, retry=NO_RETRY)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("retention", RETENTION)
def test_lightning_21813_a_resumed_runs_worse_or_failed_first_save_keeps_the_checkpoint_it_resumed_from(retention):
    store = FlakyStore()
    trained = torch.nn.Linear(4, 2)
    Checkpoint({"model": trained}, saver(store), score_name="acc", **retention).save(global_step=1, score=0.8)
    (only,) = store.names()

    model = torch.nn.Linear(4, 2)
    ckpt = Checkpoint({"model": model}, saver(store), score_name="acc", resume=True, **retention)
    assert ckpt.last_checkpoint == only and ckpt.guarded == {only}
    ckpt.load_objects({"model": model}, ckpt.last_checkpoint)  # a remote saver's filename loads through the saver
    assert all(torch.equal(a, b) for a, b in zip(weights(model).values(), weights(trained).values(), strict=True))

    assert ckpt.save(global_step=2, score=0.5) is None  # worse: skipped before any upload
    assert store.names() == [only]
    store.fail = True
    with pytest.raises(PermissionError, match="upload refused"):
        ckpt.save(global_step=3, score=0.9)  # better, but the upload fails
    assert store.names() == [only] and ckpt.last_checkpoint == only and ckpt.guarded == {only}


@pytest.mark.parametrize("retention", RETENTION)
def test_across_three_restarts_the_resumed_from_checkpoint_survives_until_a_newer_one_is_committed(retention):
    store = FlakyStore()
    Checkpoint({"model": torch.nn.Linear(4, 2)}, saver(store), score_name="acc", **retention).save(
        global_step=1, score=0.8
    )
    (resumed_from,) = store.names()
    step = 1
    for _restart in range(3):
        ckpt = Checkpoint({"model": torch.nn.Linear(4, 2)}, saver(store), score_name="acc", resume=True, **retention)
        assert ckpt.last_checkpoint == resumed_from and resumed_from in ckpt.guarded
        store.fail = True
        for score in (0.95, 0.99):
            step += 1
            with pytest.raises(PermissionError):
                ckpt.save(global_step=step, score=score)
            assert resumed_from in store.names()
        store.fail = False
        step += 1
        assert ckpt.save(global_step=step, score=0.1) is None
        assert store.names() == [resumed_from]
    # a newer checkpoint is committed: from now on normal retention applies
    step += 1
    newer = ckpt.save(global_step=step, score=0.9)
    assert store.names() == [newer] and ckpt.guarded == frozenset()


def test_a_step_ranked_run_resumed_with_n_saved_1_keeps_its_checkpoint_while_later_saves_fail():
    store = FlakyStore()
    Checkpoint({"model": torch.nn.Linear(4, 2)}, saver(store)).save(global_step=100)
    for restart in range(3):
        ckpt = Checkpoint({"model": torch.nn.Linear(4, 2)}, saver(store), resume=True)
        assert ckpt.guarded == {"model_100.pt"}
        store.fail = True
        with pytest.raises(PermissionError):
            ckpt.save(global_step=101 + restart)
        store.fail = False
        assert store.names() == ["model_100.pt"]
    assert ckpt.save(global_step=200) == "model_200.pt"
    assert store.names() == ["model_200.pt"]


def test_a_checkpoint_loaded_while_an_async_save_that_evicts_it_is_in_flight_is_held_until_the_next_commit():
    store = FlakyStore()
    model = torch.nn.Linear(4, 2)
    ckpt = Checkpoint({"model": model}, saver(store), n_saved=1, async_save=True)
    ckpt.save(global_step=1)
    ckpt.wait()
    store.gate.clear()
    ckpt.save(global_step=2)  # planned to evict model_1.pt once it is stored
    ckpt.load_objects({"model": model}, "model_1.pt")  # the user goes back to model_1 meanwhile
    store.gate.set()
    ckpt.wait()
    assert store.names() == ["model_1.pt", "model_2.pt"]  # held: the load came after the plan
    assert ckpt.last_checkpoint == "model_2.pt" and ckpt.guarded == {"model_1.pt"}
    ckpt.save(global_step=3)
    ckpt.close()
    assert store.names() == ["model_3.pt"] and ckpt.guarded == frozenset()


def test_a_loaded_checkpoint_that_a_later_resume_would_drop_is_held_until_the_next_commit(tmp_path):
    model = torch.nn.Linear(4, 2)
    first = Checkpoint({"model": model}, str(tmp_path), n_saved=None, score_name="acc")
    for step, acc in [(1, 0.9), (2, 0.5), (3, 0.7)]:
        first.save(global_step=step, score=acc)
    ckpt = Checkpoint({"model": model}, DiskSaver(tmp_path, require_empty=False), n_saved=1, score_name="acc")
    ckpt.load_objects({"model": model}, tmp_path / "model_3_acc=0.7000.pt")  # resume from the latest, not the best
    ckpt.resume()
    assert ckpt.state_dict() == {"_saved": [(0.9, "model_1_acc=0.9000.pt")]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_1_acc=0.9000.pt", "model_3_acc=0.7000.pt"]
    ckpt.save(global_step=4, score=0.95)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_4_acc=0.9500.pt"]


def test_a_policy_never_deletes_the_loaded_checkpoint_before_a_newer_commit_even_when_it_does_not_keep_it(tmp_path):
    model = torch.nn.Linear(4, 2)
    first = Checkpoint({"model": model}, str(tmp_path), keep=LatestN(3))
    for step in (1, 2, 3):
        first.save(global_step=step)
    ckpt = Checkpoint({"model": model}, DiskSaver(tmp_path, require_empty=False), keep=LatestN(1))
    ckpt.load_objects({"model": model}, (tmp_path / "model_1.pt").as_uri())  # file:// URLs name it too
    assert ckpt.guarded == {"model_1.pt"}
    ckpt.resume()  # LatestN(1) keeps model_3; model_2 goes at once, model_1 is held
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_1.pt", "model_3.pt"]
    assert ckpt.guarded == {"model_1.pt", "model_3.pt"}
    ckpt.save(global_step=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_4.pt"]


def test_ignites_include_self_resume_through_the_class_method_guards_the_file_on_that_checkpoint(tmp_path):
    model = torch.nn.Linear(4, 2)
    to_save = {"model": model}
    writer = Checkpoint(to_save, str(tmp_path), n_saved=1, include_self=True)
    writer.save(global_step=5)
    ckpt = Checkpoint({"model": model}, DiskSaver(tmp_path, require_empty=False), n_saved=1)
    Checkpoint.load_objects({"model": model, "checkpointer": ckpt}, tmp_path / "model_5.pt")
    assert ckpt.state_dict() == {"_saved": [(5, "model_5.pt")]} and ckpt.guarded == {"model_5.pt"}


def test_reload_objects_guards_the_file_it_loaded(tmp_path):
    model = torch.nn.Linear(4, 2)
    ckpt = Checkpoint({"model": model}, str(tmp_path), n_saved=2)
    ckpt.save(global_step=1)
    ckpt.reload_objects({"model": model}, global_step=1)
    assert ckpt.guarded == {"model_1.pt"}


def test_load_objects_stays_ignites_staticmethod_on_the_class():
    params = list(inspect.signature(Checkpoint.load_objects).parameters)
    assert params == ["to_load", "checkpoint", "map_location", "weights_only", "kwargs"]
    model, other = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    assert Checkpoint.load_objects({"model": model}, {"model": other.state_dict()}) is None
    assert torch.equal(model.weight, other.weight)
    assert "Call ``load_state_dict`` on every object" in (Checkpoint.load_objects.__doc__ or "")


def test_loading_something_that_is_not_this_checkpoints_guards_nothing(tmp_path):
    model = torch.nn.Linear(2, 1)
    ckpt = Checkpoint({"model": model}, str(tmp_path / "run"), n_saved=1)
    torch.save({"model": model.state_dict()}, tmp_path / "elsewhere.pt")
    ckpt.load_objects({"model": model}, tmp_path / "elsewhere.pt")
    ckpt.load_objects({"model": model}, {"model": model.state_dict()})  # a mapping names no file
    assert ckpt.guarded == frozenset()


def test_reset_forgets_the_guard_and_deletes_nothing():
    store = FlakyStore()
    Checkpoint({"model": torch.nn.Linear(4, 2)}, saver(store)).save(global_step=1)
    ckpt = Checkpoint({"model": torch.nn.Linear(4, 2)}, saver(store), resume=True)
    ckpt.reset()
    assert ckpt.guarded == frozenset() and ckpt.state_dict() == {"_saved": []}
    ckpt.save(global_step=2)
    assert store.names() == ["model_1.pt", "model_2.pt"]
