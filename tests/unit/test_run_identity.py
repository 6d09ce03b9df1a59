"""Run identity: two jobs on one prefix never replace each other's checkpoints unseen (trial 9)."""

from __future__ import annotations

import pytest
import torch

from ckptcloud import Checkpoint
from ckptcloud.errors import RunConflictError
from ckptcloud.remote import RemoteSaver
from ckptcloud.stores.base import MiB
from ckptcloud.stores.memory import MemoryStore


def saver(store: MemoryStore, **options) -> RemoteSaver:
    part_size = MiB if store.limits.min_part_size <= MiB else 5 * MiB
    return RemoteSaver(store, "shared", part_size=part_size, require_empty=False, **options)


def big_model(fill: float) -> torch.nn.Linear:
    model = torch.nn.Linear(1024, 1024)  # 4 MiB: a multipart upload of 1 MiB parts
    with torch.no_grad():
        model.weight.fill_(fill)
    return model


@pytest.mark.parametrize("async_save", [False, True])
def test_interleaved_jobs_never_overwrite_each_other_even_in_multipart_uploads(async_save):
    store = MemoryStore("b", min_part_size=MiB)
    jobs = {fill: Checkpoint({"model": big_model(fill)}, saver(store), n_saved=2, async_save=async_save)
            for fill in (1.0, 2.0)}  # fmt: skip
    failures = []
    for step in range(1, 5):
        for fill, job in jobs.items():
            try:
                job.save(global_step=step)
                job.wait()
            except RunConflictError as err:
                failures.append((fill, step, str(err)))
    assert failures  # the second job was told, instead of silently replacing the first job's files
    owner = {job.run_id: fill for fill, job in jobs.items()}
    for key, (_, meta, _) in store.objects.items():  # every stored file holds the weights of the run it names
        weights = saver(store).load(key.removeprefix("shared/"))["weight"]
        assert torch.all(weights == owner[meta["ckptcloud_run"]])
    for job in jobs.values():  # and what each job believes it kept is its own
        for _, filename in job.state_dict()["_saved"]:
            assert store.objects[f"shared/{filename}"][1]["ckptcloud_run"] == job.run_id


def test_resume_refuses_a_prefix_two_runs_wrote_unless_run_id_picks_one():
    store = MemoryStore("b")
    first = Checkpoint({"model": torch.nn.Linear(2, 2)}, saver(store), n_saved=None)
    second = Checkpoint({"model": torch.nn.Linear(2, 2)}, saver(store), n_saved=None)
    first.save(global_step=1)
    second.save(global_step=2)
    with pytest.raises(ValueError, match=r"holds checkpoints of 2 runs.*run_id="):
        Checkpoint({"model": torch.nn.Linear(2, 2)}, saver(store), n_saved=None, resume=True)
    picked = Checkpoint({"model": torch.nn.Linear(2, 2)}, saver(store), resume=True, run_id=second.run_id)
    assert picked.state_dict() == {"_saved": [(2, "model_2.pt")]}


def test_checkpoints_saved_before_run_ids_existed_are_resumed_and_replaced_as_before():
    store = MemoryStore("b")
    legacy = saver(store)
    legacy({"w": torch.zeros(1)}, "model_1.pt", {"basename": "model", "score_name": None, "priority": 1})
    again = Checkpoint({"model": torch.nn.Linear(2, 2)}, saver(store), n_saved=2, resume=True)
    assert again.state_dict() == {"_saved": [(1, "model_1.pt")]}
    assert again.save(global_step=1) == "model_1.pt"  # no run id on the old file: this run may replace it


def test_run_id_must_be_a_non_empty_string():
    with pytest.raises(ValueError, match="`run_id` should be a non-empty string"):
        Checkpoint({"model": torch.nn.Linear(2, 2)}, saver(MemoryStore("b")), run_id="  ")
