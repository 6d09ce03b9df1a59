"""URLs to savers, and that importing ckptcloud needs no cloud SDK."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from ckptcloud import Checkpoint, DiskSaver, saver_from_url
from ckptcloud.urls import split_url


@pytest.mark.parametrize(
    "url,expected",
    [
        ("s3://bucket/a/b", ("s3", "bucket", "a/b")),
        ("s3://bucket", ("s3", "bucket", "")),
        ("S3://bucket/a/", ("s3", "bucket", "a")),
        ("file:///tmp/x", ("file", "", "/tmp/x")),
    ],
)
def test_split_url(url, expected):
    assert split_url(url) == expected


@pytest.mark.parametrize(
    "url,match",
    [
        ("ftp://bucket/x", r"Unknown URL scheme 'ftp://'.*supported: .*s3://"),
        ("bucket/x", r"`url` should look like 's3://bucket/prefix'"),
        ("s3:///x", r"`url` has no bucket"),
        ("file://host/x", r"file:// URLs need an absolute path"),
    ],
)
def test_bad_urls_are_named(url, match):
    with pytest.raises(ValueError, match=match):
        split_url(url)


def test_file_url_makes_a_disk_saver(tmp_path):
    saver = saver_from_url(tmp_path.as_uri())
    assert isinstance(saver, DiskSaver) and saver.dirname == tmp_path
    ckpt = Checkpoint({"m": torch.nn.Linear(1, 1)}, (tmp_path / "sub").as_uri())
    assert isinstance(ckpt.save_handler, DiskSaver)


def test_missing_extra_says_which_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "boto3", None)  # import boto3 now raises ImportError
    with pytest.raises(ImportError, match=r"pip install ckptcloud\[s3\]"):
        saver_from_url("s3://bucket/prefix")
    from ckptcloud import S3Saver

    with pytest.raises(ImportError, match=r"pip install ckptcloud\[s3\]"):
        S3Saver("bucket")


def test_importing_ckptcloud_imports_no_cloud_sdk_and_no_ignite():
    code = (
        "import sys, ckptcloud, ckptcloud.checkpoint\n"
        "bad = [m for m in ('boto3', 'botocore', 'google.cloud.storage', 'azure.storage.blob', 'ignite')"
        " if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize(
    "url, prefix",
    [("s3://b/runs/exp#1", "runs/exp#1"), ("gs://b/exp?lr=0.1/", "exp?lr=0.1"), ("az://c/a#b?c/d", "a#b?c/d")],
)
def test_hash_and_question_mark_stay_in_the_prefix_so_two_runs_never_share_one(url, prefix):
    assert split_url(url)[2] == prefix


def test_a_file_url_with_hash_or_question_mark_loads_back(tmp_path):
    from ckptcloud import load_checkpoint

    disk = DiskSaver(tmp_path / "exp#1")
    disk({"w": torch.ones(2)}, "model?best.pt")
    for url in (disk.url("model?best.pt"), f"file://{disk.dirname}/model?best.pt"):  # encoded, and as typed
        assert torch.equal(load_checkpoint(url)["w"], torch.ones(2))
