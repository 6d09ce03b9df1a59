"""The ``ckptcloud`` command's edges (trial 19): ``get URL -``, ``ls`` that finds nothing, URLs ending in '/',
``--version``, and the exit-code table of ``--help``."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

from ckptcloud import serialization
from ckptcloud.cli import main

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]  # this checkout's ckptcloud, whatever is installed


def checkpoint_bytes() -> bytes:
    buf = io.BytesIO()
    serialization.save({"w": torch.arange(1000.0)}, buf)
    return buf.getvalue()


@pytest.fixture
def s3(monkeypatch, s3_endpoint, s3_client, s3_bucket):
    """``(client, bucket)`` with ``s3://`` URLs pointed at the session's moto server, ``run/model_1.pt`` stored."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint.url)
    s3_client.put_object(Bucket=s3_bucket, Key="run/model_1.pt", Body=checkpoint_bytes())
    return s3_client, s3_bucket


def run(*argv: str, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    """``python -m ckptcloud ARGV`` in ``cwd``; stdout is raw bytes, stderr text."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return subprocess.run(
        [sys.executable, "-m", "ckptcloud", *argv],
        capture_output=True,
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return code, out.out, out.err


# ------------------------------------------------------------------------------------------ get URL -
def test_get_to_dash_writes_only_the_checkpoint_bytes_to_stdout(s3, tmp_path):
    _, bucket = s3
    done = run("get", f"s3://{bucket}/run/model_1.pt", "-", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == checkpoint_bytes()
    assert (
        f"s3://{bucket}/run/model_1.pt -> stdout" in done.stderr.decode() and "verified CRC32C" in done.stderr.decode()
    )
    assert list(tmp_path.iterdir()) == []  # no file named "-"


def test_get_to_dash_of_a_damaged_checkpoint_writes_nothing_to_stdout(s3, tmp_path):
    client, bucket = s3
    damaged = bytearray(checkpoint_bytes())
    damaged[100] ^= 0x01
    client.put_object(Bucket=bucket, Key="run/model_2.pt", Body=bytes(damaged))
    done = run("get", f"s3://{bucket}/run/model_2.pt", "-", cwd=tmp_path)
    assert done.returncode == 1 and done.stdout == b""
    assert "is damaged" in done.stderr.decode() and "nothing was written to stdout" in done.stderr.decode()
    assert list(tmp_path.iterdir()) == []


def test_get_to_dash_from_a_local_folder(tmp_path):
    (tmp_path / "model_1.pt").write_bytes(checkpoint_bytes())
    done = run("get", f"file://{tmp_path}/model_1.pt", "-", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == checkpoint_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_1.pt"]


# ---------------------------------------------------------------------------------------- ls, nothing
def test_ls_of_a_prefix_without_checkpoints_says_so_and_exits_3(capsys, s3):
    client, bucket = s3
    code, out, err = cli(capsys, "ls", f"s3://{bucket}/typo")
    assert (code, out) == (3, "") and err == f"ckptcloud: no checkpoints under s3://{bucket}/typo/\n"
    code, out, err = cli(capsys, "ls", f"s3://{bucket}/typo", "--json")
    assert code == 3 and json.loads(out) == [] and "no checkpoints under" in err
    client.put_object(Bucket=bucket, Key="notes/readme.txt", Body=b"not a checkpoint")
    code, _, err = cli(capsys, "ls", f"s3://{bucket}/notes/")
    assert code == 3 and err == f"ckptcloud: no checkpoints under s3://{bucket}/notes/\n"


def test_ls_of_an_object_url_names_its_folder_and_exits_3(capsys, s3):
    _, bucket = s3
    code, out, err = cli(capsys, "ls", f"s3://{bucket}/run/model_1.pt")
    assert (code, out) == (3, "")
    assert err == (
        f"ckptcloud: s3://{bucket}/run/model_1.pt is an object, not a prefix: list its folder s3://{bucket}/run/\n"
    )


def test_ls_of_a_local_file_or_empty_folder_exits_3(capsys, tmp_path):
    (tmp_path / "model_1.pt").write_bytes(checkpoint_bytes())
    (tmp_path / "empty").mkdir()
    code, _, err = cli(capsys, "ls", f"file://{tmp_path}/model_1.pt")
    assert code == 3 and "is a file, not a folder" in err and f"file://{tmp_path}/" in err
    code, _, err = cli(capsys, "ls", f"file://{tmp_path}/empty")
    assert code == 3 and f"no checkpoints under file://{tmp_path}/empty/" in err
    assert cli(capsys, "ls", f"file://{tmp_path}")[0] == 0


def test_ls_subprocess_exit_code_for_scripts(s3, tmp_path):
    _, bucket = s3
    done = run("ls", f"s3://{bucket}/typo-in-prefix", cwd=tmp_path)
    assert done.returncode == 3 and done.stdout == b""
    assert done.stderr.decode().strip() == f"ckptcloud: no checkpoints under s3://{bucket}/typo-in-prefix/"


# ----------------------------------------------------------------------------------- trailing '/' URLs
@pytest.mark.parametrize("command", ["get", "verify", "rm"])
def test_a_cloud_url_ending_in_slash_names_no_object(capsys, s3, tmp_path, command):
    client, bucket = s3
    client.put_object(Bucket=bucket, Key="run", Body=b"a marker object next to the folder")
    argv = {"get": [str(tmp_path)], "verify": [], "rm": ["--yes"]}[command]
    code, _, err = cli(capsys, command, f"s3://{bucket}/run/", *argv)
    assert code == 2 and f"s3://{bucket}/run/ names no object" in err
    assert list(tmp_path.iterdir()) == []
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"])
    assert keys == ["run", "run/model_1.pt"]  # rm deleted nothing


def test_load_checkpoint_of_a_url_ending_in_slash_names_no_object(s3):
    from ckptcloud.urls import load_checkpoint

    _, bucket = s3
    with pytest.raises(ValueError, match="names no object"):
        load_checkpoint(f"s3://{bucket}/run/")


# ------------------------------------------------------------------------------------ version, help
def test_version_prints_the_installed_version(tmp_path):
    done = run("--version", cwd=tmp_path)
    assert done.returncode == 0
    assert done.stdout.decode().strip() == f"ckptcloud {version('ckptcloud')}"


def test_help_lists_every_exit_code():
    done = run("--help", cwd=ROOT)
    text = " ".join(done.stdout.decode().split())
    assert done.returncode == 0
    for code in ("0 ok", "1 the operation failed", "2 usage error", "3 not found", "4 permission denied", "5 cannot"):
        assert code in text
    assert "ls found no checkpoints" in text


def test_get_to_dash_refuses_a_terminal(s3, tmp_path):
    import pty

    _, bucket = s3
    primary, secondary = pty.openpty()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    try:
        done = subprocess.run(
            [sys.executable, "-m", "ckptcloud", "get", f"s3://{bucket}/run/model_1.pt", "-"],
            stdout=secondary,
            stderr=subprocess.PIPE,
            env=env,
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            timeout=120,
        )
    finally:
        os.close(secondary)
        os.close(primary)
    assert done.returncode == 2 and b"not writing the binary checkpoint" in done.stderr
    assert list(tmp_path.iterdir()) == []
