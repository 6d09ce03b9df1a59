"""ckptcloud with real PyTorch-Ignite engines (pytorch-ignite 0.5.5): both directions of compatibility."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ignite_engine = pytest.importorskip("ignite.engine")
ignite_handlers = pytest.importorskip("ignite.handlers")
ignite_checkpoint = pytest.importorskip("ignite.handlers.checkpoint")

import ckptcloud  # noqa: E402
from ckptcloud import Checkpoint, DiskSaver  # noqa: E402

Engine, Events = ignite_engine.Engine, ignite_engine.Events
CheckpointEvents = ignite_checkpoint.CheckpointEvents


def pt_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.pt"))


def make_trainer(model: torch.nn.Module) -> Engine:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(engine, batch):
        optimizer.zero_grad()
        loss = model(batch).pow(2).mean()
        loss.backward()
        optimizer.step()
        return loss.item()

    return Engine(step)


def batches(n: int = 3) -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.randn(4, 3) for _ in range(n)]


# ------------------------------------------------------------------------- ignite's Checkpoint, our save handler
def test_ignite_checkpoint_prunes_through_a_ckptcloud_disk_saver(tmp_path):
    model = torch.nn.Linear(3, 1)
    trainer = make_trainer(model)
    saver = DiskSaver(tmp_path)
    assert isinstance(saver, ignite_checkpoint.BaseSaveHandler)

    handler = ignite_handlers.Checkpoint({"model": model}, saver, n_saved=2)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, handler)
    trainer.run(batches(3), max_epochs=5)

    assert pt_files(tmp_path) == ["model_12.pt", "model_15.pt"]  # iterations at the ends of epochs 4 and 5
    assert torch.equal(saver.load("model_15.pt")["weight"], model.weight.detach())


@pytest.mark.parametrize("order", ["ckptcloud-first", "ignite-first"])
def test_save_handlers_count_as_ignite_save_handlers_whatever_the_import_order(order):
    imports = ["import ckptcloud", "import ignite.handlers.checkpoint as ic"]
    if order == "ignite-first":
        imports.reverse()
    code = "; ".join(
        [
            *imports,
            "import tempfile",
            "assert isinstance(ckptcloud.DiskSaver(tempfile.mkdtemp()), ic.BaseSaveHandler)",
            "assert issubclass(ckptcloud.BaseSaveHandler, ic.BaseSaveHandler)",
        ]
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------- our Checkpoint on ignite engines
def test_best_k_on_evaluator_keeps_exact_files_and_fires_saved_event(tmp_path):
    model = torch.nn.Linear(3, 1)
    trainer = make_trainer(model)
    evaluator = Engine(lambda engine, batch: None)
    accuracies = iter([0.5, 0.8, 0.6, 0.9, 0.7])

    @evaluator.on(Events.COMPLETED)
    def compute_metric(engine):
        engine.state.metrics["acc"] = next(accuracies)

    checkpoint = Checkpoint(
        {"model": model},
        DiskSaver(tmp_path),
        filename_prefix="best",
        score_name="val_acc",
        score_function=Checkpoint.get_default_score_fn("acc"),
        global_step_transform=ignite_handlers.global_step_from_engine(trainer),
        n_saved=2,
    )
    evaluator.add_event_handler(Events.COMPLETED, checkpoint)
    evaluator.register_events(*CheckpointEvents)
    saved_events = []
    evaluator.add_event_handler(CheckpointEvents.SAVED_CHECKPOINT, lambda engine: saved_events.append(1))
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda engine: evaluator.run([0, 1]))

    trainer.run(batches(2), max_epochs=5)

    expected = ["best_model_2_val_acc=0.8000.pt", "best_model_4_val_acc=0.9000.pt"]
    assert pt_files(tmp_path) == expected
    assert [f for _, f in checkpoint.state_dict()["_saved"]] == expected
    assert checkpoint.last_checkpoint == tmp_path / "best_model_4_val_acc=0.9000.pt"
    assert len(saved_events) == 4  # epochs 1-4 were saved; epoch 5 (0.7 < 0.8) was not


def test_saved_event_is_registered_lazily_on_the_first_save(tmp_path):
    model = torch.nn.Linear(3, 1)
    trainer = make_trainer(model)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, Checkpoint({"model": model}, DiskSaver(tmp_path)))
    assert not trainer.has_registered_events(CheckpointEvents.SAVED_CHECKPOINT)
    trainer.run(batches(2), max_epochs=1)
    assert trainer.has_registered_events(CheckpointEvents.SAVED_CHECKPOINT)
    assert pt_files(tmp_path) == ["model_2.pt"]


def test_saved_checkpoint_alias_is_ignites_event():
    # Ported code writes `@trainer.on(Checkpoint.SAVED_CHECKPOINT)`: ignite's Checkpoint has this class attribute.
    assert Checkpoint.SAVED_CHECKPOINT is ignite_handlers.Checkpoint.SAVED_CHECKPOINT


def test_resume_with_include_self_restores_the_kept_list_and_prunes_the_previous_run(tmp_path):
    data = batches(2)

    # run 1: three epochs of two iterations, keep two
    model = torch.nn.Linear(3, 1)
    trainer = make_trainer(model)
    first = Checkpoint({"model": model, "trainer": trainer}, DiskSaver(tmp_path), n_saved=2, include_self=True)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, first)
    trainer.run(data, max_epochs=3)
    assert pt_files(tmp_path) == ["checkpoint_4.pt", "checkpoint_6.pt"]
    trained = {k: v.clone() for k, v in model.state_dict().items()}

    # run 2: fresh objects restored from the last checkpoint, including the checkpointer's kept list
    model2 = torch.nn.Linear(3, 1)
    trainer2 = make_trainer(model2)
    second = Checkpoint(
        {"model": model2, "trainer": trainer2},
        DiskSaver(tmp_path, require_empty=False),
        n_saved=2,
        include_self=True,
    )
    Checkpoint.load_objects({"checkpointer": second, "model": model2, "trainer": trainer2}, str(first.last_checkpoint))
    assert second.state_dict() == {"_saved": [(4, "checkpoint_4.pt"), (6, "checkpoint_6.pt")]}
    assert all(torch.equal(model2.state_dict()[k], v) for k, v in trained.items())
    assert trainer2.state.iteration == 6

    trainer2.add_event_handler(Events.EPOCH_COMPLETED, second)
    trainer2.run(data, max_epochs=4)

    assert pt_files(tmp_path) == ["checkpoint_6.pt", "checkpoint_8.pt"]  # run 1's checkpoint_4.pt was pruned
    assert second.state_dict() == {"_saved": [(6, "checkpoint_6.pt"), (8, "checkpoint_8.pt")]}
    stored = DiskSaver(tmp_path, require_empty=False).load("checkpoint_8.pt")
    assert stored["checkpointer"] == {"_saved": [(6, "checkpoint_6.pt"), (8, "checkpoint_8.pt")]}


def test_our_checkpoint_prunes_through_an_ignite_disk_saver(tmp_path):
    # Code ported by changing only the Checkpoint import keeps ignite's DiskSaver.
    model = torch.nn.Linear(3, 1)
    trainer = make_trainer(model)
    checkpoint = Checkpoint({"model": model}, ignite_handlers.DiskSaver(str(tmp_path)), n_saved=2)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, checkpoint)
    trainer.run(batches(2), max_epochs=4)
    assert pt_files(tmp_path) == ["model_6.pt", "model_8.pt"]


def test_last_checkpoint_is_a_path_with_an_ignite_disk_saver(tmp_path):
    # Library bug: `last_checkpoint` joins the folder only for ckptcloud's DiskSaver; ignite's Checkpoint returns
    # `dirname / filename` for ignite's DiskSaver, so ported `torch.load(checkpointer.last_checkpoint)` breaks.
    model = torch.nn.Linear(3, 1)
    checkpoint = Checkpoint({"model": model}, ignite_handlers.DiskSaver(str(tmp_path)))
    trainer = make_trainer(model)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, checkpoint)
    trainer.run(batches(2), max_epochs=1)
    assert checkpoint.last_checkpoint == tmp_path / "model_2.pt"


# ------------------------------------------------------------------------------------- save_handler as a string
@pytest.mark.parametrize("as_url", [False, True], ids=["path", "file-url"])
def test_string_save_handler_makes_a_disk_saver(tmp_path, as_url):
    folder = tmp_path / "some" / "dir"
    handler = folder.as_uri() if as_url else str(folder)
    model = torch.nn.Linear(3, 1)
    checkpoint = Checkpoint({"model": model}, handler)

    assert isinstance(checkpoint.save_handler, DiskSaver)
    assert checkpoint.save_handler.dirname == folder
    assert folder.is_dir()  # create_dir=True

    trainer = make_trainer(model)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, checkpoint)
    trainer.run(batches(2), max_epochs=2)
    assert pt_files(folder) == ["model_4.pt"]
    assert checkpoint.last_checkpoint == folder / "model_4.pt"


def test_file_url_with_a_host_is_refused(tmp_path):
    # Library bug: split_url drops the netloc of file:// URLs, so "file://host/dir" (or a mistyped relative
    # "file://runs/dir") silently becomes the absolute folder "/dir".
    folder = tmp_path / "dir"
    with pytest.raises(ValueError, match="file://"):
        Checkpoint({"model": torch.nn.Linear(3, 1)}, f"file://otherhost{folder}")
    assert not folder.exists()


def test_path_save_handler_makes_a_disk_saver(tmp_path):
    checkpoint = Checkpoint({"model": torch.nn.Linear(3, 1)}, tmp_path / "p")
    assert isinstance(checkpoint.save_handler, ckptcloud.DiskSaver)
    assert checkpoint.save_handler.dirname == tmp_path / "p"
