"""The ``ckptcloud`` command on sharded checkpoints (DCP folders) against moto: ls, verify, rm, prune, cleanup."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from ckptcloud import Checkpoint
from ckptcloud.cli import main
from ckptcloud.dcp import CloudStorageWriter
from ckptcloud.remote import _object_metadata

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")]
ROOT = Path(__file__).resolve().parents[2]  # this checkout's ckptcloud, whatever is installed


@pytest.fixture
def s3(monkeypatch, s3_endpoint, s3_client, s3_bucket):
    """``(client, bucket)`` with ``s3://`` URLs pointed at the session's moto server."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint.url)
    return s3_client, s3_bucket


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return code, out.out, out.err


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    """``python -m ckptcloud ARGV`` with this checkout first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return subprocess.run(
        [sys.executable, "-m", "ckptcloud", *argv],
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )


def state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    return {"model": torch.nn.Linear(64, 32).state_dict(), "step": seed}


def save_sharded(client, bucket: str, folder: str, *, step: int | None = None, score: float | None = None) -> None:
    """A sharded checkpoint at ``s3://bucket/run/<folder>`` whose ``.metadata`` carries the retention metadata
    ``Checkpoint(..., sharded=True)`` stores with it (``ckptcloud_step``, ``ckptcloud_score``, ...)."""
    meta = {"basename": "model", "step": step, "time": time.time()}
    if score is not None:
        meta.update(priority=score, score=score, score_name="acc")
    writer = CloudStorageWriter(f"s3://{bucket}/run/{folder}", metadata=_object_metadata(meta))
    dcp.save(state(step or 0), storage_writer=writer, no_dist=True)


def uncommitted(client, bucket: str, folder: str) -> None:
    """What a save killed before its commit leaves: the data files, no ``.metadata``."""
    save_sharded(client, bucket, folder)
    client.delete_object(Bucket=bucket, Key=f"run/{folder}/.metadata")


def keys(client, bucket: str, prefix: str = "") -> list[str]:
    listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return sorted(o["Key"] for o in listed)


def test_ls_shows_each_sharded_folder_as_one_entry_with_its_size_files_and_status(capsys, s3):
    client, bucket = s3
    save_sharded(client, bucket, "model_3_acc=0.7", step=3, score=0.70001)
    uncommitted(client, bucket, "model_4")
    Checkpoint({"model": torch.nn.Linear(4, 2)}, f"s3://{bucket}/run", n_saved=None).save(global_step=1)
    code, out, err = cli(capsys, "ls", f"s3://{bucket}/run", "--json")
    assert code == 0, err
    rows = {row["name"]: row for row in json.loads(out)}
    assert list(rows) == ["model_1.pt", "model_3_acc=0.7/", "model_4/"]
    done, left = rows["model_3_acc=0.7/"], rows["model_4/"]
    folder = keys(client, bucket, "run/model_3_acc=0.7/")
    sizes = {o["Key"]: o["Size"] for o in client.list_objects_v2(Bucket=bucket, Prefix="run/")["Contents"]}
    assert done["files"] == len(folder) == 2 and done["size"] == sum(sizes[k] for k in folder)
    assert (done["step"], done["score"], done["status"]) == (3, 0.70001, "committed")  # the metadata's exact score
    assert (left["step"], left["score"], left["status"], left["files"]) == (None, None, "incomplete", 1)
    assert rows["model_1.pt"]["status"] == "committed" and rows["model_1.pt"]["files"] == 1
    code, out, _ = cli(capsys, "ls", f"s3://{bucket}/run")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["name", "step", "score", "size", "time", "(UTC)", "files", "status"]
    assert lines[2].split()[:3] == ["model_3_acc=0.7/", "3", "0.70001"] and lines[2].split()[-2:] == ["2", "committed"]
    assert lines[3].split()[0] == "model_4/" and lines[3].split()[-2:] == ["1", "incomplete"]


def test_verify_checks_every_file_and_names_the_damaged_one(s3):
    client, bucket = s3
    save_sharded(client, bucket, "step_1", step=1)
    url = f"s3://{bucket}/run/step_1/"
    done = run("verify", url)
    assert done.returncode == 0, done.stderr
    assert "1 data file(s)" in done.stdout and "every file's size and CRC32C verified" in done.stdout
    (data,) = [k for k in keys(client, bucket, "run/step_1/") if k.endswith(".distcp")]
    body = bytearray(client.get_object(Bucket=bucket, Key=data)["Body"].read())
    body[-1] ^= 0x01  # a byte no single item load reads first: only the whole-file CRC sees it
    client.put_object(Bucket=bucket, Key=data, Body=bytes(body))
    damaged = run("verify", url)
    assert damaged.returncode == 1 and f"s3://{bucket}/{data} is damaged: CRC32C" in damaged.stderr
    assert "Traceback" not in damaged.stderr


def test_verify_of_an_incomplete_folder_is_not_found_and_says_why(capsys, s3):
    client, bucket = s3
    uncommitted(client, bucket, "step_2")
    code, _, err = cli(capsys, "verify", f"s3://{bucket}/run/step_2/")
    assert code == 3 and "not a committed sharded checkpoint" in err and "no .metadata" in err
    code, _, err = cli(capsys, "ls", f"s3://{bucket}/run/step_2/")
    assert code == 3 and f"is a sharded checkpoint, not a prefix: list s3://{bucket}/run/" in err


def test_rm_deletes_the_whole_folder_after_confirmation_and_leaves_neighbours(capsys, s3):
    client, bucket = s3
    save_sharded(client, bucket, "step_1", step=1)
    save_sharded(client, bucket, "step_10", step=10)  # shares the name's start: must survive
    code, _, err = cli(capsys, "rm", f"s3://{bucket}/run/step_1/")
    assert code == 2 and "--yes" in err and keys(client, bucket, "run/step_1/")  # refused: nothing deleted
    code, out, err = cli(capsys, "rm", f"s3://{bucket}/run/step_1", "--yes")  # without the '/': found as a folder
    assert code == 0, err
    assert "deleted" in out and keys(client, bucket, "run/step_1/") == []
    assert len(keys(client, bucket, "run/step_10/")) == 2
    code, _, err = cli(capsys, "rm", f"s3://{bucket}/run/step_1/", "--yes")
    assert code == 2 and "names no object" in err  # no folder there any more, and a URL ending in '/' is no object


def test_prune_ranks_committed_folders_by_score_and_deletes_whole_folders(capsys, s3):
    client, bucket = s3
    for step, score in [(1, 0.5), (2, 0.9), (3, 0.7)]:
        save_sharded(client, bucket, f"model_{step}", step=step, score=score)
    uncommitted(client, bucket, "model_4")  # never ranked, never deleted by prune
    code, out, err = cli(capsys, "prune", f"s3://{bucket}/run", "--keep", "2", "--yes")
    assert code == 0, err
    assert "delete  model_1/" in out and "model_4/" in err  # left alone: no score known
    folders = sorted({k.split("/")[1] for k in keys(client, bucket, "run/")})
    assert folders == ["model_2", "model_3", "model_4"]
    assert len(keys(client, bucket, "run/model_2/")) == 2


def test_prune_with_a_policy_keeps_the_latest_sharded_by_step(capsys, s3):
    client, bucket = s3
    for step in (1, 2, 3):
        save_sharded(client, bucket, f"model_{step}", step=step)
    code, out, err = cli(capsys, "prune", f"s3://{bucket}/run", "--keep-latest", "1", "--yes")
    assert "delete  model_1/" in out and "delete  model_2/" in out
    assert code == 0, err
    assert sorted({k.split("/")[1] for k in keys(client, bucket, "run/")}) == ["model_3"]


def test_cleanup_deletes_only_incomplete_folders_older_than_the_age(capsys, s3):
    client, bucket = s3
    save_sharded(client, bucket, "model_1", step=1)
    uncommitted(client, bucket, "model_2")
    code, out, err = cli(capsys, "cleanup", f"s3://{bucket}/run", "--older-than", "3600")
    assert code == 0, err
    assert "incomplete sharded" not in out
    assert keys(client, bucket, "run/model_2/")  # too recent: a save may still be writing it
    time.sleep(1.1)
    code, out, err = cli(capsys, "cleanup", f"s3://{bucket}/run", "--older-than", "1")
    assert code == 0, err
    assert f"deleted incomplete sharded checkpoint s3://{bucket}/run/model_2/" in out
    assert keys(client, bucket, "run/model_2/") == [] and len(keys(client, bucket, "run/model_1/")) == 2


def test_cleanup_never_deletes_folders_that_are_not_sharded_saves(capsys, s3):
    client, bucket = s3
    other = f"s3://{bucket}/run/other-run"  # another run's single-file checkpoints: a folder without .metadata
    Checkpoint({"model": torch.nn.Linear(4, 2)}, other, n_saved=None).save(global_step=1)
    client.put_object(Bucket=bucket, Key="run/notes/readme.txt", Body=b"kept")
    time.sleep(1.1)
    code, out, err = cli(capsys, "cleanup", f"s3://{bucket}/run", "--older-than", "1")
    assert code == 0, err
    assert "incomplete sharded" not in out
    assert keys(client, bucket) == ["run/notes/readme.txt", "run/other-run/model_1.pt"]


# ------------------------------------------------------------------------------------------------ convert
def training_state() -> dict:
    from .helpers import training_state as make

    made = make()
    made["half"] = torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)
    return made


@pytest.fixture
def two_buckets(s3):
    client, bucket = s3
    other = f"{bucket}-dst"
    client.create_bucket(Bucket=other)
    return client, bucket, other


def test_convert_streams_a_sharded_checkpoint_into_one_file_in_another_bucket_that_loads_identically(two_buckets):
    from .helpers import tensors_equal

    client, bucket, other = two_buckets
    saved = training_state()
    dcp.save(saved, storage_writer=CloudStorageWriter(f"s3://{bucket}/run/step_7"), no_dist=True)
    done = run("convert", f"s3://{bucket}/run/step_7/", f"s3://{other}/export/model.pt", "--batch-mib", "1")
    assert done.returncode == 0, done.stderr
    assert "one file" in done.stdout and "tensors" in done.stdout
    checked = run("verify", f"s3://{other}/export/model.pt")  # the integrity trailer, then weights_only=True
    assert checked.returncode == 0, checked.stderr
    assert "verified CRC32C" in checked.stdout and "loads with weights_only=True" in checked.stdout
    body = client.get_object(Bucket=other, Key="export/model.pt")["Body"].read()
    loaded = torch.load(io.BytesIO(body), weights_only=True)
    assert tensors_equal(saved, loaded)  # optimizer state keyed by int again, bf16 kept, plain values kept


def test_convert_loads_tensors_in_batches_no_bigger_than_the_budget_or_the_largest_tensor(monkeypatch, tmp_path):
    from ckptcloud import convert

    sizes = [1, 3, 1, 1, 2]  # MiB
    saved = {f"t{i}": torch.full((n * 1024 * 1024 // 4,), float(i)) for i, n in enumerate(sizes)}
    dcp.save(saved, storage_writer=CloudStorageWriter(f"file://{tmp_path}/s"), no_dist=True)
    loads: list[int] = []
    real = convert._load

    def counting(reader, state):
        loads.append(sum(t.nbytes for t in state.values() if isinstance(t, torch.Tensor)))
        return real(reader, state)

    monkeypatch.setattr(convert, "_load", counting)
    done = convert.sharded_to_file(f"file://{tmp_path}/s", f"file://{tmp_path}/m.pt", batch_bytes=2 * 1024 * 1024)
    assert max(loads) == 3 * 1024 * 1024 == done.peak_batch_bytes  # the largest tensor, alone
    assert sum(loads) == sum(sizes) * 1024 * 1024 and len(loads) >= 4  # each tensor loaded once, in batches
    back = torch.load(tmp_path / "m.pt", weights_only=True)
    assert all(torch.equal(back[k], v) for k, v in saved.items())


def test_convert_a_single_file_into_a_committed_sharded_folder_that_loads_identically(capsys, two_buckets):
    from ckptcloud import serialization
    from ckptcloud.dcp import CloudStorageReader

    from .helpers import tensors_equal

    client, bucket, other = two_buckets
    saved = training_state()
    buf = io.BytesIO()
    serialization.save(saved, buf)
    client.put_object(Bucket=bucket, Key="run/model_7.pt", Body=buf.getvalue())
    code, out, err = cli(capsys, "convert", f"s3://{bucket}/run/model_7.pt", f"s3://{other}/sharded/model_7")
    assert code == 0, err
    assert "a sharded checkpoint (committed)" in out
    fresh = training_state()
    for tensor in (t for t in fresh["model"].values()):
        tensor.zero_()
    fresh["step"] = 0
    dcp.load(fresh, storage_reader=CloudStorageReader(f"s3://{other}/sharded/model_7"), no_dist=True)
    assert tensors_equal(saved, fresh)
    code, out, _ = cli(capsys, "ls", f"s3://{other}/sharded", "--json")
    assert [(r["name"], r["status"]) for r in json.loads(out)] == [("model_7/", "committed")]
    code, _, err = cli(capsys, "convert", f"s3://{bucket}/run/model_7.pt", f"s3://{other}/sharded/model_7")
    assert code == 1 and f"a sharded checkpoint is already committed at s3://{other}/sharded/model_7" in err


def test_convert_refuses_an_incomplete_folder(capsys, s3):
    client, bucket = s3
    uncommitted(client, bucket, "step_3")
    code, _, err = cli(capsys, "convert", f"s3://{bucket}/run/step_3/", f"s3://{bucket}/export/model.pt")
    assert code == 3 and "no sharded checkpoint" in err
    assert keys(client, bucket, "export/") == []


def test_checkpoint_sharded_folders_are_listed_ranked_and_pruned_by_their_exact_scores(capsys, s3):
    client, bucket = s3
    model = torch.nn.Linear(8, 4)
    ckpt = Checkpoint({"model": model}, f"s3://{bucket}/run", sharded=True, n_saved=None, score_name="acc")
    for step, score in [(1, 0.80004), (2, 0.80001), (3, 0.80003)]:  # equal to 4 decimals: only metadata ranks them
        ckpt.save(global_step=step, score=score)
    code, out, err = cli(capsys, "ls", f"s3://{bucket}/run", "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert [(r["name"], r["step"], r["score"], r["status"]) for r in rows] == [
        ("model_1_acc=0.8000/", 1, 0.80004, "committed"),
        ("model_2_acc=0.8000/", 2, 0.80001, "committed"),
        ("model_3_acc=0.8000/", 3, 0.80003, "committed"),
    ]
    code, out, err = cli(capsys, "prune", f"s3://{bucket}/run", "--keep", "2", "--yes")
    assert code == 0, err
    kept = sorted({k.split("/")[1] for k in keys(client, bucket, "run/")})
    assert kept == ["model_1_acc=0.8000", "model_3_acc=0.8000"]
    code, out, err = cli(capsys, "verify", f"s3://{bucket}/run/model_3_acc=0.8000/")
    assert code == 0 and "every file's size and CRC32C verified" in out


def test_local_folders_list_verify_and_remove_sharded_checkpoints_too(capsys, tmp_path):
    url = f"file://{tmp_path}"
    dcp.save(state(1), storage_writer=CloudStorageWriter(f"{url}/model_1"), no_dist=True)
    dcp.save(state(2), storage_writer=CloudStorageWriter(f"{url}/model_2"), no_dist=True)
    (tmp_path / "model_2" / ".metadata").unlink()  # killed before its commit
    code, out, err = cli(capsys, "ls", url, "--json")
    assert code == 0, err
    assert [(r["name"], r["step"], r["status"]) for r in json.loads(out)] == [
        ("model_1/", 1, "committed"),  # the step from the folder's name: local files carry no metadata
        ("model_2/", None, "incomplete"),
    ]
    code, out, err = cli(capsys, "verify", f"{url}/model_1/")
    assert code == 0 and "verified" in out, err
    old = time.time() - 7200
    for path in (tmp_path / "model_2").iterdir():
        os.utime(path, (old, old))
    code, out, err = cli(capsys, "cleanup", url, "--older-than", "3600")
    assert code == 0, err
    assert "deleted incomplete sharded checkpoint" in out and not (tmp_path / "model_2").exists()
    code, out, err = cli(capsys, "rm", f"{url}/model_1/", "--yes")
    assert code == 0, err
    assert list(tmp_path.iterdir()) == []


def test_sharded_ls_verify_prune_convert_rm_on_gcs_and_azure(capsys, cloud):
    root, raw_get, raw_put = cloud
    ckpt = Checkpoint({"model": torch.nn.Linear(8, 4)}, f"{root}/run", sharded=True, n_saved=None, score_name="acc")
    for step, score in [(1, 0.25), (2, 0.75001), (3, 0.5)]:
        ckpt.save(global_step=step, score=score)
    code, out, err = cli(capsys, "ls", f"{root}/run", "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert [(r["step"], r["score"], r["status"], r["files"]) for r in rows] == [
        (1, 0.25, "committed", 2),
        (2, 0.75001, "committed", 2),  # the exact score from the .metadata object's metadata
        (3, 0.5, "committed", 2),
    ]
    best = f"{root}/run/model_2_acc=0.7500/"
    code, out, err = cli(capsys, "convert", best, f"{root}/export/model.pt")
    assert code == 0, err
    code, out, err = cli(capsys, "verify", f"{root}/export/model.pt")
    assert code == 0 and "verified CRC32C" in out, err
    code, out, err = cli(capsys, "prune", f"{root}/run", "--keep", "1", "--yes")
    assert code == 0, err
    code, out, _ = cli(capsys, "ls", f"{root}/run", "--json")
    assert [r["name"] for r in json.loads(out)] == ["model_2_acc=0.7500/"]
    data = next(name for name in _names(best) if name.endswith(".distcp"))
    body = bytearray(raw_get(f"run/model_2_acc=0.7500/{data}"))
    body[-1] ^= 0x01
    raw_put(f"run/model_2_acc=0.7500/{data}", bytes(body))
    code, _, err = cli(capsys, "verify", best)
    assert code == 1 and f"{data} is damaged: CRC32C" in err
    code, out, err = cli(capsys, "rm", best, "--yes")
    assert code == 0, err
    assert cli(capsys, "ls", f"{root}/run")[0] == 3  # nothing left


def _names(folder_url: str) -> list[str]:
    """The files of a sharded folder, by listing it through the dcp package."""
    from ckptcloud.dcp import list_folder
    from ckptcloud.dcp.target import Target

    target = Target(folder_url.rstrip("/"))
    return [info.key.rpartition("/")[2] for info in list_folder(target.store, target.prefix)]
