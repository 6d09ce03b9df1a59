"""The ``ckptcloud`` command against moto (S3), fake-gcs-server, Azurite and local folders, and its exit codes."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from ckptcloud import Checkpoint, serialization
from ckptcloud.cli import main
from ckptcloud.testing.servers import free_port
from tests.conftest import incomplete_uploads

MiB = 1024 * 1024
pytestmark = pytest.mark.integration


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return code, out.out, out.err


def save_scored(url: str, scores: list[float]) -> None:
    """``model_{step}_acc={score:.4f}.pt`` for steps 1.. with exact scores in the object metadata."""
    ckpt = Checkpoint({"model": torch.nn.Linear(4, 2)}, url, n_saved=None, score_name="acc")
    for step, score in enumerate(scores, start=1):
        ckpt.save(global_step=step, score=score)


def checkpoint_bytes(mib: int = 1, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    g = torch.Generator().manual_seed(seed)
    serialization.save({"w": torch.randn(mib * MiB // 4, generator=g), "step": seed}, buf)
    return buf.getvalue()


def flip_byte(data: bytes, at: int) -> bytes:
    damaged = bytearray(data)
    damaged[at] ^= 0x01
    return bytes(damaged)


@pytest.fixture
def s3(monkeypatch, s3_endpoint, s3_client, s3_bucket):
    """``(client, bucket)`` with ``s3://`` URLs pointed at the session's moto server."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint.url)
    return s3_client, s3_bucket


def s3_keys(client, bucket: str) -> list[str]:
    return sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", []))


# ------------------------------------------------------------------------------------------------------ S3
def test_ls_shows_step_exact_score_size_and_time(capsys, s3):
    client, bucket = s3
    save_scored(f"s3://{bucket}/run", [0.5, 0.90004])
    client.put_object(Bucket=bucket, Key="run/notes.txt", Body=b"not a checkpoint")
    code, out, _ = cli(capsys, "ls", f"s3://{bucket}/run", "--json")
    assert code == 0
    rows = json.loads(out)
    assert [(r["name"], r["step"], r["score"]) for r in rows] == [
        ("model_1_acc=0.5000.pt", 1, 0.5),
        ("model_2_acc=0.9000.pt", 2, 0.90004),  # the metadata's exact priority, not the filename's 4 decimals
    ]
    assert all(r["size"] > 0 and r["time"].endswith("+00:00") for r in rows)
    code, out, _ = cli(capsys, "ls", f"s3://{bucket}/run")
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:4] == ["name", "step", "score", "size"]
    assert lines[2].split()[:3] == ["model_2_acc=0.9000.pt", "2", "0.90004"] and len(lines) == 3


def test_prune_dry_run_deletes_nothing(capsys, s3):
    client, bucket = s3
    save_scored(f"s3://{bucket}/run", [0.1, 0.2, 0.3])
    before = s3_keys(client, bucket)
    code, out, _ = cli(capsys, "prune", f"s3://{bucket}/run", "--keep", "1", "--dry-run")
    assert code == 0 and out.count("would delete") == 2 and "nothing deleted (dry run)" in out
    assert s3_keys(client, bucket) == before


def test_prune_keeps_the_two_best_by_exact_score(capsys, s3):
    client, bucket = s3
    # all four filenames say 0.8000 or less; only the metadata tells steps 1 and 3 are the best
    save_scored(f"s3://{bucket}/run", [0.80004, 0.80001, 0.80003, 0.5])
    client.put_object(Bucket=bucket, Key="run/model_final.pt", Body=b"unrankable: never deleted")
    code, _, err = cli(capsys, "prune", f"s3://{bucket}/run", "--keep", "2", "--by", "score", "--yes")
    assert code == 0, err
    assert "model_final.pt" in err
    assert s3_keys(client, bucket) == ["run/model_1_acc=0.8000.pt", "run/model_3_acc=0.8000.pt", "run/model_final.pt"]


def test_prune_without_yes_on_a_non_interactive_stdin_is_refused(capsys, s3):
    client, bucket = s3
    save_scored(f"s3://{bucket}/run", [0.1, 0.2])
    code, _, err = cli(capsys, "prune", f"s3://{bucket}/run", "--keep", "1")
    assert code == 2 and "--yes" in err
    assert len(s3_keys(client, bucket)) == 2


def two_series(url: str) -> None:
    """ignite's usual layout: the best by score ("best_model_...") and the latest by step ("model_...") together."""
    model = torch.nn.Linear(4, 2)
    best = Checkpoint({"model": model}, url, n_saved=None, filename_prefix="best", score_name="acc")
    latest = Checkpoint({"model": model}, url, n_saved=None, resume=True)
    for step, acc in [(1, 0.8), (2, 0.95), (3, 0.7), (4, 0.6)]:
        if acc > 0.75:
            best.save(global_step=step, score=acc)
        latest.save(global_step=step)


@pytest.mark.parametrize("where", ["s3", "folder"])
def test_prune_never_ranks_two_series_on_one_scale(capsys, s3, tmp_path, where):
    client, bucket = s3
    url = f"s3://{bucket}/run" if where == "s3" else f"file://{tmp_path}"  # a folder's files carry no metadata
    two_series(url)
    names = lambda: sorted(  # noqa: E731
        k.removeprefix("run/") for k in (s3_keys(client, bucket) if where == "s3" else os.listdir(tmp_path))
    )
    before = names()
    code, _, err = cli(capsys, "prune", url, "--keep", "2", "--by", "step", "--yes")
    assert code == 2 and "2 series" in err and "best_model (acc)" in err and "--series" in err
    assert names() == before  # nothing deleted
    code, _, err = cli(capsys, "prune", url, "--keep", "2", "--by", "step", "--series", "model", "--yes")
    assert code == 0, err
    assert names() == ["best_model_1_acc=0.8000.pt", "best_model_2_acc=0.9500.pt", "model_3.pt", "model_4.pt"]
    code, _, err = cli(capsys, "prune", url, "--keep", "1", "--series", "best_model", "--yes")
    assert code == 0, err
    assert names() == ["best_model_2_acc=0.9500.pt", "model_3.pt", "model_4.pt"]


def test_put_then_get_is_byte_identical(capsys, s3, tmp_path):
    _, bucket = s3
    source = tmp_path / "big.pt"
    source.write_bytes(checkpoint_bytes(20))  # 20 MiB: a multipart upload with the default 16 MiB parts
    code, out, err = cli(capsys, "put", str(source), f"s3://{bucket}/up/")
    assert code == 0, err
    assert "verified CRC32C" in out and f"s3://{bucket}/up/big.pt" in out
    assert err == ""  # stderr is not a TTY: no progress bar
    code, out, err = cli(capsys, "get", f"s3://{bucket}/up/big.pt", str(tmp_path / "back.pt"))
    assert code == 0, err
    assert "verified CRC32C" in out
    assert (tmp_path / "back.pt").read_bytes() == source.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back.pt", "big.pt"]  # no temporary file left


def test_put_a_damaged_checkpoint_is_refused(capsys, s3, tmp_path):
    client, bucket = s3
    source = tmp_path / "bad.pt"
    source.write_bytes(flip_byte(checkpoint_bytes(), 1000))
    code, _, err = cli(capsys, "put", str(source), f"s3://{bucket}/bad.pt")
    assert code == 1 and "is damaged" in err
    assert s3_keys(client, bucket) == []


def test_verify_and_get_refuse_a_corrupted_object(capsys, s3, tmp_path):
    client, bucket = s3
    client.put_object(Bucket=bucket, Key="run/model_1.pt", Body=checkpoint_bytes())
    code, out, _ = cli(capsys, "verify", f"s3://{bucket}/run/model_1.pt")
    assert code == 0 and "verified CRC32C" in out and "loads with weights_only=True (1 tensors" in out
    stored = client.get_object(Bucket=bucket, Key="run/model_1.pt")["Body"].read()
    client.put_object(Bucket=bucket, Key="run/model_1.pt", Body=flip_byte(stored, len(stored) // 2))
    code, _, err = cli(capsys, "verify", f"s3://{bucket}/run/model_1.pt")
    assert code == 1 and err.startswith("ckptcloud: ") and "is damaged: CRC32C" in err
    code, _, err = cli(capsys, "get", f"s3://{bucket}/run/model_1.pt", str(tmp_path / "x.pt"))
    assert code == 1 and "is damaged" in err
    assert list(tmp_path.iterdir()) == []


def test_verify_without_trailer_and_a_load_refusal(capsys, s3):
    client, bucket = s3
    plain = io.BytesIO()
    torch.save({"w": torch.ones(3)}, plain)
    client.put_object(Bucket=bucket, Key="plain.pt", Body=plain.getvalue())
    code, out, _ = cli(capsys, "verify", f"s3://{bucket}/plain.pt")
    assert code == 0 and "no ckptcloud trailer: not verifiable" in out
    unsafe = io.BytesIO()
    serialization.save({"opt": torch.optim.SGD}, unsafe)  # a class: weights_only refuses it
    client.put_object(Bucket=bucket, Key="unsafe.pt", Body=unsafe.getvalue())
    code, out, err = cli(capsys, "verify", f"s3://{bucket}/unsafe.pt")
    assert code == 1 and "verified CRC32C" in out and "weights_only" in err


def test_rm_asks_for_confirmation(capsys, s3, monkeypatch):
    client, bucket = s3
    client.put_object(Bucket=bucket, Key="a.pt", Body=b"x")
    code, _, err = cli(capsys, "rm", f"s3://{bucket}/a.pt")
    assert code == 2 and "--yes" in err and s3_keys(client, bucket) == ["a.pt"]

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdin", Tty("n\n"))
    assert cli(capsys, "rm", f"s3://{bucket}/a.pt")[0] == 2 and s3_keys(client, bucket) == ["a.pt"]
    monkeypatch.setattr(sys, "stdin", Tty("y\n"))
    code, out, err = cli(capsys, "rm", f"s3://{bucket}/a.pt")
    assert code == 0 and "[y/N]" in err and f"deleted s3://{bucket}/a.pt" in out
    assert s3_keys(client, bucket) == []
    assert cli(capsys, "rm", f"s3://{bucket}/a.pt", "--yes")[0] == 3  # gone: not found


def test_cleanup_discards_incomplete_uploads(capsys, s3, tmp_path):
    client, bucket = s3
    client.create_multipart_upload(Bucket=bucket, Key="run/model_9.pt")
    client.create_multipart_upload(Bucket=bucket, Key="other/model_9.pt")
    code, out, _ = cli(capsys, "cleanup", f"s3://{bucket}/run", "--older-than", "0")
    assert code == 0 and "discarded run/model_9.pt" in out and out.splitlines()[-1].startswith("1 incomplete")
    assert [key for key, _ in incomplete_uploads(client, bucket)] == ["other/model_9.pt"]
    leftover = tmp_path / ".model_9.pt.abc123.tmp"  # what a killed DiskSaver save leaves
    leftover.write_bytes(b"partial")
    code, out, _ = cli(capsys, "cleanup", f"file://{tmp_path}")  # default: only those older than an hour
    assert code == 0 and out.startswith("0 incomplete") and leftover.exists()
    code, out, _ = cli(capsys, "cleanup", f"file://{tmp_path}", "--older-than", "0")
    assert code == 0 and "discarded .model_9.pt.abc123.tmp" in out and not leftover.exists()


# ------------------------------------------------------------------------------------------- exit codes
def test_exit_codes(capsys, s3, tmp_path):
    client, bucket = s3
    assert cli(capsys, "ls", "ftp://host/dir")[0] == 2
    assert cli(capsys, "ls", "no-scheme")[0] == 2
    assert cli(capsys, "get", f"s3://{bucket}/", str(tmp_path / "x"))[0] == 2  # names no object
    assert cli(capsys, "prune", f"s3://{bucket}/run", "--keep", "-1")[0] == 2  # argparse usage error
    assert cli(capsys)[0] == 2
    code, _, err = cli(capsys, "get", f"s3://{bucket}/run/absent.pt", str(tmp_path / "x"))
    assert code == 3 and f"no object at s3://{bucket}/run/absent.pt" in err
    code, _, err = cli(capsys, "ls", "s3://no-such-bucket-ckptcloud/run")
    assert code == 3 and "does not exist" in err
    assert cli(capsys, "verify", f"s3://{bucket}/absent.pt")[0] == 3
    assert cli(capsys, "ls", f"file://{tmp_path}/absent")[0] == 3
    client.put_object(Bucket=bucket, Key="here.pt", Body=b"x")
    code, _, err = cli(capsys, "get", f"s3://{bucket}/here.pt", str(tmp_path / "no" / "x.pt"))
    assert code == 3 and "no folder" in err
    assert list(tmp_path.iterdir()) == []


def test_unreachable_endpoint_exits_5_quickly(capsys, monkeypatch):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    start = time.monotonic()
    code, _, err = cli(capsys, "ls", "s3://bucket/run")
    assert code == 5 and "cannot reach the S3 endpoint" in err
    assert time.monotonic() - start < 30


def test_missing_credentials_exit_4_without_showing_secrets(capsys, monkeypatch, s3_endpoint, tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint.url)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    code, _, err = cli(capsys, "ls", "s3://bucket/run")
    assert code == 4 and "credentials" in err.lower()
    for var in ("AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_ACCOUNT_URL", "AZURE_STORAGE_ACCOUNT"):
        monkeypatch.delenv(var, raising=False)
    assert cli(capsys, "ls", "az://container/run")[0] == 4


def test_permission_denied_exits_4(capsys, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError("access denied to s3://bucket (checking the bucket): AccessDenied")

    monkeypatch.setattr("ckptcloud.cli.saver_from_url", denied)
    code, _, err = cli(capsys, "ls", "s3://bucket/run")
    assert code == 4 and err == "ckptcloud: access denied to s3://bucket (checking the bucket): AccessDenied\n"


def test_a_gcs_retry_error_on_connection_failures_exits_5(capsys, monkeypatch):
    import requests
    from google.api_core.exceptions import RetryError

    def unreachable(*args, **kwargs):
        raise RetryError("Timeout of 120.0s exceeded", cause=requests.ConnectionError("connection refused"))

    monkeypatch.setattr("ckptcloud.cli.saver_from_url", unreachable)
    code, _, err = cli(capsys, "ls", "gs://bucket/run")
    assert code == 5 and err.startswith("ckptcloud: RetryError: Timeout of 120.0s exceeded")


def test_subprocess_exit_codes_and_json(s3):
    client, bucket = s3
    client.put_object(Bucket=bucket, Key="run/model_3.pt", Body=checkpoint_bytes())
    env = {**os.environ}

    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ckptcloud", *argv], capture_output=True, text=True, env=env,
                              stdin=subprocess.DEVNULL, timeout=120)  # fmt: skip

    done = run("ls", f"s3://{bucket}/run", "--json")
    assert done.returncode == 0, done.stderr
    assert [(r["name"], r["step"], r["score"]) for r in json.loads(done.stdout)] == [("model_3.pt", 3, None)]
    done = run("rm", f"s3://{bucket}/run/model_3.pt")
    assert done.returncode == 2 and done.stderr.startswith("ckptcloud: not confirmed")
    assert "Traceback" not in done.stderr
    assert s3_keys(client, bucket) == ["run/model_3.pt"]
    done = run("get", f"s3://{bucket}/run/absent.pt", "/tmp/never-written.pt")
    assert done.returncode == 3 and done.stderr.count("\n") == 1


# ---------------------------------------------------------------------------------------------- GCS, Azure


def test_ls_get_verify_on_gcs_and_azure(capsys, cloud, tmp_path):
    root, raw_get, raw_put = cloud
    save_scored(f"{root}/run", [0.25, 0.75001])
    code, out, err = cli(capsys, "ls", f"{root}/run", "--json")
    assert code == 0, err
    assert [(r["step"], r["score"]) for r in json.loads(out)] == [(1, 0.25), (2, 0.75001)]
    url = f"{root}/run/model_2_acc=0.7500.pt"
    code, out, err = cli(capsys, "get", url, str(tmp_path))
    assert code == 0 and "verified CRC32C" in out, err
    assert (tmp_path / "model_2_acc=0.7500.pt").read_bytes() == raw_get("run/model_2_acc=0.7500.pt")
    code, out, _ = cli(capsys, "verify", url)
    assert code == 0 and "loads with weights_only=True" in out
    raw_put("run/model_3.pt", flip_byte(checkpoint_bytes(), 5000))
    code, _, err = cli(capsys, "verify", f"{root}/run/model_3.pt")
    assert code == 1 and "is damaged" in err
    assert cli(capsys, "verify", f"{root}/run/absent.pt")[0] == 3
    (tmp_path / "up.pt").write_bytes(checkpoint_bytes(2))
    assert cli(capsys, "put", str(tmp_path / "up.pt"), f"{root}/up/")[0] == 0
    assert raw_get("up/up.pt") == (tmp_path / "up.pt").read_bytes()


# ------------------------------------------------------------------------------------------- local folders
def test_local_folder_ls_get_verify_prune(capsys, tmp_path):
    run = tmp_path / "run"
    save_scored(f"file://{run}", [0.3, 0.9, 0.6])
    (run / "model_best.pt").write_bytes(b"no step, no score")
    code, out, _ = cli(capsys, "ls", f"file://{run}", "--json")
    assert code == 0
    rows = {r["name"]: (r["step"], r["score"]) for r in json.loads(out)}
    assert rows == {"model_1_acc=0.3000.pt": (1, 0.3), "model_2_acc=0.9000.pt": (2, 0.9),
                    "model_3_acc=0.6000.pt": (3, 0.6), "model_best.pt": (None, None)}  # fmt: skip
    code, out, _ = cli(capsys, "get", f"file://{run}/model_2_acc=0.9000.pt", str(tmp_path / "copy.pt"))
    assert code == 0 and "verified CRC32C" in out
    assert (tmp_path / "copy.pt").read_bytes() == (run / "model_2_acc=0.9000.pt").read_bytes()
    assert cli(capsys, "verify", f"file://{run}/model_2_acc=0.9000.pt")[0] == 0
    code, _, err = cli(capsys, "prune", f"file://{run}", "--keep", "1", "--by", "step", "--yes")
    assert code == 0 and "model_best.pt" in err
    assert sorted(p.name for p in run.iterdir()) == ["model_3_acc=0.6000.pt", "model_best.pt"]


def test_progress_bar_only_on_a_tty_and_not_with_quiet(capsys, tmp_path, monkeypatch):
    source = tmp_path / "big.pt"
    source.write_bytes(checkpoint_bytes(9))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    code, _, err = cli(capsys, "put", str(source), f"file://{tmp_path}/out/big.pt")
    assert code == 0 and "100.0%" in err and "MiB" in err and "MB/s" in err
    assert (tmp_path / "out" / "big.pt").read_bytes() == source.read_bytes()
    code, _, err = cli(capsys, "get", f"file://{tmp_path}/out/big.pt", str(tmp_path / "back.pt"), "--quiet")
    assert code == 0 and err == ""


@pytest.mark.parametrize(
    "name,meta,expected",
    [
        ("model_5_val_acc=0.7500.pt", {}, (5, 0.75)),
        ("best_model_12_acc=-0.5000.pt", {}, (12, -0.5)),
        ("model_acc=0.7500.pt", {}, (None, 0.75)),
        ("checkpoint_3_0.7500.pt", {}, (3, 0.75)),
        ("model_0.7500.pt", {}, (None, 0.75)),
        ("model_1000.pt", {}, (1000, None)),
        ("model_final.pt", {}, (None, None)),
        ("model_3_7.pt", {}, (None, None)),  # step and integer score, or a name ending in a number: not guessed
        ("model_5_acc=0.7500.pt", {"ckptcloud_priority": "0.75004", "ckptcloud_score_name": "acc"}, (5, 0.75004)),
        ("model_7.pt", {"ckptcloud_priority": "7", "ckptcloud_basename": "model"}, (7, None)),
        ("run_2_model_9_acc=0.1000.pt", {"ckptcloud_basename": "run_2_model"}, (9, 0.1)),
    ],
)
def test_step_and_score_from_metadata_or_filename(name, meta, expected):
    from ckptcloud._inventory import _rank

    assert _rank(name, meta) == expected


def test_demo_is_dispatched(monkeypatch):
    seen = []
    monkeypatch.setattr("ckptcloud.demo.main", lambda argv: seen.append(argv) or 0)
    assert main(["demo", "--epochs", "1"]) == 0 and seen == [["--epochs", "1"]]
