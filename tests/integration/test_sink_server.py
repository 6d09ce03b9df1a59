"""The benchmark's S3 sink server (``benchmarks/sink_server.py``): boto3 and ckptcloud round trips through it.

The server runs in its own process on a free port and is stopped by its PID; sizes stay small (a few MiB).
"""

from __future__ import annotations

import io
import os

import pytest
import torch

boto3 = pytest.importorskip("boto3")
from botocore.config import Config  # noqa: E402

from benchmarks.sink_server import start_sink  # noqa: E402
from ckptcloud.savers import S3Saver  # noqa: E402

MiB = 1024 * 1024
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", params=[False, True], ids=["ram", "discard"])
def sink(request, monkeypatch_module):
    endpoint, stop = start_sink(discard=request.param)
    try:
        yield endpoint, request.param, stop
    finally:
        stop()
        with pytest.raises(ProcessLookupError):
            os.kill(stop.pid, 0)  # gone, not a zombie: stop() waited for it


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ACCESS_KEY_ID", "sink")  # the sink ignores auth; the SDKs want credentials
        patch.setenv("AWS_SECRET_ACCESS_KEY", "sink")
        yield patch


def _client(endpoint: str):
    config = Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1})
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", config=config)


def test_boto3_multipart_ranged_get_list_delete(sink):
    endpoint, discard, _ = sink
    client = _client(endpoint)
    client.create_bucket(Bucket="mp")
    client.head_bucket(Bucket="mp")
    data = os.urandom(12 * MiB + 123)
    config = boto3.s3.transfer.TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    client.upload_fileobj(io.BytesIO(data), "mp", "a/obj", Config=config)  # 3 parts, Expect: 100-continue
    head = client.head_object(Bucket="mp", Key="a/obj")
    assert head["ContentLength"] == len(data) and head["ETag"].endswith('-3"')
    ranged = client.get_object(Bucket="mp", Key="a/obj", Range="bytes=5242000-5243000")
    assert ranged["ContentRange"] == f"bytes 5242000-5243000/{len(data)}"
    body = ranged["Body"].read()
    assert body == (bytes(1001) if discard else data[5242000:5243001])
    if not discard:
        out = io.BytesIO()
        client.download_fileobj("mp", "a/obj", out)
        assert out.getvalue() == data
    client.put_object(Bucket="mp", Key="a/small", Body=b"hello", Metadata={"k": "v"})
    assert client.head_object(Bucket="mp", Key="a/small")["Metadata"] == {"k": "v"}
    listed = client.list_objects_v2(Bucket="mp", Prefix="a/")
    assert [(o["Key"], o["Size"]) for o in listed["Contents"]] == [("a/obj", len(data)), ("a/small", 5)]
    client.delete_objects(Bucket="mp", Delete={"Objects": [{"Key": "a/obj"}, {"Key": "a/small"}]})
    assert client.list_objects_v2(Bucket="mp").get("KeyCount") == 0
    with pytest.raises(client.exceptions.NoSuchKey):
        client.get_object(Bucket="mp", Key="a/obj")


def test_ckptcloud_save_and_load(sink):
    endpoint, discard, _ = sink
    _client(endpoint).create_bucket(Bucket="ck")
    saver = S3Saver("ck", "run", endpoint_url=endpoint, region_name="us-east-1", part_size=5 * MiB)
    state = {"w": torch.randn(3 * MiB // 4), "b": torch.arange(10)}  # 3 MiB: one put
    big = {"w": torch.randn(3 * MiB)}  # 12 MiB: a multipart upload of 3 parts
    saver(state, "small.pt")
    saver(big, "big.pt")
    assert saver.list() == ["big.pt", "small.pt"]
    if discard:
        return  # GETs serve zeros: nothing to load
    loaded = saver.load("small.pt")
    assert torch.equal(loaded["w"], state["w"]) and torch.equal(loaded["b"], state["b"])
    assert torch.equal(saver.load("big.pt", mmap=True)["w"], big["w"])
    saver.remove("small.pt")
    assert saver.list() == ["big.pt"]
