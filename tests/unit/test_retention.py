"""The retention engine (``ckptcloud.Checkpoint``) against an in-memory save handler and fake engines.

Ported behaviour comes from ignite 0.5.5's ``Checkpoint`` (see docs/retention-spec.md); the tests marked
"ckptcloud:" protect the places where we deliberately differ.
"""

from __future__ import annotations

import random
import types
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch

from ckptcloud import BaseSaveHandler, Checkpoint, DiskSaver
from tests.unit.fakes import MemorySaver, Stateful, kept, make_engine, model


def scored(values):
    """A score function returning ``values`` one after the other."""
    it = iter(values)
    return lambda engine: next(it)


def run_scores(checkpoint, scores, *, start_epoch=1):
    """Call ``checkpoint`` once per score with a fake engine whose epoch/iteration count up from ``start_epoch``."""
    for step, score in enumerate(scores, start=start_epoch):
        checkpoint(make_engine(iteration=step, epoch=step, metrics={"acc": score}))


def epoch_of(engine, event_name):
    return engine.state.epoch


def assert_same_state(actual, expected):
    assert actual.keys() == expected.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


# ------------------------------------------------------------------------------------------------- constructor
class NoState:
    pass


@pytest.mark.parametrize("to_save", [[model()], (model(),), "model", None])
def test_to_save_must_be_a_mapping(to_save):
    with pytest.raises(TypeError, match="Argument `to_save` should be a dictionary, but given") as info:
        Checkpoint(to_save, MemorySaver())
    assert repr(type(to_save)) in str(info.value)


@pytest.mark.parametrize(
    "to_save",
    [
        {"model": model(), "bad": NoState()},
        {"nested": {"model": model(), "bad": NoState()}},
        {"models": [model(), NoState()]},
        {"models": (model(), {"deeper": [NoState()]})},
    ],
    ids=["top-level", "nested-dict", "nested-list", "nested-tuple"],
)
def test_every_leaf_of_to_save_needs_state_dict(to_save):
    with pytest.raises(TypeError, match=r"Object <class '.*NoState'> in `to_save` should have `state_dict` method"):
        Checkpoint(to_save, MemorySaver())


def test_include_self_refuses_an_immutable_mapping():
    to_save = types.MappingProxyType({"model": model()})
    with pytest.raises(TypeError, match="If `include_self` is True, then `to_save` must be mutable, but given"):
        Checkpoint(to_save, MemorySaver(), include_self=True)
    Checkpoint(to_save, MemorySaver())  # fine without include_self


def test_include_self_refuses_a_checkpointer_key():
    with pytest.raises(ValueError, match="Cannot have key 'checkpointer' if `include_self` is True"):
        Checkpoint({"model": model(), "checkpointer": Stateful()}, MemorySaver(), include_self=True)
    Checkpoint({"model": model(), "checkpointer": Stateful()}, MemorySaver())  # fine without include_self


@pytest.mark.parametrize("save_handler", [42, object(), None])
def test_save_handler_must_be_a_path_a_callable_or_a_save_handler(save_handler):
    with pytest.raises(TypeError, match="Argument `save_handler` should be a string or Path object") as info:
        Checkpoint({"model": model()}, save_handler)
    assert repr(type(save_handler)) in str(info.value)


def test_global_step_transform_must_be_callable():
    with pytest.raises(TypeError, match="global_step_transform should be a function, got <class 'int'> instead"):
        Checkpoint({"model": model()}, MemorySaver(), global_step_transform=12)


@pytest.mark.parametrize("n_saved", [0, -1])
def test_n_saved_must_be_positive_or_none(n_saved):
    with pytest.raises(ValueError, match=f"n_saved must be a positive integer or None, got {n_saved}"):
        Checkpoint({"model": model()}, MemorySaver(), n_saved=n_saved)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(to_save=[NoState()], save_handler=42), TypeError, "`to_save` should be a dictionary"),
        (
            dict(to_save=types.MappingProxyType({"a": NoState()}), save_handler=42, include_self=True),
            TypeError,
            "should have `state_dict` method",
        ),
        (
            dict(to_save=types.MappingProxyType({"a": Stateful()}), save_handler=42, include_self=True),
            TypeError,
            "must be mutable",
        ),
        (
            dict(to_save={"checkpointer": Stateful()}, save_handler=42, include_self=True),
            ValueError,
            "Cannot have key 'checkpointer'",
        ),
        (
            dict(to_save={"a": Stateful()}, save_handler=42, global_step_transform=1, n_saved=0),
            TypeError,
            "`save_handler` should be",
        ),
        (
            dict(to_save={"a": Stateful()}, save_handler=MemorySaver(), global_step_transform=1, n_saved=0),
            TypeError,
            "global_step_transform should be a function",
        ),
    ],
    ids=["to_save", "leaf", "immutable", "checkpointer-key", "save_handler", "global_step_transform"],
)
def test_constructor_reports_the_first_failing_check_in_order(kwargs, error, message):
    with pytest.raises(error, match=message):
        Checkpoint(**kwargs)


# ------------------------------------------------------------------------------------------ naming and metadata
def test_default_name_is_the_single_key_and_the_iteration():
    saver, net = MemorySaver(), model()
    Checkpoint({"model": net}, saver)(make_engine(iteration=203))

    assert saver.calls == [("model_203.pt", {"basename": "model", "score_name": None, "priority": 203})]
    assert_same_state(saver.files["model_203.pt"], net.state_dict())  # the object's own state dict


def test_several_objects_are_saved_together_as_checkpoint():
    saver, net, counter = MemorySaver(), model(), Stateful(5)
    Checkpoint({"model": net, "counter": counter}, saver, filename_prefix="run")(make_engine(iteration=7))

    assert saver.calls == [("run_checkpoint_7.pt", {"basename": "run_checkpoint", "score_name": None, "priority": 7})]
    payload = saver.files["run_checkpoint_7.pt"]
    assert set(payload) == {"model", "counter"}
    assert payload["counter"] == {"value": 5}
    assert_same_state(payload["model"], net.state_dict())


def test_nested_to_save_is_saved_as_nested_state_dicts():
    saver, first, second = MemorySaver(), model(), torch.nn.Linear(1, 1)
    Checkpoint({"models": [first, second], "extra": {"counter": Stateful(2)}}, saver)(make_engine(iteration=1))

    payload = saver.files["checkpoint_1.pt"]
    assert isinstance(payload["models"], list)
    assert_same_state(payload["models"][1], second.state_dict())
    assert payload["extra"] == {"counter": {"value": 2}}


@pytest.mark.parametrize(
    ("score", "score_name", "prefix", "transform", "expected"),
    [
        (0.77, None, "", None, "model_0.7700.pt"),
        (-0.77, "loss", "", None, "model_loss=-0.7700.pt"),
        (12345.6789, "acc", "", None, "model_acc=12345.6789.pt"),
        (12, "epoch", "", None, "model_epoch=12.pt"),
        (-3, None, "", None, "model_-3.pt"),
        (0.99991, "acc", "best", lambda engine, event: 12, "best_model_12_acc=0.9999.pt"),
    ],
)
def test_score_text_is_integer_or_four_decimals(score, score_name, prefix, transform, expected):
    saver = MemorySaver()
    checkpoint = Checkpoint(
        {"model": model()},
        saver,
        filename_prefix=prefix,
        score_function=lambda engine: score,
        score_name=score_name,
        global_step_transform=transform,
    )
    checkpoint(make_engine(iteration=99))

    basename = f"{prefix}_model" if prefix else "model"
    assert saver.calls == [(expected, {"basename": basename, "score_name": score_name, "priority": score})]


def test_score_name_alone_ranks_by_the_engine_metric():
    saver = MemorySaver()
    checkpoint = Checkpoint({"model": model()}, saver, score_name="acc", n_saved=2)
    run_scores(checkpoint, [0.5, 0.25, 0.75])

    assert kept(checkpoint) == [(0.5, "model_acc=0.5000.pt"), (0.75, "model_acc=0.7500.pt")]
    assert saver.calls[0][1] == {"basename": "model", "score_name": "acc", "priority": 0.5}


@pytest.mark.parametrize("score", [torch.tensor(0.5), "0.5", None])
def test_score_function_must_return_a_number(score):
    saver = MemorySaver()
    checkpoint = Checkpoint({"model": model()}, saver, score_function=lambda engine: score)
    with pytest.raises(ValueError, match=r"^Output of score_function should be a number$"):
        checkpoint(make_engine(iteration=1))
    assert saver.calls == []
    assert kept(checkpoint) == []


def test_global_step_transform_gets_the_engine_and_its_last_event():
    seen = []

    def transform(engine, event_name):
        seen.append((engine, event_name))
        return 41

    saver, engine = MemorySaver(), make_engine(iteration=3)
    engine.last_event_name = "EPOCH_COMPLETED"
    Checkpoint({"model": model()}, saver, global_step_transform=transform)(engine)

    assert seen == [(engine, "EPOCH_COMPLETED")]
    assert saver.calls == [("model_41.pt", {"basename": "model", "score_name": None, "priority": 41})]


# --------------------------------------------------------------------------------------- filename patterns
@pytest.mark.parametrize("prefix", ["", "pre"])
@pytest.mark.parametrize(
    ("with_score_function", "score_name", "with_transform", "suffix"),
    [
        (False, None, False, "7"),  # engine.state.iteration
        (True, None, False, "0.5000"),
        (True, None, True, "3_0.5000"),
        (True, "acc", True, "3_acc=0.5000"),
        (False, None, True, "3"),
        (True, "acc", False, "acc=0.5000"),
        (False, "acc", False, "acc=0.5000"),  # score_name alone reads metrics["acc"]
        (False, "acc", True, "3_acc=0.5000"),
    ],
)
def test_default_filename_follows_the_pattern_table(prefix, with_score_function, score_name, with_transform, suffix):
    saver = MemorySaver()
    checkpoint = Checkpoint(
        {"model": model()},
        saver,
        filename_prefix=prefix,
        score_function=(lambda engine: 0.5) if with_score_function else None,
        score_name=score_name,
        global_step_transform=(lambda engine, event: 3) if with_transform else None,
    )
    checkpoint(make_engine(iteration=7, metrics={"acc": 0.5}))

    expected = f"{prefix}_model_{suffix}.pt" if prefix else f"model_{suffix}.pt"
    assert saver.saved_names == [expected]


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({}, "{filename_prefix}_{name}_{global_step}_{score_name}={score}.{ext}"),
        ({"with_prefix": False}, "{name}_{global_step}_{score_name}={score}.{ext}"),
        ({"with_score_name": False}, "{filename_prefix}_{name}_{global_step}_{score}.{ext}"),
        ({"with_global_step": False}, "{filename_prefix}_{name}_{score_name}={score}.{ext}"),
        ({"with_global_step": False, "with_score_name": False}, "{filename_prefix}_{name}_{score}.{ext}"),
        ({"with_score": False, "with_score_name": False}, "{filename_prefix}_{name}_{global_step}.{ext}"),
        ({"with_prefix": False, "with_score": False, "with_score_name": False}, "{name}_{global_step}.{ext}"),
        ({"with_prefix": False, "with_score_name": False}, "{name}_{global_step}_{score}.{ext}"),
    ],
)
def test_setup_filename_pattern_builds_the_documented_patterns(flags, expected):
    assert Checkpoint.setup_filename_pattern(**flags) == expected


@pytest.mark.parametrize("with_score_name", [True, False])
def test_setup_filename_pattern_needs_a_score_or_a_step(with_score_name):
    with pytest.raises(ValueError, match="At least one of with_score and with_global_step should be True"):
        Checkpoint.setup_filename_pattern(with_score=False, with_global_step=False, with_score_name=with_score_name)


def test_setup_filename_pattern_refuses_a_score_name_without_a_score():
    with pytest.raises(ValueError, match="If with_score_name is True, with_score should be also True"):
        Checkpoint.setup_filename_pattern(with_score=False, with_score_name=True, with_global_step=True)


def test_custom_filename_pattern_renders_every_field():
    saver = MemorySaver()
    checkpoint = Checkpoint(
        {"model": model(), "optimizer": Stateful()},
        saver,
        score_function=lambda engine: 94,
        global_step_transform=lambda engine, event: 30000,
        filename_pattern="{global_step}-{name}-{score}.pt",
    )
    checkpoint(make_engine(iteration=1))
    assert saver.saved_names == ["30000-checkpoint-94.pt"]

    other = MemorySaver()
    pattern = "{filename_prefix}|{name}|{global_step}|{score_name}|{score}.{ext}"
    Checkpoint({"model": model()}, other, filename_pattern=pattern)(make_engine(iteration=5))
    assert other.saved_names == ["|model|5|None|None.pt"]  # missing values render as None


def test_custom_filename_pattern_with_unknown_field_raises_key_error_and_saves_nothing():
    saver = MemorySaver()
    checkpoint = Checkpoint({"model": model()}, saver, filename_pattern="{name}_{epoch}.pt")
    with pytest.raises(KeyError, match="epoch"):
        checkpoint(make_engine(iteration=1))
    assert saver.calls == []
    assert kept(checkpoint) == []


# ---------------------------------------------------------------------------------------- retention over a run
def test_last_k_keeps_the_newest_steps_and_removes_older_ones_in_order():
    saver = MemorySaver()
    checkpoint = Checkpoint({"model": model()}, saver, n_saved=2)
    for iteration in range(1, 6):
        checkpoint(make_engine(iteration=iteration))

    assert saver.saved_names == [f"model_{i}.pt" for i in range(1, 6)]
    assert saver.removed == ["model_1.pt", "model_2.pt", "model_3.pt"]
    assert kept(checkpoint) == [(4, "model_4.pt"), (5, "model_5.pt")]
    assert sorted(saver.files) == ["model_4.pt", "model_5.pt"]


def test_best_k_keeps_the_highest_scores_and_skips_worse_ones():
    saver = MemorySaver()
    checkpoint = Checkpoint(
        {"model": model()}, saver, score_name="acc", n_saved=2, global_step_transform=epoch_of, filename_prefix="best"
    )
    run_scores(checkpoint, [0.5, 0.9, 0.3, 0.7, 0.95, 0.6])

    # 0.3 (epoch 3) and 0.6 (epoch 6) never beat the lowest kept score: skipped without a call.
    assert saver.saved_names == [
        "best_model_1_acc=0.5000.pt",
        "best_model_2_acc=0.9000.pt",
        "best_model_4_acc=0.7000.pt",
        "best_model_5_acc=0.9500.pt",
    ]
    assert saver.removed == ["best_model_1_acc=0.5000.pt", "best_model_4_acc=0.7000.pt"]
    assert kept(checkpoint) == [(0.9, "best_model_2_acc=0.9000.pt"), (0.95, "best_model_5_acc=0.9500.pt")]
    assert sorted(saver.files) == ["best_model_2_acc=0.9000.pt", "best_model_5_acc=0.9500.pt"]


def test_n_saved_none_keeps_everything():
    saver = MemorySaver()
    checkpoint = Checkpoint({"model": model()}, saver, score_name="acc", n_saved=None, global_step_transform=epoch_of)
    run_scores(checkpoint, [0.5, 0.4, 0.3, 0.9, 0.1])

    assert len(saver.calls) == 5
    assert saver.removed == []
    assert [p for p, _ in kept(checkpoint)] == [0.1, 0.3, 0.4, 0.5, 0.9]


def test_each_evicted_file_is_removed_exactly_once():
    saver = MemorySaver()
    checkpoint = Checkpoint({"model": model()}, saver, score_function=scored([0, 1, 1, 2, 3]), n_saved=2)
    for iteration in range(1, 6):
        checkpoint(make_engine(iteration=iteration))

    # the second score 1 re-saves model_1.pt in place: it is neither removed nor counted twice
    assert saver.saved_names == ["model_0.pt", "model_1.pt", "model_1.pt", "model_2.pt", "model_3.pt"]
    assert saver.removed == ["model_0.pt", "model_1.pt"]
    assert kept(checkpoint) == [(2, "model_2.pt"), (3, "model_3.pt")]


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("n_saved", [1, 3])
def test_random_runs_keep_the_top_scores_and_remove_nothing_twice(seed, n_saved):
    rng = random.Random(seed)
    scores = [rng.choice([0.1, 0.2, 0.3, 0.4, 0.5, rng.random()]) for _ in range(30)]
    saver = MemorySaver()
    checkpoint = Checkpoint(
        {"model": model()}, saver, score_name="acc", n_saved=n_saved, global_step_transform=epoch_of
    )
    run_scores(checkpoint, scores)

    names = [f for _, f in kept(checkpoint)]
    assert sorted(saver.files) == sorted(names)  # stored == kept
    assert sorted(p for p, _ in kept(checkpoint)) == sorted(sorted(scores, reverse=True)[:n_saved])
    assert all(count == 1 for count in Counter(saver.removed).values())
    assert set(saver.removed).isdisjoint(names)


def test_greater_or_equal_lets_a_tie_replace_the_oldest_lowest_checkpoint():
    strict, ties = MemorySaver(), MemorySaver()
    run_scores(
        Checkpoint({"m": model()}, strict, score_name="acc", n_saved=2, global_step_transform=epoch_of), [1.0, 1.0, 1.0]
    )
    checkpoint = Checkpoint(
        {"m": model()}, ties, score_name="acc", n_saved=2, global_step_transform=epoch_of, greater_or_equal=True
    )
    run_scores(checkpoint, [1.0, 1.0, 1.0])

    assert strict.saved_names == ["m_1_acc=1.0000.pt", "m_2_acc=1.0000.pt"]  # a tie does not beat the lowest
    assert ties.saved_names == ["m_1_acc=1.0000.pt", "m_2_acc=1.0000.pt", "m_3_acc=1.0000.pt"]
    assert ties.removed == ["m_1_acc=1.0000.pt"]
    assert kept(checkpoint) == [(1.0, "m_2_acc=1.0000.pt"), (1.0, "m_3_acc=1.0000.pt")]  # ties keep save order


@pytest.mark.parametrize("n_saved", [1, 2])
def test_fixed_filename_is_overwritten_in_place_and_never_removed(n_saved):
    saver = MemorySaver()
    checkpoint = Checkpoint({"counter": Stateful()}, saver, n_saved=n_saved, filename_pattern="{name}.{ext}")
    for iteration in range(1, 4):
        checkpoint.to_save["counter"].value = iteration
        checkpoint(make_engine(iteration=iteration))

    assert saver.saved_names == ["counter.pt"] * 3
    assert saver.removed == []
    assert saver.files == {"counter.pt": {"value": 3}}
    assert kept(checkpoint) == [(3, "counter.pt")]


def test_reset_forgets_the_kept_list_but_deletes_nothing():
    saver = MemorySaver()
    checkpoint = Checkpoint({"model": model()}, saver, n_saved=1)
    checkpoint(make_engine(iteration=10))
    checkpoint.reset()

    assert kept(checkpoint) == []
    assert checkpoint.last_checkpoint is None
    assert list(saver.files) == ["model_10.pt"]

    checkpoint(make_engine(iteration=2))  # a lower step is saved now that the list is empty
    assert saver.removed == []
    assert sorted(saver.files) == ["model_10.pt", "model_2.pt"]
    assert kept(checkpoint) == [(2, "model_2.pt")]


# --------------------------------------------------------------------------------------------- include_self
def test_include_self_payload_lists_the_new_file():
    saver = MemorySaver()
    to_save = {"model": model(), "counter": Stateful()}
    checkpoint = Checkpoint(to_save, saver, n_saved=2, include_self=True)
    for iteration in (1, 2, 3):
        checkpoint(make_engine(iteration=iteration))

    assert [(filename, payload["checkpointer"]) for filename, payload in saver.history] == [
        ("checkpoint_1.pt", {"_saved": [(1, "checkpoint_1.pt")]}),
        ("checkpoint_2.pt", {"_saved": [(1, "checkpoint_1.pt"), (2, "checkpoint_2.pt")]}),
        ("checkpoint_3.pt", {"_saved": [(2, "checkpoint_2.pt"), (3, "checkpoint_3.pt")]}),  # after eviction
    ]
    assert "checkpointer" not in to_save  # the user's mapping is not modified


def test_include_self_with_one_object_keeps_the_payload_a_mapping():
    saver, net = MemorySaver(), model()
    Checkpoint({"model": net}, saver, include_self=True)(make_engine(iteration=4))

    payload = saver.files["model_4.pt"]
    assert set(payload) == {"model", "checkpointer"}
    assert payload["checkpointer"] == {"_saved": [(4, "model_4.pt")]}
    assert_same_state(payload["model"], net.state_dict())


# --------------------------------------------------------------------------------------- state and helpers
def test_state_dict_round_trip_carries_the_kept_list_to_a_new_checkpoint():
    first = Checkpoint({"model": model()}, MemorySaver(), score_name="acc", n_saved=2)
    run_scores(first, [0.5, 0.8])

    saver = MemorySaver()
    second = Checkpoint({"model": model()}, saver, score_name="acc", n_saved=2)
    second.load_state_dict(first.state_dict())
    assert (
        second.state_dict()
        == first.state_dict()
        == {"_saved": [(0.5, "model_acc=0.5000.pt"), (0.8, "model_acc=0.8000.pt")]}
    )

    run_scores(second, [0.6])
    assert saver.removed == ["model_acc=0.5000.pt"]  # pruned a file the first checkpoint wrote


def test_load_state_dict_validates_its_argument():
    checkpoint = Checkpoint({"model": model()}, MemorySaver())
    with pytest.raises(TypeError, match="Argument state_dict should be a dictionary, but given <class 'list'>"):
        checkpoint.load_state_dict([(1, "model_1.pt")])
    with pytest.raises(ValueError, match="Required state attribute '_saved' is absent"):
        checkpoint.load_state_dict({"saved": []})


def test_load_state_dict_sorts_the_kept_list_by_priority():
    """ckptcloud: a hand-edited or merged kept list is sorted, so eviction still takes the lowest."""
    saver = MemorySaver()
    checkpoint = Checkpoint({"model": model()}, saver, score_name="acc", n_saved=3)
    checkpoint.load_state_dict({"_saved": [(0.9, "b.pt"), (0.1, "a.pt"), (0.5, "c.pt")]})

    assert kept(checkpoint) == [(0.1, "a.pt"), (0.5, "c.pt"), (0.9, "b.pt")]
    assert checkpoint.last_checkpoint == "b.pt"
    run_scores(checkpoint, [0.3])
    assert saver.removed == ["a.pt"]


def test_last_checkpoint_is_the_highest_priority_not_the_newest():
    checkpoint = Checkpoint({"model": model()}, MemorySaver(), score_name="acc", n_saved=2)
    assert checkpoint.last_checkpoint is None
    run_scores(checkpoint, [0.9, 0.5])
    assert checkpoint.last_checkpoint == "model_acc=0.9000.pt"


def test_last_checkpoint_is_a_path_into_the_disk_saver_folder(tmp_path):
    checkpoint = Checkpoint({"model": model()}, DiskSaver(tmp_path), n_saved=2)
    checkpoint(make_engine(iteration=5))
    checkpoint(make_engine(iteration=6))

    assert isinstance(checkpoint.last_checkpoint, Path)
    assert checkpoint.last_checkpoint == tmp_path / "model_6.pt"
    assert checkpoint.last_checkpoint.is_file()


def test_default_score_fn_reads_the_metric_with_its_sign():
    engine = make_engine(metrics={"loss": 0.25, "acc": 0.75})
    assert Checkpoint.get_default_score_fn("acc")(engine) == 0.75
    assert Checkpoint.get_default_score_fn("loss", -1)(engine) == -0.25
    assert Checkpoint.get_default_score_fn("loss", score_sign=1.0)(engine) == 0.25


@pytest.mark.parametrize("score_sign", [0, 0.5, 2, -2])
def test_default_score_fn_accepts_only_sign_one_or_minus_one(score_sign):
    with pytest.raises(ValueError, match="score_sign should be 1 or -1"):
        Checkpoint.get_default_score_fn("acc", score_sign)


# ---------------------------------------------------------------------------------- ckptcloud: write, then evict
def test_new_checkpoint_is_written_before_the_evicted_one_is_removed():
    saver = MemorySaver()
    checkpoint = Checkpoint({"model": model()}, saver, n_saved=1)
    checkpoint(make_engine(iteration=1))
    checkpoint(make_engine(iteration=2))
    assert saver.events == [("save", "model_1.pt"), ("save", "model_2.pt"), ("remove", "model_1.pt")]


@pytest.mark.parametrize("include_self", [False, True])
def test_failed_save_leaves_kept_list_and_files_untouched(include_self):
    saver = MemorySaver()
    checkpoint = Checkpoint({"counter": Stateful(1)}, saver, n_saved=1, include_self=include_self)
    checkpoint(make_engine(iteration=1))
    before_files, before_kept = dict(saver.files), kept(checkpoint)

    saver.fail_with = OSError("disk full")
    checkpoint.to_save["counter"].value = 2
    with pytest.raises(OSError, match="disk full"):
        checkpoint(make_engine(iteration=2))

    assert kept(checkpoint) == before_kept == [(1, "counter_1.pt")]
    assert saver.files == before_files
    assert saver.removed == []
    assert checkpoint.last_checkpoint == "counter_1.pt"

    saver.fail_with = None  # the next good save evicts normally
    checkpoint(make_engine(iteration=3))
    assert saver.removed == ["counter_1.pt"]
    assert kept(checkpoint) == [(3, "counter_3.pt")]


def test_failed_resave_of_the_same_filename_keeps_the_old_entry():
    saver = MemorySaver()
    checkpoint = Checkpoint({"counter": Stateful()}, saver, n_saved=2, filename_pattern="{name}.{ext}")
    checkpoint(make_engine(iteration=1))
    saver.fail_with = RuntimeError("network down")
    with pytest.raises(RuntimeError, match="network down"):
        checkpoint(make_engine(iteration=2))
    assert kept(checkpoint) == [(1, "counter.pt")]
    assert saver.files == {"counter.pt": {"value": 0}}
    assert saver.removed == []


def test_failed_removal_warns_and_keeps_the_new_checkpoint():
    class BrokenRemove(MemorySaver):
        def remove(self, filename):
            super().remove(filename)
            raise PermissionError("access denied")

    saver = BrokenRemove()
    checkpoint = Checkpoint({"model": model()}, saver, n_saved=1)
    checkpoint(make_engine(iteration=1))
    with pytest.warns(RuntimeWarning, match="could not remove evicted checkpoint 'model_1.pt'"):
        checkpoint(make_engine(iteration=2))
    assert kept(checkpoint) == [(2, "model_2.pt")]
    assert "model_2.pt" in saver.files


# ------------------------------------------------------------------------------ ckptcloud: no double calls
def test_type_error_inside_a_handler_runs_the_save_once():
    calls = []

    def handler(checkpoint, filename, metadata):
        calls.append(filename)
        raise TypeError("bug inside the save")

    checkpoint = Checkpoint({"model": model()}, handler)
    with pytest.raises(TypeError, match="bug inside the save"):
        checkpoint(make_engine(iteration=1))
    assert calls == ["model_1.pt"]
    assert kept(checkpoint) == []


def test_type_error_inside_a_save_handler_object_runs_the_save_once():
    saver = MemorySaver()
    saver.fail_with = TypeError("bug inside the save")
    with pytest.raises(TypeError, match="bug inside the save"):
        Checkpoint({"model": model()}, saver)(make_engine(iteration=1))
    assert saver.saved_names == ["model_1.pt"]


def test_two_argument_function_handler_gets_no_metadata():
    calls = []

    def handler(checkpoint, filename):
        calls.append((sorted(checkpoint), filename))

    checkpoint = Checkpoint({"model": model()}, handler, n_saved=1)
    checkpoint(make_engine(iteration=1))
    checkpoint(make_engine(iteration=2))  # no remove() on a plain function: eviction is bookkeeping only
    assert calls == [(["bias", "weight"], "model_1.pt"), (["bias", "weight"], "model_2.pt")]
    assert kept(checkpoint) == [(2, "model_2.pt")]


@pytest.mark.parametrize(
    "make_handler",
    [
        lambda calls: lambda checkpoint, filename, metadata=None: calls.append(metadata),
        lambda calls: lambda checkpoint, filename, meta: calls.append(meta),
        lambda calls: lambda *args: calls.append(args[2]),
    ],
    ids=["metadata-default", "third-positional", "varargs"],
)
def test_handler_that_accepts_a_third_argument_gets_metadata(make_handler):
    calls = []
    Checkpoint({"model": model()}, make_handler(calls))(make_engine(iteration=3))
    assert calls == [{"basename": "model", "score_name": None, "priority": 3}]


def test_handler_with_keyword_only_metadata_gets_it():
    # Library bug: `_accepts_metadata` sees the name `metadata` and the handler is then called with metadata as a
    # third *positional* argument, so this raises TypeError (ignite's fallback would have run it).
    calls = []

    def handler(checkpoint, filename, *, metadata=None):
        calls.append((filename, metadata))

    Checkpoint({"model": model()}, handler)(make_engine(iteration=3))
    assert calls == [("model_3.pt", {"basename": "model", "score_name": None, "priority": 3})]


def test_save_handler_subclass_with_two_argument_call_is_called_without_metadata():
    # Library bug: `_accepts_metadata` trusts every BaseSaveHandler to take metadata without reading its signature;
    # ignite 0.5.5 runs such a (pre-0.4.2 style) handler through its TypeError fallback.
    class OldStyleSaver(BaseSaveHandler):
        def __init__(self):
            self.saved = []

        def __call__(self, checkpoint, filename):
            self.saved.append(filename)

        def remove(self, filename):
            pass

    saver = OldStyleSaver()
    Checkpoint({"model": model()}, saver)(make_engine(iteration=3))
    assert saver.saved == ["model_3.pt"]


# ------------------------------------------------------------------------------------- ckptcloud: NaN scores
def test_nan_score_is_never_kept_and_does_not_block_later_saves():
    saver = MemorySaver()
    checkpoint = Checkpoint({"model": model()}, saver, score_name="acc", n_saved=2, global_step_transform=epoch_of)
    with pytest.warns(RuntimeWarning, match="NaN"):
        run_scores(checkpoint, [float("nan"), 0.5, float("nan"), 0.7, 0.9])

    assert saver.saved_names == ["model_2_acc=0.5000.pt", "model_4_acc=0.7000.pt", "model_5_acc=0.9000.pt"]
    assert kept(checkpoint) == [(0.7, "model_4_acc=0.7000.pt"), (0.9, "model_5_acc=0.9000.pt")]


def test_nan_score_evicts_nothing():
    saver = MemorySaver()
    checkpoint = Checkpoint({"model": model()}, saver, score_name="acc", n_saved=1)
    run_scores(checkpoint, [0.5])
    with pytest.warns(RuntimeWarning):
        run_scores(checkpoint, [float("nan")])
    assert saver.saved_names == ["model_acc=0.5000.pt"]
    assert saver.removed == []
    assert kept(checkpoint) == [(0.5, "model_acc=0.5000.pt")]


def test_nan_score_warns_only_once():
    checkpoint = Checkpoint({"model": model()}, MemorySaver(), score_name="acc", n_saved=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_scores(checkpoint, [float("nan"), 0.5, float("nan")])
        assert checkpoint.save(score=float("nan")) is None
    assert [w.category for w in caught] == [RuntimeWarning]
    assert kept(checkpoint) == [(0.5, "model_acc=0.5000.pt")]


# ----------------------------------------------------------------------------------------- plain-loop save()
def test_save_returns_the_filename_or_none_when_skipped():
    saver = MemorySaver()
    checkpoint = Checkpoint({"model": model()}, saver, n_saved=2, score_name="val_acc")
    results = [checkpoint.save(global_step=epoch, score=acc) for epoch, acc in enumerate([0.5, 0.9, 0.7, 0.6], 1)]

    assert results == ["model_1_val_acc=0.5000.pt", "model_2_val_acc=0.9000.pt", "model_3_val_acc=0.7000.pt", None]
    assert saver.removed == ["model_1_val_acc=0.5000.pt"]
    assert saver.calls[1] == (
        "model_2_val_acc=0.9000.pt",
        {"basename": "model", "score_name": "val_acc", "priority": 0.9},
    )
    assert checkpoint.last_checkpoint == "model_2_val_acc=0.9000.pt"


def test_save_with_a_step_only_keeps_the_last_steps():
    saver = MemorySaver()
    checkpoint = Checkpoint({"model": model()}, saver, n_saved=1, filename_prefix="last")
    assert [checkpoint.save(global_step=step) for step in (10, 20)] == ["last_model_10.pt", "last_model_20.pt"]
    assert saver.removed == ["last_model_10.pt"]
    assert saver.calls[1][1] == {"basename": "last_model", "score_name": None, "priority": 20}


def test_save_with_a_score_only_names_the_file_by_the_score():
    checkpoint = Checkpoint({"model": model()}, MemorySaver(), score_name="loss")
    assert checkpoint.save(score=-0.77) == "model_loss=-0.7700.pt"
    assert Checkpoint({"model": model()}, MemorySaver()).save(score=3) == "model_3.pt"


def test_save_needs_a_step_or_a_score():
    saver = MemorySaver()
    with pytest.raises(ValueError, match="Pass `global_step=` or `score=`"):
        Checkpoint({"model": model()}, saver).save()
    assert saver.calls == []


def test_save_needs_a_score_when_the_checkpoint_ranks_by_score():
    saver = MemorySaver()
    for checkpoint in (
        Checkpoint({"model": model()}, saver, score_name="acc"),
        Checkpoint({"model": model()}, saver, score_function=lambda engine: 1.0),
    ):
        with pytest.raises(ValueError, match="pass `score=` to save"):
            checkpoint.save(global_step=3)
    assert saver.calls == []


@pytest.mark.parametrize("score", [torch.tensor(0.5), "0.5"])
def test_save_refuses_a_score_that_is_not_a_number(score):
    with pytest.raises(ValueError, match=r"Argument `score` should be a number \(use tensor.item\(\)\), but given"):
        Checkpoint({"model": model()}, MemorySaver(), score_name="acc").save(score=score)


def test_save_failure_propagates_and_changes_nothing():
    saver = MemorySaver()
    checkpoint = Checkpoint({"model": model()}, saver, n_saved=1)
    checkpoint.save(global_step=1)
    saver.fail_with = ConnectionError("reset by peer")
    with pytest.raises(ConnectionError):
        checkpoint.save(global_step=2)
    assert kept(checkpoint) == [(1, "model_1.pt")]
    assert list(saver.files) == ["model_1.pt"]
    assert saver.removed == []


# ------------------------------------------------------------------------------------------------ load_objects
def test_data_parallel_is_unwrapped_on_save_and_on_load():
    source = model()
    saver = MemorySaver()
    Checkpoint({"model": torch.nn.DataParallel(source)}, saver)(make_engine(iteration=1))
    payload = saver.files["model_1.pt"]
    assert sorted(payload) == ["bias", "weight"]  # no "module." prefix

    target = torch.nn.DataParallel(torch.nn.Linear(3, 2))
    Checkpoint.load_objects({"model": target}, {"model": payload})
    assert_same_state(target.module.state_dict(), source.state_dict())


def test_load_objects_forwards_kwargs_to_modules_only():
    source, target, counter = model(), torch.nn.Linear(3, 2), Stateful()
    partial = {"model": {"weight": source.weight.detach().clone()}, "counter": {"value": 7}}

    with pytest.raises(RuntimeError, match="bias"):
        Checkpoint.load_objects({"model": target, "counter": counter}, partial)
    Checkpoint.load_objects({"model": target, "counter": counter}, partial, strict=False)
    assert torch.equal(target.weight, source.weight)
    assert counter.value == 7  # Stateful.load_state_dict takes no `strict`: it was not passed on


def test_single_object_loads_from_a_checkpoint_that_is_its_own_state():
    source, target = model(), torch.nn.Linear(3, 2)
    Checkpoint.load_objects({"model": target}, source.state_dict())
    assert_same_state(target.state_dict(), source.state_dict())

    other = torch.nn.Linear(3, 2)
    Checkpoint.load_objects({"model": other}, {"model": source.state_dict(), "extra": 1})
    assert_same_state(other.state_dict(), source.state_dict())


def test_load_objects_missing_key_raises_value_error_naming_it():
    with pytest.raises(ValueError, match="'counter'"):
        Checkpoint.load_objects({"model": model(), "counter": Stateful()}, {"model": model().state_dict()})


def test_load_objects_restores_nested_objects():
    first, second, counter = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2), Stateful()
    source = model()
    state = {"models": [source.state_dict(), source.state_dict()], "extra": {"counter": {"value": 9}}}
    Checkpoint.load_objects({"models": [first, second], "extra": {"counter": counter}}, state)
    assert_same_state(second.state_dict(), source.state_dict())
    assert counter.value == 9


@pytest.mark.parametrize("checkpoint", [42, [{"weight": 1}], None])
def test_load_objects_refuses_a_checkpoint_that_is_not_a_mapping_or_path(checkpoint):
    with pytest.raises(TypeError, match="Argument checkpoint should be a string or a dictionary"):
        Checkpoint.load_objects({"model": model()}, checkpoint)


def test_load_objects_refuses_objects_without_load_state_dict():
    with pytest.raises(TypeError, match="should have `load_state_dict` method"):
        Checkpoint.load_objects({"model": model(), "bad": NoState()}, {"model": {}, "bad": {}})


@pytest.mark.parametrize("as_str", [True, False])
def test_load_objects_reads_a_file_path(tmp_path, as_str):
    source = model()
    path = tmp_path / "checkpoint_1.pt"
    torch.save({"model": source.state_dict(), "counter": {"value": 4}}, path)

    target, counter = torch.nn.Linear(3, 2), Stateful()
    Checkpoint.load_objects({"model": target, "counter": counter}, str(path) if as_str else path)
    assert_same_state(target.state_dict(), source.state_dict())
    assert counter.value == 4


def test_load_objects_reads_a_file_url(tmp_path):
    source, target = model(), torch.nn.Linear(3, 2)
    path = tmp_path / "model_1.pt"
    torch.save(source.state_dict(), path)
    Checkpoint.load_objects({"model": target}, path.as_uri())
    assert_same_state(target.state_dict(), source.state_dict())


def test_load_objects_from_a_file_refuses_arbitrary_objects_unless_weights_only_is_false(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"counter": Stateful(3)}, path)  # a pickled object, not a state dict
    target = Stateful()
    with pytest.raises(ValueError, match="weights_only=True"):
        Checkpoint.load_objects({"counter": target}, path)
    assert target.value == 0

    torch.save({"counter": {"value": 3}}, path)
    Checkpoint.load_objects({"counter": target}, path, weights_only=False)
    assert target.value == 3
