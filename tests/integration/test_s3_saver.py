"""S3Saver against a real S3 server (moto_server started by the suite; SeaweedFS for objects over 256 MiB)."""

from __future__ import annotations

import logging

import pytest
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint as IgniteCheckpoint

import ckptcloud
from ckptcloud import Checkpoint
from ckptcloud.retry import NO_RETRY
from ckptcloud.savers import S3Saver
from ckptcloud.stores import s3 as s3_module
from ckptcloud.stores.s3 import S3Store
from ckptcloud.testing import servers
from tests.conftest import incomplete_uploads
from tests.helpers import assert_same, dtype_zoo, stored_bytes, training_state

MiB = 1024 * 1024
pytestmark = pytest.mark.integration


def keys(client, bucket: str) -> list[str]:
    return sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", []))


def object_bytes(client, bucket: str, key: str) -> bytes:
    return client.get_object(Bucket=bucket, Key=key)["Body"].read()


@pytest.mark.parametrize(
    "make_state,part_size",
    [
        (training_state, 5 * MiB),
        (dtype_zoo, 5 * MiB),
        (lambda: {"w": torch.randn(3 * MiB)}, 5 * MiB),  # 12 MiB: three parts, the last one short
        (lambda: {"w": torch.randn(5 * MiB // 4)}, 5 * MiB),  # just over one part after the zip header
        (lambda: {f"layer{i}": torch.randn(64 * MiB // 4) for i in range(4)}, 8 * MiB),  # 256 MiB
    ],
    ids=["optimizer-scheduler", "dtypes", "12MiB", "one-part-plus", "256MiB"],
)
def test_round_trip_is_bit_identical(s3_client, s3_bucket, make_state, part_size):
    state = make_state()
    saver = S3Saver(s3_bucket, "run", client=s3_client, part_size=part_size, max_concurrency=4)
    saver(state, "ckpt.pt")
    assert object_bytes(s3_client, s3_bucket, "run/ckpt.pt") == stored_bytes(state)
    assert_same(state, saver.load("ckpt.pt"))
    assert incomplete_uploads(s3_client, s3_bucket) == []


@pytest.mark.large
def test_round_trip_over_256_mib_on_seaweedfs(large_s3_bucket):
    bucket, client = large_s3_bucket
    state = {f"t{i}": torch.randn(75 * MiB // 4) for i in range(4)}  # 300 MiB
    saver = S3Saver(bucket, "big", client=client, part_size=16 * MiB, max_concurrency=4)
    saver(state, "big.pt")
    assert client.head_object(Bucket=bucket, Key="big/big.pt")["ContentLength"] > 300 * MiB
    back = saver.load("big.pt")
    assert_same(state, back)


def test_bytes_damaged_in_transit_are_refused_by_the_server_and_resent(large_s3_bucket, monkeypatch):
    """Each part carries its CRC32C: SeaweedFS (like AWS) answers BadDigest and the part is resent intact.
    (moto does not check x-amz-checksum-crc32c, so this runs on SeaweedFS.)"""
    bucket, client = large_s3_bucket
    real_body, damaged = s3_module._body, []

    def damage_part_two_once(data: memoryview) -> bytes:
        body = bytes(real_body(data))
        if len(body) == 5 * MiB and not damaged:  # the first full part to go out
            damaged.append(True)
            return body[:1000] + bytes([body[1000] ^ 0xFF]) + body[1001:]
        return body

    monkeypatch.setattr(s3_module, "_body", damage_part_two_once)
    state = {"w": torch.randn(4 * MiB)}  # 16 MiB: four parts
    saver = S3Saver(bucket, "run", client=client, part_size=5 * MiB, max_concurrency=2)
    saver(state, "ckpt.pt")
    assert damaged and object_bytes(client, bucket, "run/ckpt.pt") == stored_bytes(state)
    with pytest.raises(ckptcloud.errors.TransientError, match="BadDigest"):
        damaged.clear()
        S3Saver(bucket, "run2", client=client, part_size=5 * MiB, retry=NO_RETRY)(state, "ckpt.pt")
    assert keys(client, bucket) == ["run/ckpt.pt"]  # the refused save published nothing


def test_a_plain_boto3_client_the_user_made_works_too(s3_endpoint, s3_bucket):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint.url, region_name="us-east-1")  # default checksums, signing
    state = {"w": torch.randn(3 * MiB)}
    saver = S3Saver(s3_bucket, "run", client=client, part_size=5 * MiB)
    saver(state, "ckpt.pt")
    assert object_bytes(client, s3_bucket, "run/ckpt.pt") == stored_bytes(state)
    assert_same(state, saver.load("ckpt.pt"))


def test_extra_args_cannot_set_a_second_checksum(s3_client, s3_bucket):
    with pytest.raises(ValueError, match=r"`extra_args` should not set checksums.*ChecksumAlgorithm"):
        S3Saver(s3_bucket, "run", client=s3_client, extra_args={"ChecksumAlgorithm": "SHA256"})


def test_small_checkpoint_is_one_put_request(s3_client, s3_bucket, monkeypatch):
    calls: list[str] = []
    for name in ("put", "begin", "put_part", "complete"):
        original = getattr(S3Store, name)

        def spy(self, *args, _name=name, _original=original):
            calls.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(S3Store, name, spy)
    S3Saver(s3_bucket, client=s3_client)({"w": torch.ones(10)}, "tiny.pt")
    assert calls == ["put"]
    assert keys(s3_client, s3_bucket) == ["tiny.pt"]


@pytest.mark.parametrize("k", [0, 1, 3])
@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_failure_after_k_parts_publishes_nothing_and_keeps_older_checkpoints(s3_client, s3_bucket, monkeypatch, k, exc):
    saver = S3Saver(s3_bucket, "p", client=s3_client, part_size=5 * MiB, max_concurrency=2)
    old = {"w": torch.randn(3 * MiB)}
    saver(old, "old.pt")
    saver(old, "same.pt")
    old_bytes = object_bytes(s3_client, s3_bucket, "p/same.pt")

    original = S3Store.put_part

    def flaky(self, upload, number, data):
        if number > k:
            raise exc(f"injected after {k} parts")
        return original(self, upload, number, data)

    monkeypatch.setattr(S3Store, "put_part", flaky)
    big = {"w": torch.randn(8 * MiB)}  # 32 MiB: 7 parts
    with pytest.raises(exc, match="injected"):
        saver(big, "new.pt")
    with pytest.raises(exc, match="injected"):
        saver(big, "same.pt")  # a failed overwrite keeps the old object
    assert keys(s3_client, s3_bucket) == ["p/old.pt", "p/same.pt"]
    assert object_bytes(s3_client, s3_bucket, "p/same.pt") == old_bytes
    assert incomplete_uploads(s3_client, s3_bucket) == []
    assert_same(old, saver.load("old.pt"))


def test_failed_save_through_checkpoint_keeps_kept_list_and_objects(s3_client, s3_bucket, monkeypatch):
    saver = S3Saver(s3_bucket, client=s3_client, part_size=5 * MiB, retry=NO_RETRY)
    model = torch.nn.Linear(4, 4)
    ckpt = Checkpoint({"model": model}, saver, n_saved=1)
    ckpt.save(global_step=1)
    monkeypatch.setattr(S3Store, "put", lambda *a: (_ for _ in ()).throw(ConnectionError("network down")))
    with pytest.raises(ConnectionError):
        ckpt.save(global_step=2)
    assert ckpt.state_dict() == {"_saved": [(1, "model_1.pt")]}
    assert keys(s3_client, s3_bucket) == ["model_1.pt"]


def test_ignite_checkpoint_prunes_through_s3_saver(s3_client, s3_bucket):
    model = torch.nn.Linear(2, 2)
    trainer = Engine(lambda engine, batch: None)
    saver = S3Saver(s3_bucket, "ignite", client=s3_client)
    handler = IgniteCheckpoint({"model": model}, saver, n_saved=2)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, handler)
    trainer.run([0, 1, 2], max_epochs=5)
    assert keys(s3_client, s3_bucket) == ["ignite/model_12.pt", "ignite/model_15.pt"]


def test_ckptcloud_checkpoint_with_scores_keeps_exactly_n_saved(s3_client, s3_bucket):
    model = torch.nn.Linear(2, 2)
    url = f"s3://{s3_bucket}/scored"
    ckpt = Checkpoint({"model": model}, S3Saver(s3_bucket, "scored", client=s3_client), n_saved=2, score_name="acc")
    for epoch, acc in enumerate([0.1, 0.5, 0.3, 0.9, 0.2], start=1):
        ckpt.save(global_step=epoch, score=acc)
    assert keys(s3_client, s3_bucket) == ["scored/model_2_acc=0.5000.pt", "scored/model_4_acc=0.9000.pt"]
    assert ckpt.last_checkpoint == "model_4_acc=0.9000.pt"
    assert ckpt.save_handler.url(ckpt.last_checkpoint) == f"{url}/model_4_acc=0.9000.pt"


def test_checkpoint_url_and_load_objects_url(s3_endpoint, s3_client, s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint.url)
    model = torch.nn.Linear(3, 3)
    ckpt = Checkpoint({"model": model}, f"s3://{s3_bucket}/via-url", n_saved=1)
    ckpt.save(global_step=7)
    assert keys(s3_client, s3_bucket) == ["via-url/model_7.pt"]
    fresh = torch.nn.Linear(3, 3)
    Checkpoint.load_objects({"model": fresh}, f"s3://{s3_bucket}/via-url/model_7.pt")
    assert_same(model.state_dict(), fresh.state_dict())
    saver = ckptcloud.saver_from_url(f"s3://{s3_bucket}/via-url", require_empty=False)
    assert saver.list() == ["model_7.pt"]


def test_remove_is_idempotent_and_listing_sees_only_the_prefix(s3_client, s3_bucket):
    s3_client.put_object(Bucket=s3_bucket, Key="other/x.pt", Body=b"not ours")
    s3_client.put_object(Bucket=s3_bucket, Key="mine-not/y.pt", Body=b"not ours")
    saver = S3Saver(s3_bucket, "mine", client=s3_client)
    saver({"w": torch.ones(1)}, "a.pt")
    saver({"w": torch.ones(1)}, "b.pt")
    s3_client.put_object(Bucket=s3_bucket, Key="mine/sub/c.pt", Body=b"nested, not listed")
    assert saver.list() == ["a.pt", "b.pt"]
    saver.remove("a.pt")
    saver.remove("a.pt")
    assert saver.list() == ["b.pt"]
    assert "other/x.pt" in keys(s3_client, s3_bucket)


def test_require_empty_refuses_a_prefix_with_checkpoints(s3_client, s3_bucket):
    s3_client.put_object(Bucket=s3_bucket, Key="run/model_1.pt", Body=b"x")
    with pytest.raises(ValueError, match=r"model_1\.pt.*require_empty=False"):
        S3Saver(s3_bucket, "run", client=s3_client)
    S3Saver(s3_bucket, "run", client=s3_client, require_empty=False)
    S3Saver(s3_bucket, "other-run", client=s3_client)


def test_missing_bucket_is_named_at_construction(s3_client):
    with pytest.raises(FileNotFoundError, match="no-such-bucket-here"):
        S3Saver("no-such-bucket-here", client=s3_client)


def test_missing_key_on_load_names_the_url(s3_client, s3_bucket):
    saver = S3Saver(s3_bucket, "p", client=s3_client)
    with pytest.raises(FileNotFoundError, match=f"s3://{s3_bucket}/p/absent.pt"):
        saver.load("absent.pt")


@pytest.mark.parametrize("filename", ["../escape.pt", "/abs.pt", "a/../../b.pt", "a//b.pt", ""])
def test_filename_cannot_escape_the_prefix(s3_client, s3_bucket, filename):
    saver = S3Saver(s3_bucket, "p", client=s3_client)
    with pytest.raises(ValueError, match="`filename`"):
        saver({"w": torch.ones(1)}, filename)
    with pytest.raises(ValueError, match="`filename`"):
        saver.remove(filename)
    assert keys(s3_client, s3_bucket) == []


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"part_size": 1 * MiB}, "`part_size` should be between 5242880 and 5368709120 bytes"),
        ({"part_size": 6 * 1024**3}, "`part_size`"),
        ({"max_concurrency": 0}, "`max_concurrency` should be between 1 and 64, but given 0"),
        ({"max_concurrency": 1000}, "`max_concurrency`"),
        ({"prefix": "a/../b"}, "`prefix`"),
    ],
)
def test_out_of_range_arguments_are_named(s3_client, s3_bucket, kwargs, match):
    with pytest.raises(ValueError, match=match):
        S3Saver(s3_bucket, client=s3_client, **kwargs)


@pytest.fixture(scope="module")
def auth_s3():
    server = servers.start_moto(enforce_auth=True)
    try:
        yield server
    finally:
        server.stop()


def test_access_denied_and_credentials_never_shown(auth_s3, monkeypatch, caplog):
    secret = "SuperSecretValue-do-not-print-0123456789"
    key_id = "AKIAWRONGKEYFORTEST01"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    caplog.set_level(logging.DEBUG, logger="ckptcloud")
    with pytest.raises(PermissionError) as info:
        S3Saver("some-bucket", "p", endpoint_url=auth_s3.endpoint, region_name="us-east-1")
    shown = [str(info.value), repr(info.value), caplog.text]
    saver = S3Saver("some-bucket", "p", endpoint_url=auth_s3.endpoint, region_name="us-east-1", save_on_rank=1)
    shown.append(repr(saver))
    assert "access denied" in str(info.value) and "some-bucket" in str(info.value)
    for text in shown:
        assert secret not in text
        assert key_id not in text
