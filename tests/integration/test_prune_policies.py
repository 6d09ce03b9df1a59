"""``ckptcloud prune`` with retention policies (``--keep-best``, ``--keep-latest``, ``--keep-every-steps``,
``--keep-every-seconds``): it keeps what ``Checkpoint(keep=...)`` keeps, refuses to mix with ``--keep``/``--by``,
and never deletes what it cannot rank."""

from __future__ import annotations

import os

import pytest
import torch

from ckptcloud import Checkpoint, _retention
from ckptcloud.cli import main
from ckptcloud.policies import BestN, EveryNSeconds, EveryNSteps, LatestN

RUN = [(1, 0.5), (2, 0.9), (3, 0.1), (4, 0.2), (5, 0.3), (6, 0.95), (7, 0.1), (8, 0.4), (9, 0.2)]


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return code, out.out, out.err


def save_all(url: str, run=RUN, **options) -> Checkpoint:
    ckpt = Checkpoint({"model": torch.nn.Linear(4, 2)}, url, score_name="acc", **options)
    for step, acc in run:
        ckpt.save(global_step=step, score=acc)
    return ckpt


def names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def clock(monkeypatch):
    """Save times 1000, 1010, 1020, ... (one per save), stored in each remote object's metadata."""
    times = iter(range(1000, 100_000, 10))
    monkeypatch.setattr(_retention, "save_time", lambda: float(next(times)))


def test_prune_with_policy_flags_keeps_what_checkpoint_keep_keeps(capsys, tmp_path, clock):
    everything, policy_run = tmp_path / "all", tmp_path / "policy"
    save_all(f"file://{everything}", n_saved=None)
    save_all(f"file://{policy_run}", keep=BestN(2) | LatestN(1) | EveryNSteps(4))
    code, out, err = cli(
        capsys,
        "prune",
        f"file://{everything}",
        "--keep-best",
        "2",
        "--keep-latest",
        "1",
        "--keep-every-steps",
        "4",
        "--yes",
    )
    assert code == 0, err
    assert "policy: BestN(2) | LatestN(1) | EveryNSteps(4)" in out
    assert (
        names(everything)
        == names(policy_run)
        == [
            "model_2_acc=0.9000.pt",
            "model_4_acc=0.2000.pt",
            "model_6_acc=0.9500.pt",
            "model_8_acc=0.4000.pt",
            "model_9_acc=0.2000.pt",
        ]
    )
    assert "keep  model_9_acc=0.2000.pt  (step=9, score=0.2)" in out and "deleted 4 checkpoint(s), kept 5" in out


def test_dry_run_with_policy_flags_deletes_nothing(capsys, tmp_path):
    save_all(f"file://{tmp_path}", n_saved=None)
    before = names(tmp_path)
    code, out, _ = cli(capsys, "prune", f"file://{tmp_path}", "--keep-latest", "2", "--dry-run")
    assert code == 0 and out.count("would delete") == 7 and "nothing deleted (dry run)" in out
    assert names(tmp_path) == before


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--keep", "2", "--keep-best", "1"], "--keep and --by cannot be combined with --keep-best"),
        (["--by", "step", "--keep-latest", "1"], "--keep and --by cannot be combined with --keep-best"),
        ([], "prune needs --keep N (ranked --by score or step), or one or more of --keep-best"),
        (["--by", "step"], "prune needs --keep N"),
        (["--keep-best", "0"], "argument --keep-best: expected an integer >= 1, got '0'"),
        (["--keep-every-steps", "x"], "argument --keep-every-steps: expected an integer >= 1, got 'x'"),
        (["--keep-every-seconds", "-5"], "argument --keep-every-seconds: expected a number of seconds > 0"),
    ],
)
def test_mixing_old_and_new_flags_or_giving_none_is_a_usage_error_that_deletes_nothing(capsys, tmp_path, argv, message):
    save_all(f"file://{tmp_path}", n_saved=None)
    before = names(tmp_path)
    code, _, err = cli(capsys, "prune", f"file://{tmp_path}", *argv, "--yes")
    assert code == 2 and message in err
    assert names(tmp_path) == before


def test_checkpoints_missing_what_the_policy_reads_are_left_alone(capsys, tmp_path):
    save_all(f"file://{tmp_path}", n_saved=None)
    (tmp_path / "model_final.pt").write_bytes(b"no step, no score")
    code, _, err = cli(capsys, "prune", f"file://{tmp_path}", "--keep-latest", "1", "--yes")
    assert code == 0, err
    assert "left alone (no step known): model_final.pt" in err
    assert names(tmp_path) == ["model_9_acc=0.2000.pt", "model_final.pt"]


def test_a_series_without_steps_is_never_pruned_by_step_policies(capsys, tmp_path):
    ckpt = Checkpoint({"model": torch.nn.Linear(4, 2)}, str(tmp_path), n_saved=None, score_name="acc")
    for acc in (0.5, 0.7, 0.9):
        ckpt.save(score=acc)  # model_acc=0.5000.pt, ...: no step in the name, and folders keep no metadata
    code, _, err = cli(capsys, "prune", f"file://{tmp_path}", "--keep-every-steps", "2", "--yes")
    assert code == 0 and "left alone (no step known)" in err
    assert len(names(tmp_path)) == 3
    code, _, err = cli(capsys, "prune", f"file://{tmp_path}", "--keep-best", "1", "--yes")
    assert code == 0, err
    assert names(tmp_path) == ["model_acc=0.9000.pt"]


def test_policy_flags_never_rank_two_series_on_one_scale(capsys, tmp_path):
    save_all(f"file://{tmp_path}", n_saved=None)
    latest = Checkpoint(
        {"model": torch.nn.Linear(4, 2)}, str(tmp_path), n_saved=None, filename_prefix="last", resume=True
    )
    latest.save(global_step=9)
    before = names(tmp_path)
    code, _, err = cli(capsys, "prune", f"file://{tmp_path}", "--keep-latest", "1", "--yes")
    assert code == 2 and "2 series" in err and "--series" in err
    assert names(tmp_path) == before
    code, _, err = cli(capsys, "prune", f"file://{tmp_path}", "--keep-latest", "1", "--series", "model", "--yes")
    assert code == 0, err
    assert names(tmp_path) == ["last_model_9.pt", "model_9_acc=0.2000.pt"]


def test_keep_every_seconds_on_a_folder_reads_the_files_modification_times(capsys, tmp_path):
    save_all(f"file://{tmp_path}", run=RUN[:5], n_saved=None)
    for (step, acc), mtime in zip(RUN[:5], [0, 30, 59, 61, 200], strict=True):
        os.utime(tmp_path / f"model_{step}_acc={acc:.4f}.pt", (1e9 + mtime, 1e9 + mtime))
    code, _, err = cli(capsys, "prune", f"file://{tmp_path}", "--keep-every-seconds", "60", "--yes")
    assert code == 0, err
    assert names(tmp_path) == ["model_1_acc=0.5000.pt", "model_4_acc=0.2000.pt", "model_5_acc=0.3000.pt"]


# ------------------------------------------------------------------------------------------------------ S3
@pytest.mark.integration
def test_keep_every_seconds_on_s3_reads_the_save_times_in_the_metadata(
    capsys, monkeypatch, s3_endpoint, s3_client, s3_bucket, clock
):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint.url)
    url = f"s3://{s3_bucket}/run"
    save_all(url, n_saved=None)  # saved at 1000, 1010, ..., 1080 by the test's clock, whatever S3's times say
    kept = save_all(f"s3://{s3_bucket}/policy", keep=EveryNSeconds(25))
    code, _, err = cli(capsys, "prune", url, "--keep-every-seconds", "25", "--yes")
    assert code == 0, err
    keys = sorted(o["Key"] for o in s3_client.list_objects_v2(Bucket=s3_bucket)["Contents"])
    left = [k.removeprefix("run/") for k in keys if k.startswith("run/")]
    assert (
        left
        == sorted(f for _, f in kept.state_dict()["_saved"])
        == [
            "model_1_acc=0.5000.pt",
            "model_4_acc=0.2000.pt",
            "model_7_acc=0.1000.pt",
        ]
    )
