"""Retention survives restarts: Checkpoint.resume rebuilds the kept list from what is stored."""

from __future__ import annotations

import pytest
import torch

from ckptcloud import Checkpoint, DiskSaver
from ckptcloud.remote import RemoteSaver
from ckptcloud.stores.base import MiB
from ckptcloud.stores.memory import MemoryStore


@pytest.fixture(params=["memory", "disk"])
def make_saver(request, tmp_path):
    store = MemoryStore("bucket")

    def make(prefix: str = "run"):
        if request.param == "memory":
            return RemoteSaver(store, prefix, part_size=5 * MiB, require_empty=False)
        return DiskSaver(tmp_path / prefix, require_empty=False)

    return make


def model() -> torch.nn.Module:
    return torch.nn.Linear(2, 2)


def test_n_saved_holds_across_a_restart(make_saver):
    first = Checkpoint({"model": model()}, make_saver(), n_saved=2)
    for step in (1, 2, 3):
        first.save(global_step=step)
    again = Checkpoint({"model": model()}, make_saver(), n_saved=2, resume=True)
    assert again.state_dict() == {"_saved": [(2, "model_2.pt"), (3, "model_3.pt")]}
    again.save(global_step=4)
    assert make_saver().list() == ["model_3.pt", "model_4.pt"]


def test_a_crash_between_save_and_evict_converges_back_to_n_saved(make_saver):
    keep_all = Checkpoint({"model": model()}, make_saver(), n_saved=None, score_name="acc")
    for step, acc in [(1, 0.5), (2, 0.9), (3, 0.1), (4, 0.7)]:
        keep_all.save(global_step=step, score=acc)
    resumed = Checkpoint({"model": model()}, make_saver(), n_saved=2, score_name="acc", resume=True)
    assert [f for _, f in resumed.state_dict()["_saved"]] == ["model_4_acc=0.7000.pt", "model_2_acc=0.9000.pt"]
    assert make_saver().list() == ["model_2_acc=0.9000.pt", "model_4_acc=0.7000.pt"]


def test_resume_never_touches_what_this_checkpoint_did_not_produce(make_saver):
    Checkpoint({"model": model()}, make_saver(), n_saved=None).save(global_step=1)
    Checkpoint({"optimizer": torch.optim.SGD(model().parameters(), lr=0.1)}, make_saver(), n_saved=None).save(
        global_step=9
    )
    Checkpoint({"model": model()}, make_saver(), filename_prefix="best", n_saved=None).save(global_step=5)
    foreign = make_saver()
    foreign({"w": torch.ones(1)}, "model_final.pt")
    foreign({"w": torch.ones(1)}, "model_7_extra.pt")
    resumed = Checkpoint({"model": model()}, make_saver(), n_saved=1, resume=True)
    assert resumed.state_dict() == {"_saved": [(1, "model_1.pt")]}
    assert make_saver().list() == sorted(
        ["best_model_5.pt", "model_1.pt", "model_7_extra.pt", "model_final.pt", "optimizer_9.pt"]
    )


def test_exact_priorities_come_from_object_metadata_not_the_filename_text():
    store = MemoryStore("bucket")
    saver = RemoteSaver(store, "run", part_size=5 * MiB)
    first = Checkpoint(
        {"model": model()}, saver, n_saved=None, score_name="loss", filename_pattern="{name}_{score}_{global_step}.pt"
    )
    first.save(global_step=1, score=0.12344)
    first.save(global_step=2, score=0.12341)
    resumed = Checkpoint(
        {"model": model()},
        RemoteSaver(store, "run", part_size=5 * MiB, require_empty=False),
        n_saved=1,
        score_name="loss",
        filename_pattern="{name}_{score}_{global_step}.pt",
        resume=True,
    )
    assert resumed.state_dict() == {"_saved": [(0.12344, "model_0.1234_1.pt")]}
    assert sorted(store.objects) == ["run/model_0.1234_1.pt"]


def test_resume_needs_a_handler_that_can_list():
    with pytest.raises(TypeError, match="resume needs a save handler that can list"):
        Checkpoint({"model": model()}, lambda checkpoint, filename: None, resume=True)


def test_resume_of_an_empty_prefix_keeps_nothing(make_saver):
    assert Checkpoint({"model": model()}, make_saver("empty"), n_saved=2, resume=True).state_dict() == {"_saved": []}


def test_resume_with_a_folder_string_allows_a_non_empty_folder(tmp_path):
    Checkpoint({"model": model()}, tmp_path, n_saved=3).save(global_step=3)
    resumed = Checkpoint({"model": model()}, str(tmp_path), n_saved=3, resume=True)
    assert resumed.last_checkpoint == tmp_path / "model_3.pt"
