"""Resume and naming defects from the December review and new-user trial: each test failed on 808aaac."""

from __future__ import annotations

import pytest
import torch

from ckptcloud import Checkpoint, DiskSaver
from ckptcloud._resume import parse_priority
from ckptcloud.remote import RemoteSaver
from ckptcloud.stores.memory import MemoryStore


class Float64(float):
    """Stands in for ``numpy.float64`` (NumPy 2's repr), so this runs in the minimal install without numpy."""

    def __repr__(self) -> str:
        return f"np.float64({float(self)!r})"

    def __str__(self) -> str:
        return repr(float(self))


class Int64(int):
    """Stands in for ``numpy.int64``."""

    def __repr__(self) -> str:
        return f"np.int64({int(self)!r})"

    def __str__(self) -> str:
        return repr(int(self))


def saver(store: MemoryStore) -> RemoteSaver:
    return RemoteSaver(store, "run", require_empty=False)


def test_numpy_like_scores_resume_as_their_values_and_better_ones_are_still_saved():
    store, model = MemoryStore("b"), torch.nn.Linear(2, 2)
    ckpt = Checkpoint({"model": model}, saver(store), n_saved=2, score_name="acc")
    for step, acc in enumerate([0.50, 0.70, 0.60], 1):
        ckpt.save(global_step=step, score=Float64(acc))
    assert store.objects["run/model_2_acc=0.7000.pt"][1]["ckptcloud_priority"] == "0.7"
    again = Checkpoint({"model": model}, saver(store), n_saved=2, score_name="acc", resume=True)
    assert again.state_dict() == {"_saved": [(0.6, "model_3_acc=0.6000.pt"), (0.7, "model_2_acc=0.7000.pt")]}
    assert again.save(global_step=4, score=Float64(0.95)) == "model_4_acc=0.9500.pt"


def test_numpy_like_steps_resume_as_steps_so_the_newest_checkpoint_is_kept():
    store, model = MemoryStore("b"), torch.nn.Linear(2, 2)
    ckpt = Checkpoint({"model": model}, saver(store), n_saved=2)
    for step in (1, 2, 3):
        ckpt.save(global_step=Int64(step))
    again = Checkpoint({"model": model}, saver(store), n_saved=2, resume=True)
    assert again.state_dict() == {"_saved": [(2, "model_2.pt"), (3, "model_3.pt")]}


def test_priorities_written_by_0_1_0_for_numpy_scores_are_read_as_their_numbers():
    assert parse_priority("np.float64%280.7%29") == 0.7
    assert parse_priority("np.int64(12)") == 12
    assert parse_priority("float64") is None  # no number is guessed out of other text
    assert parse_priority("0.7 and 64") is None


@pytest.mark.parametrize("argument", ["score_name", "filename_prefix"])
def test_a_slash_in_score_name_or_filename_prefix_is_refused_at_construction(tmp_path, argument):
    with pytest.raises(ValueError, match=f"`{argument}` should not contain '/'.*'val_acc'"):
        Checkpoint({"model": torch.nn.Linear(2, 2)}, str(tmp_path), **{argument: "val/acc"})


def test_resume_finds_checkpoints_saved_with_a_score_but_no_score_name(tmp_path):
    model = torch.nn.Linear(2, 2)
    ckpt = Checkpoint({"model": model}, DiskSaver(tmp_path), n_saved=2)
    for step, score in [(2, 0.7), (3, 0.6)]:
        ckpt.save(global_step=step, score=score)
    again = Checkpoint({"model": model}, DiskSaver(tmp_path, require_empty=False), n_saved=2, resume=True)
    assert again.state_dict() == {"_saved": [(0.6, "model_3_0.6000.pt"), (0.7, "model_2_0.7000.pt")]}
    again.save(global_step=5, score=0.9)
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["model_2_0.7000.pt", "model_5_0.9000.pt"]


def test_a_worse_score_never_overwrites_a_kept_checkpoint_of_the_same_name():
    store, model = MemoryStore("b"), torch.nn.Linear(2, 2)
    ckpt = Checkpoint({"model": model}, saver(store), n_saved=2, score_name="acc")
    for acc in (0.50, 0.95004):
        ckpt.save(score=acc)
    with torch.no_grad():
        model.weight.fill_(-1.0)
    with pytest.warns(RuntimeWarning, match="would overwrite the kept checkpoint"):
        assert ckpt.save(score=0.94996) is None  # also "model_acc=0.9500.pt"
    assert ckpt.state_dict()["_saved"][-1] == (0.95004, "model_acc=0.9500.pt")
    assert ckpt.save_handler.load("model_acc=0.9500.pt")["weight"].min().item() != -1.0
    assert ckpt.save(score=0.950045) == "model_acc=0.9500.pt"  # a better one still replaces it


def test_a_foreign_object_whose_name_ckptcloud_would_never_write_does_not_break_resume_or_listing(tmp_path):
    store, model = MemoryStore("b"), torch.nn.Linear(2, 2)
    ckpt = Checkpoint({"model": model}, saver(store), n_saved=2)
    for step in (1, 2, 3):
        ckpt.save(global_step=step)
    store.put("run/old\\model_0.pt", memoryview(b"someone else's"), {})  # e.g. uploaded from Windows
    store.put("run/\x1b[31mmodel_9.pt", memoryview(b"x"), {})
    again = Checkpoint({"model": model}, saver(store), n_saved=2, resume=True)
    assert again.state_dict() == {"_saved": [(2, "model_2.pt"), (3, "model_3.pt")]}
    assert again.save_handler.list() == ["model_2.pt", "model_3.pt"]
    assert "run/old\\model_0.pt" in store.objects  # never touched
    (tmp_path / "old\\model_0.pt").write_bytes(b"x")
    assert DiskSaver(tmp_path, require_empty=False).list() == []


def test_cleanup_incomplete_leaves_other_jobs_running_uploads_alone_by_default():
    store = MemoryStore("b")
    running = store.begin("run/model_7.pt", {})  # another job's save, just started
    remote = saver(store)
    assert remote.cleanup_incomplete() == []
    assert running in store.uploads
    assert remote.cleanup_incomplete(older_than=0) == ["run/model_7.pt"]
