"""Retention policies (``ckptcloud.policies``) and ``Checkpoint(keep=...)``.

The property tests compare against brute-force references written independently of the policies: counting what
beats each checkpoint instead of sorting, and, for ``EveryNSeconds``, searching every subset for the earliest
maximal one with gaps of at least the interval. Sequences come from seeded generators, so every run is the same.
"""

from __future__ import annotations

import inspect
import itertools
import random
import re
import warnings
from datetime import timedelta
from urllib.parse import unquote

import pytest
import torch

from ckptcloud import Checkpoint, DiskSaver, _retention
from ckptcloud.policies import (
    AnyOf,
    BestN,
    CheckpointInfo,
    EveryNSeconds,
    EveryNSteps,
    KeepSince,
    KeepSteps,
    LatestN,
    Policy,
)
from ckptcloud.remote import RemoteSaver, _object_metadata
from ckptcloud.retry import NO_RETRY
from ckptcloud.stores.base import MiB
from ckptcloud.stores.memory import MemoryStore
from tests.unit.fakes import MemorySaver, kept, model

NOW = 1_000_000.0


# ----------------------------------------------------------------------------------- brute-force references
def tie_key(c: CheckpointInfo) -> tuple:
    return (c.time is not None, c.time or 0.0, c.step is not None, c.step or 0, c.name)


def ref_best(n, infos):
    ranked = [c for c in infos if c.priority is not None]
    beats = lambda a, b: (a.priority, tie_key(a)) > (b.priority, tie_key(b))  # noqa: E731
    return {c.name for c in ranked if sum(beats(o, c) for o in ranked) < n}


def ref_latest(n, infos):
    key = lambda c: (c.step is not None, c.step or 0, tie_key(c))  # noqa: E731
    return {c.name for c in infos if sum(key(o) > key(c) for o in infos) < n}


def ref_every_seconds(s, infos):
    timed = sorted((c for c in infos if c.time is not None), key=tie_key)
    best: tuple = ()
    for size in range(len(timed), 0, -1):  # the most checkpoints with gaps >= s, the earliest such choice
        valid = [
            idx
            for idx in itertools.combinations(range(len(timed)), size)
            if idx[0] == 0 and all(timed[b].time - timed[a].time >= s for a, b in itertools.pairwise(idx))
        ]
        if valid:
            best = min(valid)
            break
    return {timed[i].name for i in best}


def reference(parts, infos, now=NOW):
    kept_names: set[str] = set()
    for kind, arg in parts:
        if kind == "best":
            kept_names |= ref_best(arg, infos)
        elif kind == "latest":
            kept_names |= ref_latest(arg, infos)
        elif kind == "steps":
            kept_names |= {c.name for c in infos if c.step is not None and c.step % arg == 0}
        elif kind == "seconds":
            kept_names |= ref_every_seconds(arg, infos)
        elif kind == "since":
            kept_names |= {c.name for c in infos if c.time is not None and c.time >= now - arg}
        elif kind == "at":
            kept_names |= {c.name for c in infos if c.step in arg}
    return kept_names


def build(parts, now=NOW) -> Policy:
    make = {
        "best": BestN,
        "latest": LatestN,
        "steps": EveryNSteps,
        "seconds": EveryNSeconds,
        "since": lambda s: KeepSince(timedelta(seconds=s), now=lambda: now),
        "at": KeepSteps,
    }
    policies = [make[kind](arg) for kind, arg in parts]
    return policies[0] if len(policies) == 1 else AnyOf(*policies)


def random_parts(rng: random.Random) -> list[tuple[str, object]]:
    choices = [
        ("best", rng.randint(1, 3)),
        ("latest", rng.randint(1, 3)),
        ("steps", rng.choice([2, 3, 5])),
        ("seconds", rng.choice([10, 25, 60])),
        ("since", rng.choice([0, 30, 100])),
        ("at", frozenset(rng.sample(range(1, 40), 3))),
    ]
    return rng.sample(choices, rng.randint(1, 3))


def random_run(rng: random.Random, size: int, *, scored: bool = True) -> list[CheckpointInfo]:
    """Checkpoints in save order: increasing steps, non-decreasing save times (ties included), scores with ties."""
    infos, step, time = [], 0, NOW - 200
    for _ in range(size):
        step += rng.randint(1, 4)
        time += rng.choice([0, 1, 5, 12, 30])
        score = rng.choice([0.1, 0.5, 0.5, 0.7, 0.9]) if scored else None
        name = f"model_{step}_acc={score:.4f}.pt" if scored else f"model_{step}.pt"
        infos.append(CheckpointInfo(name, step=step, time=time, score=score))
    return infos


# ------------------------------------------------------------------------------------------- the policies
def test_each_policy_keeps_what_its_definition_says():
    infos = [
        CheckpointInfo("a.pt", step=1000, time=0.0, score=0.5),
        CheckpointInfo("b.pt", step=1500, time=1800.0, score=0.9),
        CheckpointInfo("c.pt", step=2000, time=3600.0, score=0.9),
        CheckpointInfo("d.pt", step=2500, time=4000.0, score=0.1),
    ]
    assert BestN(1)(infos) == {"c.pt"}  # a tie on the score: the newer is kept
    assert BestN(2)(infos) == {"b.pt", "c.pt"}
    assert LatestN(1)(infos) == {"d.pt"}
    assert EveryNSteps(1000)(infos) == {"a.pt", "c.pt"}
    assert EveryNSeconds(3600)(infos) == {"a.pt", "c.pt"}
    assert EveryNSeconds(timedelta(minutes=30))(infos) == {"a.pt", "b.pt", "c.pt"}
    assert KeepSince(timedelta(seconds=400), now=lambda: 4100.0)(infos) == {"d.pt"}
    assert KeepSteps({1500, 7})(infos) == {"b.pt"}
    assert (BestN(1) | LatestN(1) | EveryNSteps(1000))(infos) == {"a.pt", "c.pt", "d.pt"}


def test_checkpoints_without_the_field_a_policy_reads_are_not_kept_by_it():
    bare = [CheckpointInfo("x.pt"), CheckpointInfo("y.pt", step=4)]
    assert EveryNSeconds(10)(bare) == set() and KeepSince(timedelta(0), now=lambda: 0.0)(bare) == set()
    assert EveryNSteps(2)(bare) == {"y.pt"} and KeepSteps({4})(bare) == {"y.pt"}
    assert LatestN(1)(bare) == {"y.pt"}  # without a step a checkpoint ranks below every one with a step
    assert BestN(2)([CheckpointInfo("x.pt"), CheckpointInfo("y.pt", step=4)]) == {"y.pt"}  # no priority: not ranked


def test_priority_is_the_score_else_the_step():
    assert CheckpointInfo("m.pt", step=3, score=0.25).priority == 0.25
    assert CheckpointInfo("m.pt", step=3).priority == 3
    assert CheckpointInfo("m.pt", step=3, score=0.25, priority=-1.0).priority == -1.0


@pytest.mark.parametrize(
    ("policy", "text"),
    [
        (BestN(3) | LatestN(1), "BestN(3) | LatestN(1)"),
        (BestN(3) | LatestN(1) | EveryNSteps(10_000), "BestN(3) | LatestN(1) | EveryNSteps(10000)"),
        (EveryNSeconds(3600), "EveryNSeconds(3600)"),
        (EveryNSeconds(timedelta(minutes=90)), "EveryNSeconds(5400)"),
        (KeepSince(timedelta(days=1)), "KeepSince(datetime.timedelta(days=1))"),
        (KeepSteps([5000, 1000, 1000]), "KeepSteps({1000, 5000})"),
        (AnyOf(BestN(1) | LatestN(2), EveryNSteps(5)), "BestN(1) | LatestN(2) | EveryNSteps(5)"),
    ],
)
def test_policies_read_back_as_they_are_written(policy, text):
    assert repr(policy) == text


def test_policies_compare_by_value():
    assert BestN(3) | LatestN(1) == BestN(3) | LatestN(1)
    assert BestN(3) != BestN(2) and BestN(3) != LatestN(3)
    assert len({BestN(3), BestN(3), KeepSteps({1, 2}), KeepSteps([2, 1])}) == 2


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: BestN(0), r"BestN: argument `n` should be an integer >= 1, but given 0"),
        (lambda: BestN(2.0), r"BestN: argument `n` should be an integer >= 1, but given 2.0"),
        (lambda: BestN(True), r"BestN: argument `n` should be an integer >= 1, but given True"),
        (lambda: LatestN(-1), r"LatestN: argument `n` should be an integer >= 1, but given -1"),
        (lambda: EveryNSteps("10"), r"EveryNSteps: argument `k` should be an integer >= 1, but given '10'"),
        (lambda: EveryNSeconds(0), r"EveryNSeconds: argument `seconds` should be .* > 0, but given 0"),
        (lambda: EveryNSeconds(float("nan")), r"EveryNSeconds: argument `seconds` .* given nan"),
        (lambda: KeepSince(timedelta(seconds=-1)), r"KeepSince: argument `window` should be .* >= 0"),
        (lambda: KeepSince("1d"), r"KeepSince: argument `window` .* but given '1d'"),
        (lambda: KeepSteps(set()), r"KeepSteps: argument `steps` should name at least one step"),
    ],
)
def test_bad_policy_arguments_name_the_argument_the_expectation_and_the_value(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: KeepSteps(5), r"KeepSteps: argument `steps` should be a set of integers, but given 5"),
        (lambda: KeepSteps({1.5}), r"KeepSteps: argument `steps` should hold integers only, but given 1.5"),
        (lambda: KeepSince(timedelta(0), now=3.0), r"KeepSince: argument `now` should be a callable"),
        (lambda: BestN(1) | 3, r"combine with `\|` only with other policies .* but given int 3"),
        (lambda: "best" | BestN(1), r"combine with `\|` only with other policies .* but given str 'best'"),
        (lambda: CheckpointInfo("m.pt", step=1.5), r"CheckpointInfo `step` should be an int or None, but given 1.5"),
        (lambda: CheckpointInfo("m.pt", time="now"), r"CheckpointInfo `time` should be a real number or None"),
        (lambda: CheckpointInfo(""), r"CheckpointInfo `name` should be a non-empty str"),
        (lambda: BestN(1)([("a.pt", 1)]), r"BestN\(1\): checkpoints should be CheckpointInfo objects"),
    ],
)
def test_bad_policy_inputs_are_type_errors_naming_what_was_given(make, message):
    with pytest.raises(TypeError, match=message):
        make()


def test_two_checkpoints_with_one_name_are_refused():
    with pytest.raises(ValueError, match=r"checkpoint names should be distinct, but 'a.pt' appears twice"):
        LatestN(1)([CheckpointInfo("a.pt", step=1), CheckpointInfo("a.pt", step=2)])


def test_every_n_seconds_reference_is_the_definition():
    """Spot checks of the brute-force reference itself, so that the property test compares against the spec."""
    infos = [CheckpointInfo(f"m_{t}.pt", step=i, time=t) for i, t in enumerate([0, 5, 9, 10, 19, 20, 31])]
    assert ref_every_seconds(10, infos) == {"m_0.pt", "m_10.pt", "m_20.pt", "m_31.pt"}
    assert EveryNSeconds(10)(infos) == ref_every_seconds(10, infos)


@pytest.mark.parametrize("seed", range(8))
def test_a_combined_policy_keeps_exactly_what_the_brute_force_reference_keeps(seed):
    rng = random.Random(seed)
    for _ in range(60):
        parts = random_parts(rng)
        infos = random_run(rng, rng.randint(1, 9), scored=rng.random() < 0.8)
        rng.shuffle(infos)  # a policy does not depend on the order it is given
        assert build(parts)(infos) == reference(parts, infos), (parts, infos)


# -------------------------------------------------------------------------------------- Checkpoint(keep=...)
def test_keep_replaces_n_saved_and_n_saved_keeps_its_ignite_meaning():
    assert Checkpoint({"model": model()}, MemorySaver()).n_saved == 1
    assert Checkpoint({"model": model()}, MemorySaver(), keep=BestN(2)).keep == BestN(2)
    assert inspect.signature(Checkpoint).parameters["n_saved"].default == 1
    assert repr(inspect.signature(Checkpoint).parameters["n_saved"].default) == "1"
    saver = MemorySaver()
    ckpt = Checkpoint({"model": model()}, saver)  # ignite's default: the one latest
    for step in (1, 2, 3):
        ckpt.save(global_step=step)
    assert kept(ckpt) == [(3, "model_3.pt")] and saver.removed == ["model_1.pt", "model_2.pt"]


@pytest.mark.parametrize("n_saved", [1, 2, None])
def test_n_saved_and_keep_together_is_an_error_even_when_n_saved_is_its_default_value(n_saved):
    with pytest.raises(ValueError, match=rf"Pass either `n_saved` or `keep`, not both: .*\(given n_saved={n_saved}\)"):
        Checkpoint({"model": model()}, MemorySaver(), n_saved=n_saved, keep=BestN(1))


def test_keep_must_be_a_policy():
    with pytest.raises(TypeError, match=r"Argument `keep` should be a retention policy .* but given int 3"):
        Checkpoint({"model": model()}, MemorySaver(), keep=3)


def test_a_save_the_policy_would_not_keep_is_never_uploaded():
    saver = MemorySaver()
    ckpt = Checkpoint({"model": model()}, saver, score_name="acc", keep=BestN(2))
    results = [ckpt.save(global_step=s, score=acc) for s, acc in [(1, 0.5), (2, 0.9), (3, 0.1), (4, 0.7), (5, 0.6)]]
    assert results == ["model_1_acc=0.5000.pt", "model_2_acc=0.9000.pt", None, "model_4_acc=0.7000.pt", None]
    assert saver.saved_names == ["model_1_acc=0.5000.pt", "model_2_acc=0.9000.pt", "model_4_acc=0.7000.pt"]
    assert saver.events[-1] == ("remove", "model_1_acc=0.5000.pt")  # after model_4 was written, not before
    assert sorted(saver.files) == ["model_2_acc=0.9000.pt", "model_4_acc=0.7000.pt"]


def test_a_failed_save_under_a_policy_leaves_every_checkpoint_and_the_kept_list_as_they_were():
    saver = MemorySaver()
    ckpt = Checkpoint({"model": model()}, saver, keep=LatestN(1))
    ckpt.save(global_step=1)
    saver.fail_with = OSError("network gone")
    with pytest.raises(OSError, match="network gone"):
        ckpt.save(global_step=2)
    assert kept(ckpt) == [(1, "model_1.pt")] and sorted(saver.files) == ["model_1.pt"] and saver.removed == []


def run_policy(ckpt, infos):
    for info in infos:
        ckpt.save(global_step=info.step, score=info.score)


@pytest.fixture
def clock(monkeypatch):
    """Save times come from ``clock.times`` (one per save), so policies see known times."""

    class Clock:
        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self) -> float:
            return self.times.pop(0)

    fake = Clock()
    monkeypatch.setattr(_retention, "save_time", fake)
    return fake


@pytest.mark.parametrize("seed", range(6))
def test_checkpoint_keeps_exactly_what_the_policy_keeps_of_everything_saved_and_uploads_nothing_it_drops(seed, clock):
    rng = random.Random(100 + seed)
    for _ in range(6):
        parts = [p for p in random_parts(rng) if p[0] != "since"] or [("latest", 1)]
        infos = random_run(rng, rng.randint(1, 12))
        clock.times = [info.time for info in infos]
        saver = MemorySaver()
        ckpt = Checkpoint({"model": torch.nn.Linear(1, 1)}, saver, score_name="acc", keep=build(parts))
        for i, info in enumerate(infos, start=1):
            wanted = reference(parts, infos[:i])
            name = ckpt.save(global_step=info.step, score=info.score)
            assert (name is not None) == (info.name in wanted)  # the gate: saved exactly when it is kept
            assert {f for _, f in kept(ckpt)} == wanted == set(saver.files), (parts, infos[:i])


def memory_saver(store: MemoryStore, **options) -> RemoteSaver:
    return RemoteSaver(store, "run", part_size=5 * MiB, require_empty=False, **options)


@pytest.mark.parametrize("seed", range(6))
def test_after_restarts_resume_keeps_the_same_checkpoints_as_an_uninterrupted_run(seed, clock):
    rng = random.Random(200 + seed)
    parts = random_parts(rng)
    if not any(kind == "seconds" for kind, _ in parts):
        parts.append(("seconds", 25))  # EveryNSeconds must survive restarts: save times come from object metadata
    infos = random_run(rng, 14)
    restarts = set(rng.sample(range(1, 14), 3))

    def run(stops: set[int]) -> tuple[MemoryStore, Checkpoint]:
        store = MemoryStore("bucket")
        clock.times = [info.time for info in infos]
        make = lambda resume: Checkpoint(  # noqa: E731
            {"model": torch.nn.Linear(1, 1)}, memory_saver(store), score_name="acc", keep=build(parts), resume=resume
        )
        ckpt = make(False)
        for i, info in enumerate(infos):
            if i in stops:
                ckpt = make(True)  # a new process: everything it knows comes from the store
            ckpt.save(global_step=info.step, score=info.score)
        return store, ckpt

    straight_store, straight = run(set())
    store, restarted = run(restarts)
    assert kept(restarted) == kept(straight) and restarted.state_dict() == straight.state_dict()
    assert sorted(store.objects) == sorted(straight_store.objects)
    assert {f for _, f in kept(straight)} == reference(parts, infos)


def test_state_dict_carries_step_time_and_score_so_a_policy_survives_a_round_trip(clock):
    clock.times = [0.0, 20.0, 40.0, 65.0]
    saver = MemorySaver()
    ckpt = Checkpoint({"model": model()}, saver, keep=EveryNSeconds(30) | LatestN(1))
    for step in (1, 2, 3):
        ckpt.save(global_step=step)
    state = ckpt.state_dict()
    assert state["_saved"] == [(1, "model_1.pt"), (3, "model_3.pt")]
    assert state["_records"] == {
        "model_1.pt": {"step": 1, "time": 0.0, "score": None},
        "model_3.pt": {"step": 3, "time": 40.0, "score": None},
    }
    again = Checkpoint({"model": model()}, saver, keep=EveryNSeconds(30) | LatestN(1))
    again.load_state_dict(state)
    assert again.state_dict() == state
    again.save(global_step=4)  # at 65: 30 s after model_3 (40) only by the record's time
    assert kept(again) == [(1, "model_1.pt"), (3, "model_3.pt"), (4, "model_4.pt")]


def test_an_ignite_state_dict_without_records_still_loads_and_its_steps_come_from_the_filenames(clock):
    ckpt = Checkpoint({"model": model()}, MemorySaver(), keep=EveryNSteps(10) | LatestN(1))
    ckpt.load_state_dict({"_saved": [(20, "model_20.pt"), (10, "model_10.pt"), (15, "model_15.pt")]})
    assert kept(ckpt) == [(10, "model_10.pt"), (15, "model_15.pt"), (20, "model_20.pt")]
    clock.times = [100.0]
    ckpt.save(global_step=21)
    assert kept(ckpt) == [(10, "model_10.pt"), (20, "model_20.pt"), (21, "model_21.pt")]
    assert ckpt.state_dict()["_records"]["model_10.pt"] == {"step": 10, "time": None, "score": None}


def test_n_saved_state_dicts_stay_exactly_ignites_format():
    ckpt = Checkpoint({"model": model()}, MemorySaver(), n_saved=2)
    ckpt.save(global_step=1)
    assert ckpt.state_dict() == {"_saved": [(1, "model_1.pt")]}


def test_include_self_stores_the_records_of_the_new_kept_list(clock):
    clock.times = [5.0, 6.0]
    saver = MemorySaver()
    ckpt = Checkpoint({"model": model()}, saver, score_name="acc", keep=BestN(1), include_self=True)
    ckpt.save(global_step=1, score=0.5)
    ckpt.save(global_step=2, score=0.8)
    assert saver.files["model_2_acc=0.8000.pt"]["checkpointer"] == {
        "_saved": [(0.8, "model_2_acc=0.8000.pt")],
        "_records": {"model_2_acc=0.8000.pt": {"step": 2, "time": 6.0, "score": 0.8}},
    }


def test_remote_objects_carry_step_save_time_and_score_as_identifier_keys_and_ascii_values(clock):
    clock.times = [1_733_000_000.25]
    store = MemoryStore("bucket")
    ckpt = Checkpoint({"model": model()}, memory_saver(store), score_name="acc", keep=BestN(1))
    ckpt.save(global_step=7, score=0.123456789)
    (meta,) = [m for _, m, _ in store.objects.values()]
    assert {k: meta[k] for k in ("ckptcloud_step", "ckptcloud_time", "ckptcloud_score")} == {
        "ckptcloud_step": "7",
        "ckptcloud_time": "1733000000.25",
        "ckptcloud_score": "0.123456789",
    }
    assert all(k.isidentifier() for k in meta) and all(v.isascii() for v in meta.values())
    odd = _object_metadata({"basename": "modèle 1", "score_name": "acc/top-1", "priority": 1, "step": 3, "time": 2.5})
    assert all(re.fullmatch(r"[A-Za-z0-9%._~-]*", v) for v in odd.values())
    assert unquote(odd["ckptcloud_basename"]) == "modèle 1" and odd["ckptcloud_step"] == "3"


def test_objects_without_the_new_metadata_fall_back_to_the_filename_and_the_objects_time():
    store = MemoryStore("bucket")
    ckpt = Checkpoint({"model": model()}, memory_saver(store), n_saved=None)
    for step in (10, 20):
        ckpt.save(global_step=step)
    for key, (body, meta, _) in list(store.objects.items()):  # as ckptcloud 0.1.0 stored them
        store.objects[key] = (body, {"ckptcloud_priority": meta["ckptcloud_priority"]}, 1000.0 + len(key))
    resumed = Checkpoint({"model": model()}, memory_saver(store), keep=EveryNSteps(20) | LatestN(1), resume=True)
    assert resumed.state_dict()["_records"] == {"model_20.pt": {"step": 20, "time": 1000.0 + 15, "score": None}}
    assert sorted(store.objects) == ["run/model_20.pt"]


def test_a_folder_resume_takes_save_times_from_the_files_modification_times(tmp_path, clock):
    import os

    clock.times = [0.0, 1.0, 2.0]
    ckpt = Checkpoint({"model": model()}, DiskSaver(tmp_path), keep=LatestN(3))
    for step in (1, 2, 3):
        ckpt.save(global_step=step)
    for step, mtime in [(1, 5000.0), (2, 5030.0), (3, 5100.0)]:
        os.utime(tmp_path / f"model_{step}.pt", (mtime, mtime))
    resumed = Checkpoint({"model": model()}, str(tmp_path), keep=EveryNSeconds(60), resume=True)
    assert kept(resumed) == [(1, "model_1.pt"), (3, "model_3.pt")]
    assert sorted(os.listdir(tmp_path)) == ["model_1.pt", "model_3.pt"]


def test_async_saves_follow_the_policy_and_evict_only_after_the_commit(clock):
    clock.times = [0.0, 1.0, 2.0, 3.0]
    saver = MemorySaver()
    with Checkpoint({"model": model()}, saver, score_name="acc", keep=BestN(1), async_save=True) as ckpt:
        assert ckpt.save(global_step=1, score=0.5) == "model_1_acc=0.5000.pt"
        assert ckpt.save(global_step=2, score=0.2) is None  # decided after the first save is finished
        assert ckpt.save(global_step=3, score=0.9) == "model_3_acc=0.9000.pt"
    assert saver.events == [
        ("save", "model_1_acc=0.5000.pt"),
        ("save", "model_3_acc=0.9000.pt"),
        ("remove", "model_1_acc=0.5000.pt"),
    ]
    assert kept(ckpt) == [(0.9, "model_3_acc=0.9000.pt")]


def test_a_nan_score_is_never_kept_under_a_policy():
    saver = MemorySaver()
    ckpt = Checkpoint({"model": model()}, saver, score_name="acc", keep=LatestN(1))
    ckpt.save(global_step=1, score=0.5)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert ckpt.save(global_step=2, score=float("nan")) is None
    assert kept(ckpt) == [(0.5, "model_1_acc=0.5000.pt")]


def test_the_ranks_follow_the_writers_policy_decision_and_remove_the_same_names(monkeypatch):
    """Two simulated ranks on one key-value store (threads): their clocks differ, the writer's decision holds."""
    import threading

    import torch.distributed as dist

    from ckptcloud import distributed
    from ckptcloud.coordination import Board

    kv, local = dist.HashStore(), threading.local()
    boards = {rank: Board(kv, rank, 2, timeout=10) for rank in (0, 1)}
    monkeypatch.setattr(distributed, "get_rank", lambda: local.rank)

    def board(*, local_only_applies: bool = True):
        return None if local_only_applies and getattr(distributed._local, "only", False) else boards[local.rank]

    monkeypatch.setattr(distributed, "_board", board)
    # the writer saves at 0, 20, 40, 60, 80 s; the follower's clock says 0, 10, 20, 30, 40 s
    monkeypatch.setattr(_retention, "save_time", lambda: {0: 20.0, 1: 10.0}[local.rank] * local.count)
    store, results, errors = MemoryStore("bucket"), {}, []

    def rank(r: int) -> None:
        local.rank, local.count = r, 0
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ckpt = Checkpoint({"model": model()}, memory_saver(store, retry=NO_RETRY), keep=EveryNSeconds(30))
                for step in range(1, 6):
                    ckpt.save(global_step=step)
                    local.count += 1
            results[r] = (kept(ckpt), [str(w.message) for w in caught])
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert results[0] == results[1]
    assert results[0][0] == [(1, "model_1.pt"), (3, "model_3.pt"), (5, "model_5.pt")]  # the writer's times: 0, 40, 80
    assert results[0][1] == []  # the ranks' inputs agreed, only their clocks did not: no warning
    assert sorted(store.objects) == ["run/model_1.pt", "run/model_3.pt", "run/model_5.pt"]
    assert store.requests.count("put") == 3 and store.requests.count("delete") == 0


def test_every_public_policy_class_is_exported_and_every_export_resolves():
    import inspect

    import ckptcloud.policies as policies

    public = {
        name
        for name, obj in vars(policies).items()
        if inspect.isclass(obj) and obj.__module__ == policies.__name__ and not name.startswith("_")
    }
    assert public <= set(policies.__all__)
    assert all(hasattr(policies, name) for name in policies.__all__)
    assert {"BestN", "LatestN", "EveryNSteps", "EveryNSeconds", "KeepSince", "KeepSteps"} <= public
