"""ignite's own Checkpoint documentation examples (shared/reference), with ckptcloud's imports, run unchanged.

Only the placeholders (``trainer = ...``, ``model = ...``) are filled in; the calls are the documentation's.
"""

from __future__ import annotations

import os

import pytest
import torch
from ignite.engine import Engine, Events
from ignite.handlers import global_step_from_engine

from ckptcloud import Checkpoint, DiskSaver

pytestmark = pytest.mark.integration


def objects() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)


@pytest.mark.parametrize("checkpoint_iters", [True, False])
def test_attach_the_handler_to_make_checkpoints_during_training(tmp_path, checkpoint_iters):
    trainer = Engine(lambda engine, batch: None)
    model, optimizer, lr_scheduler = objects()
    data_loader = range(1400)
    folder = str(tmp_path / "models")

    to_save = {"model": model, "optimizer": optimizer, "lr_scheduler": lr_scheduler, "trainer": trainer}

    if checkpoint_iters:
        # A: Output is "checkpoint_<iteration>.pt"
        handler = Checkpoint(to_save, DiskSaver(folder, create_dir=True), n_saved=2)
        trainer.add_event_handler(Events.ITERATION_COMPLETED(every=1000), handler)
    else:
        # B:Output is "checkpoint_<epoch>.pt"
        gst = lambda *_: trainer.state.epoch  # noqa: E731
        handler = Checkpoint(to_save, DiskSaver(folder, create_dir=True), n_saved=2, global_step_transform=gst)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, handler)

    trainer.run(data_loader, max_epochs=6)
    expected = (
        ["checkpoint_7000.pt", "checkpoint_8000.pt"] if checkpoint_iters else ["checkpoint_5.pt", "checkpoint_6.pt"]
    )
    assert sorted(os.listdir(folder)) == expected


def test_attach_the_handler_to_an_evaluator_to_save_the_best_model(tmp_path):
    trainer = Engine(lambda engine, batch: None)
    accuracies = iter([0.70, 0.71, 0.72, 0.73, 0.74, 0.75, 0.76, 0.60, 0.77, 0.78])
    evaluator = Engine(lambda engine, batch: None)
    evaluator.add_event_handler(Events.COMPLETED, lambda e: e.state.metrics.update(accuracy=next(accuracies)))
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: evaluator.run([0]))
    model = torch.nn.Linear(2, 2)
    folder = str(tmp_path / "models")

    score_function = Checkpoint.get_default_score_fn("accuracy")

    to_save = {"model": model}
    handler = Checkpoint(
        to_save,
        DiskSaver(folder, create_dir=True),
        n_saved=2,
        filename_prefix="best",
        score_function=score_function,
        score_name="val_acc",
        global_step_transform=global_step_from_engine(trainer),
    )

    evaluator.add_event_handler(Events.COMPLETED, handler)

    trainer.run(range(3), max_epochs=10)
    assert sorted(os.listdir(folder)) == ["best_model_10_val_acc=0.7800.pt", "best_model_9_val_acc=0.7700.pt"]


def test_reset_when_the_engine_runs_several_times(tmp_path):
    trainer = Engine(lambda engine, batch: None)
    model, _, _ = objects()
    checkpointer = Checkpoint({"model": model}, DiskSaver(str(tmp_path), create_dir=True), n_saved=1)

    trainer.add_event_handler(Events.COMPLETED, checkpointer)
    trainer.add_event_handler(Events.STARTED, checkpointer.reset)

    # fold 0
    trainer.run(range(4), max_epochs=2)
    first = checkpointer.last_checkpoint
    # fold 1
    trainer.run(range(3), max_epochs=2)
    assert first == tmp_path / "model_8.pt" and checkpointer.last_checkpoint == tmp_path / "model_6.pt"
