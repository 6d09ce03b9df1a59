"""``ckptcloud.ModelCheckpoint`` side by side with ignite 0.5.5's own ``ModelCheckpoint`` on local folders.

Each parity test runs the same calls against both classes and compares what is observable: files kept, filenames,
``last_checkpoint``, ``state_dict()``, errors. Where ckptcloud deliberately differs, the test says so in its name.
"""

from __future__ import annotations

import doctest
import inspect
import os
from pathlib import Path

import ignite.handlers
import pytest
import torch
from ignite.engine import Engine, Events
from ignite.handlers import global_step_from_engine
from ignite.handlers.checkpoint import CheckpointEvents

import ckptcloud
import ckptcloud.model_checkpoint
from ckptcloud import Checkpoint, DiskSaver, ModelCheckpoint

IMPLEMENTATIONS = {"ignite": ignite.handlers.ModelCheckpoint, "ckptcloud": ModelCheckpoint}


def both(tmp_path: Path, run) -> dict[str, object]:
    """``run(cls, folder)`` for ignite's class and ours, each in a folder of its own; the results by name."""
    results = {}
    for name, cls in IMPLEMENTATIONS.items():
        folder = tmp_path / name
        folder.mkdir()
        results[name] = run(cls, folder)
    return results


def error_of(call) -> tuple[str, str]:
    try:
        call()
    except Exception as err:
        return type(err).__name__, str(err)
    return "no error", ""


def listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def run_trainer(handler, to_save, *, epochs: int = 6, every: int = 2, data=(0, 1, 2, 3, 4)) -> Engine:
    trainer = Engine(lambda engine, batch: None)
    trainer.add_event_handler(Events.EPOCH_COMPLETED(every=every), handler, to_save)
    trainer.run(list(data), max_epochs=epochs)
    return trainer


def run_evaluations(make_handler, to_save, accuracies: list[float]):
    """One evaluator run per trainer epoch, reporting ``accuracies`` in turn as metric "acc", with the handler
    ``make_handler(trainer)`` attached to the evaluator; returns the handler."""
    trainer = Engine(lambda engine, batch: None)
    evaluator = Engine(lambda engine, batch: None)
    scores = iter(accuracies)
    handler = make_handler(trainer)
    evaluator.add_event_handler(Events.COMPLETED, lambda e: e.state.metrics.update(acc=next(scores)))
    evaluator.add_event_handler(Events.COMPLETED, handler, to_save)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: evaluator.run([0]))
    trainer.run([0, 1], max_epochs=len(accuracies))
    return handler


# ------------------------------------------------------------------------------------------------ signature
def test_signature_names_defaults_and_order_are_ignites():
    ours = inspect.signature(ModelCheckpoint).parameters
    theirs = inspect.signature(ignite.handlers.ModelCheckpoint).parameters
    assert [(p.name, p.kind, p.default) for p in ours.values()] == [
        (p.name, p.kind, p.default) for p in theirs.values()
    ]
    call = inspect.signature(ModelCheckpoint.__call__).parameters
    assert list(call) == list(inspect.signature(ignite.handlers.ModelCheckpoint.__call__).parameters)


def test_model_checkpoint_is_exported_and_is_a_ckptcloud_checkpoint(tmp_path):
    assert ckptcloud.ModelCheckpoint is ModelCheckpoint and "ModelCheckpoint" in ckptcloud.__all__
    handler = ModelCheckpoint(tmp_path)
    assert isinstance(handler, Checkpoint) and isinstance(handler.save_handler, DiskSaver)
    assert handler.save_handler.dirname == tmp_path


def test_the_module_docstring_examples_run():
    result = doctest.testmod(ckptcloud.model_checkpoint, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# ------------------------------------------------------------------------------------- retention parity
SCENARIOS = {
    "docstring example": {"filename_prefix": "myprefix", "n_saved": 2, "create_dir": True, "require_empty": False},
    "defaults": {},
    "keep all": {"filename_prefix": "p", "n_saved": None},
    "epoch as global step": {"n_saved": 3, "global_step_transform": lambda engine, _: engine.state.epoch},
    "filename pattern": {"n_saved": 2, "filename_pattern": "{global_step}-{name}.{ext}"},
    "fixed filename": {"n_saved": 2, "filename_pattern": "latest_{name}.{ext}"},
}


@pytest.mark.parametrize("two_objects", [False, True], ids=["one object", "two objects"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_step_ranked_runs_keep_the_same_files_as_ignite(tmp_path, scenario, two_objects):
    def run(cls, folder):
        model = torch.nn.Linear(3, 3)
        to_save = {"mymodel": model}
        if two_objects:
            to_save["optimizer"] = torch.optim.SGD(model.parameters(), lr=0.1)
        handler = cls(folder, **SCENARIOS[scenario])
        run_trainer(handler, to_save)
        last = handler.last_checkpoint
        return listing(folder), last.relative_to(folder), handler.state_dict()

    results = both(tmp_path, run)
    assert results["ckptcloud"] == results["ignite"]


SCORED = {
    "score name only": {"score_name": "acc", "n_saved": 2},
    "score function and name": {
        "score_function": Checkpoint.get_default_score_fn("acc"),
        "score_name": "val_acc",
        "filename_prefix": "best",
        "n_saved": 2,
    },
    "score function without name": {"score_function": Checkpoint.get_default_score_fn("acc"), "n_saved": 3},
    "with global step": {"score_name": "acc", "n_saved": 2, "global_step_transform": True},
    "greater or equal": {"score_name": "acc", "n_saved": 2, "greater_or_equal": True, "global_step_transform": True},
    "negative scores": {"score_function": Checkpoint.get_default_score_fn("acc", -1.0), "score_name": "neg"},
}


@pytest.mark.parametrize("scenario", list(SCORED))
def test_score_ranked_runs_keep_the_same_files_as_ignite(tmp_path, scenario):
    accuracies = [0.70, 0.72, 0.71, 0.72, 0.60, 0.78, 0.72, 0.78, 0.5]

    def run(cls, folder):
        options = dict(SCORED[scenario])
        by_epoch = options.pop("global_step_transform", False)

        def make(trainer):
            return cls(folder, **options, global_step_transform=global_step_from_engine(trainer) if by_epoch else None)

        handler = run_evaluations(make, {"model": torch.nn.Linear(2, 2)}, accuracies)
        return listing(folder), handler.last_checkpoint.relative_to(folder), handler.state_dict()

    results = both(tmp_path, run)
    assert results["ckptcloud"] == results["ignite"]


def test_a_checkpoint_saved_without_include_self_holds_what_ignites_holds(tmp_path):
    def run(cls, folder):
        torch.manual_seed(0)
        to_save = {"model": torch.nn.Linear(2, 2)}
        handler = cls(folder, "p")
        run_trainer(handler, to_save, epochs=2, every=1)
        return torch.load(handler.last_checkpoint, weights_only=True)

    results = both(tmp_path, run)
    assert results["ckptcloud"].keys() == results["ignite"].keys() == {"weight", "bias"}
    assert all(torch.equal(results["ckptcloud"][k], results["ignite"][k]) for k in ("weight", "bias"))


def test_the_saved_checkpoint_event_fires_as_with_ignite(tmp_path):
    def run(cls, folder):
        fired = []
        trainer = Engine(lambda engine, batch: None)
        trainer.register_events(*CheckpointEvents)  # ignite registers them at the first save; listen from the start
        handler = cls(folder, n_saved=2)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, handler, {"model": torch.nn.Linear(1, 1)})
        trainer.add_event_handler(ignite.handlers.Checkpoint.SAVED_CHECKPOINT, lambda e: fired.append(e.state.epoch))
        trainer.run([0, 1], max_epochs=3)
        return fired

    results = both(tmp_path, run)
    assert results["ckptcloud"] == results["ignite"] == [1, 2, 3]


def test_last_checkpoint_is_none_before_the_first_save_and_reset_forgets_it(tmp_path):
    def run(cls, folder):
        handler = cls(folder)
        before = handler.last_checkpoint
        run_trainer(handler, {"model": torch.nn.Linear(1, 1)}, epochs=2, every=1)
        after = handler.last_checkpoint
        handler.reset()
        return before, after.relative_to(folder), handler.last_checkpoint, listing(folder)

    results = both(tmp_path, run)
    assert results["ckptcloud"] == results["ignite"] == (None, Path("model_10.pt"), None, ["model_10.pt"])


# ----------------------------------------------------------------------------- folder arguments, parity
def test_a_folder_with_pt_files_is_refused_with_ignites_error(tmp_path):
    def run(cls, folder):
        (folder / "old_model_1.pt").write_bytes(b"x")
        kind, message = error_of(lambda: cls(folder, "new"))
        return kind, message.replace(str(folder), "FOLDER")

    results = both(tmp_path, run)
    assert results["ckptcloud"] == results["ignite"]
    assert results["ckptcloud"] == (
        "ValueError",
        "Files ['old_model_1.pt'] with extension '.pt' are already present in the directory FOLDER. "
        "If you want to use this directory anyway, pass `require_empty=False`.",
    )


def test_require_empty_false_accepts_the_folder_and_keeps_its_files_like_ignite(tmp_path):
    def run(cls, folder):
        (folder / "old_model_1.pt").write_bytes(b"x")
        (folder / "notes.txt").write_text("kept")
        run_trainer(cls(folder, require_empty=False, n_saved=1), {"model": torch.nn.Linear(1, 1)})
        return listing(folder)

    results = both(tmp_path, run)
    assert results["ckptcloud"] == results["ignite"] == ["model_30.pt", "notes.txt", "old_model_1.pt"]


def test_other_files_do_not_count_as_checkpoints_for_require_empty(tmp_path):
    def run(cls, folder):
        (folder / "notes.txt").write_text("x")
        return error_of(lambda: cls(folder))

    assert both(tmp_path, run) == {"ignite": ("no error", ""), "ckptcloud": ("no error", "")}


def test_create_dir_makes_missing_folders_and_false_refuses_them_like_ignite(tmp_path):
    def run(cls, folder):
        made = cls(folder / "a" / "b", create_dir=True)
        kind, message = error_of(lambda: cls(folder / "missing", create_dir=False))
        return (folder / "a" / "b").is_dir(), made.last_checkpoint, kind, message.replace(str(folder), "FOLDER")

    results = both(tmp_path, run)
    assert (
        results["ckptcloud"]
        == results["ignite"]
        == (True, None, "ValueError", "Directory path 'FOLDER/missing' is not found")
    )


def test_a_non_empty_folder_is_reported_before_a_bad_argument_like_ignite(tmp_path):
    def run(cls, folder):
        (folder / "x.pt").write_bytes(b"x")
        return error_of(lambda: cls(folder, n_saved=0))[0], error_of(lambda: cls(folder / "new", n_saved=0))

    results = both(tmp_path, run)
    assert results["ckptcloud"] == results["ignite"]
    assert results["ckptcloud"] == ("ValueError", ("ValueError", "n_saved must be a positive integer or None, got 0"))


@pytest.mark.parametrize(
    "options",
    [
        {"n_saved": 0},
        {"n_saved": -2},
        {"global_step_transform": "epoch"},
    ],
    ids=["n_saved 0", "n_saved negative", "global_step_transform not callable"],
)
def test_bad_arguments_raise_ignites_errors(tmp_path, options):
    def run(cls, folder):
        return error_of(lambda: cls(folder, **options))

    results = both(tmp_path, run)
    assert results["ckptcloud"] == results["ignite"] and results["ckptcloud"][0] != "no error"


@pytest.mark.parametrize(
    "case",
    ["empty to_save", "object without state_dict", "score not a number", "unknown pattern field"],
)
def test_bad_calls_raise_ignites_errors(tmp_path, case):
    options = {
        "score not a number": {"score_function": lambda engine: "0.9"},
        "unknown pattern field": {"filename_pattern": "{run}_{name}.{ext}"},
    }.get(case, {})
    to_save = {
        "empty to_save": {},
        "object without state_dict": {"model": torch.nn.Linear(1, 1), "lr": 0.1},
    }.get(case, {"model": torch.nn.Linear(1, 1)})

    def run(cls, folder):
        handler = cls(folder, **options)
        kind, message = error_of(lambda: handler(Engine(lambda engine, batch: None), to_save))
        return kind, message.replace(" in `to_save`", ""), listing(folder)  # ckptcloud also names the argument

    results = both(tmp_path, run)
    assert results["ckptcloud"] == results["ignite"] and results["ckptcloud"][0] != "no error"


def test_dirname_of_the_wrong_type_is_a_type_error_for_both(tmp_path):
    def run(cls, folder):
        return error_of(lambda: cls(42))[0]

    assert both(tmp_path, run) == {"ignite": "TypeError", "ckptcloud": "TypeError"}
    with pytest.raises(TypeError, match="Argument `dirname` should be a str or Path"):
        ModelCheckpoint(42)


@pytest.mark.parametrize("atomic", [True, False])
def test_atomic_decides_whether_a_failed_save_leaves_a_partial_file_like_ignite_but_nothing_is_kept(tmp_path, atomic):
    class Unpicklable:
        def state_dict(self):
            return {"fn": lambda: None}  # torch.save fails half-way through the file

    def run(cls, folder):
        handler = cls(folder, atomic=atomic)
        kind, _ = error_of(lambda: handler(Engine(lambda engine, batch: None), {"bad": Unpicklable()}))
        last = handler.last_checkpoint
        return kind != "no error", listing(folder), last and last.name

    results = both(tmp_path, run)
    leftovers = [] if atomic else ["bad_0.pt"]
    assert results["ignite"] == (True, leftovers, "bad_0.pt")  # ignite keeps the failed save in its list
    assert results["ckptcloud"] == (True, leftovers, None)  # write, then evict: a failed save changes nothing


def test_torch_save_keyword_arguments_reach_torch_save_like_ignite(tmp_path, monkeypatch):
    seen = []
    original = torch.save

    def spy(obj, f, *args, **kwargs):
        seen.append(kwargs)
        return original(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", spy)

    def run(cls, folder):
        seen.clear()
        handler = cls(folder, pickle_protocol=4)
        handler(Engine(lambda engine, batch: None), {"model": torch.nn.Linear(1, 1)})
        return list(seen), listing(folder)

    results = both(tmp_path, run)
    assert results["ckptcloud"] == results["ignite"] == ([{"pickle_protocol": 4}], ["model_0.pt"])


def test_save_on_rank_goes_to_the_folder_saver_and_the_retention_like_ignite(tmp_path):
    def run(cls, folder):
        handler = cls(folder, save_on_rank=3)
        return handler.save_on_rank, handler.save_handler.save_on_rank

    assert both(tmp_path, run) == {"ignite": (3, 3), "ckptcloud": (3, 3)}


# ------------------------------------------------------------------------------------- reload_objects
def test_reload_objects_docstring_example_loads_the_same_file_as_ignite(tmp_path):
    def run(cls, folder):
        torch.manual_seed(0)
        trainer = Engine(lambda engine, batch: None)
        checkpoint = cls(folder, "myprefix", n_saved=None, create_dir=True)
        model = torch.nn.Linear(3, 3)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        to_save = {"weights": model, "optimizer": optimizer}
        trainer.add_event_handler(Events.EPOCH_COMPLETED(every=2), checkpoint, to_save)
        trainer.run(torch.randn(10, 1), 5)
        fresh = torch.nn.Linear(3, 3)
        to_load = {"weights": fresh, "optimizer": torch.optim.SGD(fresh.parameters(), lr=1)}
        checkpoint.reload_objects(to_load=to_load, global_step=40)  # myprefix_checkpoint_40.pt
        missing = error_of(lambda: checkpoint.reload_objects(to_load=to_load, global_step=41))
        partial = torch.nn.Sequential(torch.nn.Linear(3, 3))
        checkpoint.reload_objects(
            {"weights": partial}, load_kwargs={"strict": False}, name="checkpoint", global_step=40
        )
        return (
            listing(folder),
            fresh.weight.tolist(),
            to_load["optimizer"].param_groups[0]["lr"],
            missing[0],
            missing[1].replace(str(folder), "FOLDER"),
        )

    results = both(tmp_path, run)
    assert results["ckptcloud"] == results["ignite"]
    assert results["ckptcloud"][2] == 1e-3 and results["ckptcloud"][3] == "FileNotFoundError"


def test_reload_objects_of_a_score_takes_the_number_where_ignite_needs_its_text(tmp_path):
    def run(cls, folder):
        model = torch.nn.Linear(2, 2)
        handler = run_evaluations(lambda trainer: cls(folder, score_name="acc", n_saved=2), {"model": model}, [0.7])
        fresh = torch.nn.Linear(2, 2)
        handler.reload_objects({"model": fresh}, score="0.7000")  # the filename's text: both
        as_number = error_of(lambda: handler.reload_objects({"model": fresh}, score=0.7))[0]
        return listing(folder), torch.equal(fresh.weight, model.weight), as_number

    results = both(tmp_path, run)
    assert results["ignite"] == (["model_acc=0.7000.pt"], True, "FileNotFoundError")  # looks for model_acc=0.7.pt
    assert results["ckptcloud"] == (["model_acc=0.7000.pt"], True, "no error")  # names it as saving did


# ------------------------------------------------------------------------------ ckptcloud's differences
@pytest.mark.parametrize("argument", ["save_interval", "save_as_state_dict", "archived"])
def test_arguments_ignite_removed_in_0_5_are_refused_when_the_handler_is_made(tmp_path, argument):
    with pytest.raises(TypeError, match=f"Argument `{argument}` was removed from ignite's ModelCheckpoint in 0.5.0"):
        ModelCheckpoint(tmp_path, **{argument: 1})
    assert listing(tmp_path) == []


def test_an_unknown_keyword_is_refused_when_the_handler_is_made_not_at_the_first_save(tmp_path):
    ignites = ignite.handlers.ModelCheckpoint(tmp_path / "ignite", pickle_protokol=4)  # accepted, fails later
    with pytest.raises(TypeError, match="pickle_protokol"):
        ignites(Engine(lambda engine, batch: None), {"model": torch.nn.Linear(1, 1)})
    with pytest.raises(
        TypeError, match=r"unexpected keyword argument `pickle_protokol`: its \*\*kwargs go to torch.save"
    ):
        ModelCheckpoint(tmp_path / "ours", pickle_protokol=4)
    assert not (tmp_path / "ours").exists()  # refused before the folder is made


@pytest.mark.parametrize("argument", ["atomic", "require_empty", "create_dir"])
def test_flags_that_are_not_booleans_are_refused_naming_the_argument(tmp_path, argument):
    with pytest.raises(TypeError, match=f"Argument `{argument}` should be True or False, but given 'no'"):
        ModelCheckpoint(tmp_path, **{argument: "no"})  # ignite would take "no" as true


def test_to_save_that_is_not_a_mapping_is_a_type_error_naming_the_argument(tmp_path):
    handler = ModelCheckpoint(tmp_path)
    with pytest.raises(TypeError, match="Argument `to_save` should be a dictionary, but given <class 'list'>"):
        handler(Engine(lambda engine, batch: None), [torch.nn.Linear(1, 1)])


def test_include_self_refuses_an_object_named_checkpointer_instead_of_overwriting_its_state(tmp_path):
    handler = ModelCheckpoint(tmp_path, include_self=True)
    with pytest.raises(ValueError, match="Cannot have key 'checkpointer' if `include_self` is True"):
        handler(Engine(lambda engine, batch: None), {"checkpointer": torch.nn.Linear(1, 1)})
    assert listing(tmp_path) == []


def test_include_self_saves_the_kept_list_next_to_the_object_and_load_objects_restores_both(tmp_path):
    model = torch.nn.Linear(2, 2)
    handler = ModelCheckpoint(tmp_path, n_saved=2, include_self=True)
    run_trainer(handler, {"model": model}, epochs=6, every=2)
    saved = torch.load(handler.last_checkpoint, weights_only=True)
    assert set(saved) == {"model", "checkpointer"}
    restored = ModelCheckpoint(tmp_path / "restored", n_saved=2, include_self=True)
    fresh = torch.nn.Linear(2, 2)
    Checkpoint.load_objects({"model": fresh, "checkpointer": restored}, handler.last_checkpoint)
    assert torch.equal(fresh.weight, model.weight)
    assert restored.state_dict() == handler.state_dict() == {"_saved": [(20, "model_20.pt"), (30, "model_30.pt")]}


def test_objects_can_change_between_calls_and_name_each_file(tmp_path):
    handler = ModelCheckpoint(tmp_path, n_saved=None)
    trainer = Engine(lambda engine, batch: None)
    trainer.add_event_handler(Events.EPOCH_COMPLETED(once=1), handler, {"model": torch.nn.Linear(1, 1)})
    trainer.add_event_handler(Events.EPOCH_COMPLETED(once=2), handler, {"ema": torch.nn.Linear(1, 1)})
    trainer.run([0, 1], max_epochs=2)
    assert listing(tmp_path) == ["ema_4.pt", "model_2.pt"]


def test_file_url_is_a_local_folder_with_ignites_folder_arguments(tmp_path):
    handler = ModelCheckpoint(f"file://{tmp_path}/runs", "p", atomic=False, n_saved=1)
    assert isinstance(handler.save_handler, DiskSaver) and handler.save_handler.dirname == tmp_path / "runs"
    run_trainer(handler, {"model": torch.nn.Linear(1, 1)})
    assert handler.last_checkpoint == tmp_path / "runs" / "p_model_30.pt"
    with pytest.raises(ValueError, match="is not found"):
        ModelCheckpoint(f"file://{tmp_path}/missing", create_dir=False)
    with pytest.raises(ValueError, match="pass `require_empty=False`"):
        ModelCheckpoint(f"file://{tmp_path}/runs")


def test_an_unknown_url_scheme_is_refused_naming_the_supported_ones(tmp_path):
    with pytest.raises(ValueError, match="Unknown URL scheme 'ftp://'"):
        ModelCheckpoint("ftp://host/models")


def test_save_in_a_plain_loop_takes_the_objects_as_to_save(tmp_path):
    handler = ModelCheckpoint(tmp_path, "run", n_saved=2, score_name="acc")
    model = torch.nn.Linear(2, 1)
    names = [
        handler.save(global_step=step, score=acc, to_save={"model": model})
        for step, acc in [(1, 0.5), (2, 0.9), (3, 0.4)]
    ]
    assert names == ["run_model_1_acc=0.5000.pt", "run_model_2_acc=0.9000.pt", None]
    assert handler.last_checkpoint == tmp_path / "run_model_2_acc=0.9000.pt"
    with pytest.raises(TypeError, match="needs the objects to save"):
        handler.save(global_step=4, score=0.95)
    with pytest.raises(RuntimeError, match="No objects to checkpoint found"):
        handler.save(global_step=4, score=0.95, to_save={})
