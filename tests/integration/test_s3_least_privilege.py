"""Credentials on S3: the least IAM permissions each operation needs, and secrets kept out of every error and log.

moto_server with authentication enforced evaluates IAM policies for S3 requests the way AWS does (HEAD and GET
of an object need ``s3:GetObject``, every multipart request but the abort ``s3:PutObject``, ``DeleteObjects``
``s3:DeleteObject`` per key), with one difference: it checks ``HeadBucket`` against an ``s3:HeadBucket`` action,
where AWS checks ``s3:ListBucket``, and it checks ``DeleteObjects`` as ``s3:DeleteObject`` on the bucket, where
AWS checks each key. The policies here grant those two next to what AWS needs.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import traceback
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import boto3
import pytest
import torch

from ckptcloud import Checkpoint
from ckptcloud.retry import Retry
from ckptcloud.savers import S3Saver
from ckptcloud.testing import servers
from ckptcloud.testing.faultproxy import FaultProxy
from tests.helpers import assert_same

MiB = 1024 * 1024
pytestmark = pytest.mark.integration
BUCKET_ACTIONS = ["s3:ListBucket", "s3:ListBucketMultipartUploads"]
OBJECT_ACTIONS = ["s3:PutObject", "s3:GetObject", "s3:DeleteObject", "s3:AbortMultipartUpload"]
SECRET = "ckptcloud-SECRET-ACCESS-KEY-never-print-0123456789"  # distinctive: found anywhere means leaked
SSE_C_KEY = "ckptcloud-SSE-C-key-never-print!"  # 32 bytes


@dataclass
class AuthS3:
    """moto_server enforcing IAM, an admin to set policies, and a ``trainer`` user whose policy each test sets."""

    endpoint: str
    admin: dict[str, str]
    trainer: dict[str, str]

    def client(self, service: str, creds: dict[str, str]):
        return boto3.client(service, endpoint_url=self.endpoint, region_name="us-east-1", **creds)

    def allow(self, bucket: str, prefix: str, actions: list[str]) -> None:
        """Replace the trainer's policy: ``actions``, bucket actions on the bucket, object actions on the prefix."""
        bucket_actions = [a for a in actions if a in BUCKET_ACTIONS]
        if "s3:ListBucket" in bucket_actions:
            bucket_actions.append("s3:HeadBucket")  # moto's name for what AWS checks as s3:ListBucket
        if "s3:DeleteObject" in actions:
            bucket_actions.append("s3:DeleteObject")  # moto checks DeleteObjects on the bucket; AWS per key
        statements = [
            {"Effect": "Allow", "Action": bucket_actions, "Resource": f"arn:aws:s3:::{bucket}"},
            {
                "Effect": "Allow",
                "Action": [a for a in actions if a in OBJECT_ACTIONS],
                "Resource": f"arn:aws:s3:::{bucket}/{prefix}/*",
            },
        ]
        policy = {"Version": "2012-10-17", "Statement": [s for s in statements if s["Action"]]}
        self.client("iam", self.admin).put_user_policy(
            UserName="trainer", PolicyName="ckptcloud", PolicyDocument=json.dumps(policy)
        )


def _keys(response: dict) -> dict[str, str]:
    key = response["AccessKey"]
    return {"aws_access_key_id": key["AccessKeyId"], "aws_secret_access_key": key["SecretAccessKey"]}


@pytest.fixture(scope="module")
def auth_s3() -> Iterator[AuthS3]:
    server = servers.moto_server(enforce_auth=True)
    assert server.env is not None
    server.env["INITIAL_NO_AUTH_ACTION_COUNT"] = "3"  # enough to make an admin; every later request is checked
    server.start()
    try:
        iam = boto3.client("iam", endpoint_url=server.endpoint, region_name="us-east-1")
        iam.create_user(UserName="admin")
        admin = _keys(iam.create_access_key(UserName="admin"))
        everything = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        iam.put_user_policy(UserName="admin", PolicyName="all", PolicyDocument=json.dumps(everything))
        iam = boto3.client("iam", endpoint_url=server.endpoint, region_name="us-east-1", **admin)
        iam.create_user(UserName="trainer")
        yield AuthS3(server.endpoint, admin, _keys(iam.create_access_key(UserName="trainer")))
    finally:
        server.stop()


@pytest.fixture
def bucket(auth_s3: AuthS3) -> str:
    name = f"ckpt-{uuid.uuid4().hex[:16]}"
    auth_s3.client("s3", auth_s3.admin).create_bucket(Bucket=name)
    return name


def trainer_saver(auth_s3: AuthS3, bucket: str, **options) -> S3Saver:
    client = auth_s3.client("s3", auth_s3.trainer)
    return S3Saver(bucket, "run", client=client, part_size=5 * MiB, retry=Retry(max_attempts=1), **options)


# ------------------------------------------------------------------------------------------- permissions


def test_the_documented_permissions_are_enough_for_every_operation(auth_s3, bucket):
    auth_s3.allow(bucket, "run", BUCKET_ACTIONS + OBJECT_ACTIONS)
    model = torch.nn.Linear(600, 1000)  # 2.4 MB of weights; with part_size 5 MiB: one put
    saver = trainer_saver(auth_s3, bucket)  # HeadBucket, and the listing of require_empty
    ckpt = Checkpoint({"model": model}, saver, n_saved=1)
    ckpt.save(global_step=1)
    ckpt.save(global_step=2)  # evicts model_1.pt: a delete
    saver({"w": torch.randn(3 * MiB)}, "big.pt")  # a multipart upload
    resumed = Checkpoint({"model": model}, trainer_saver(auth_s3, bucket, require_empty=False), n_saved=1, resume=True)
    assert resumed.last_checkpoint is not None and resumed.last_checkpoint.endswith("model_2.pt")
    assert_same(model.state_dict(), saver.load("model_2.pt"))  # one object: saved as itself, as ignite does
    saver.remove_many(["big.pt"])  # one DeleteObjects
    saver.store.begin("run/left.pt", {})
    assert saver.cleanup_incomplete(older_than=0) == ["run/left.pt"]


@pytest.mark.parametrize(
    "missing,operation",
    [
        ("s3:ListBucket", "construct"),
        ("s3:PutObject", "save"),
        ("s3:GetObject", "load"),
        ("s3:DeleteObject", "remove_many"),
        ("s3:ListBucketMultipartUploads", "cleanup"),
        ("s3:AbortMultipartUpload", "cleanup"),
    ],
)
def test_each_documented_permission_is_needed_by_its_operation(auth_s3, bucket, missing, operation):
    admin = auth_s3.client("s3", auth_s3.admin)
    admin.put_object(Bucket=bucket, Key="run/model_1.pt", Body=b"x")
    auth_s3.allow(bucket, "run", BUCKET_ACTIONS + OBJECT_ACTIONS)
    saver = trainer_saver(auth_s3, bucket, require_empty=False)
    saver.store.begin("run/left.pt", {})
    auth_s3.allow(bucket, "run", [a for a in BUCKET_ACTIONS + OBJECT_ACTIONS if a != missing])
    act = {
        "construct": lambda: trainer_saver(auth_s3, bucket, require_empty=True),
        "save": lambda: saver({"w": torch.ones(3)}, "model_2.pt"),
        "load": lambda: saver.load("model_1.pt"),
        "remove_many": lambda: saver.remove_many(["model_1.pt"]),
        "cleanup": lambda: saver.cleanup_incomplete(older_than=0),
    }[operation]
    with pytest.raises(PermissionError, match=rf"access denied.*s3://{bucket}"):
        act()


# --------------------------------------------------------------------------------------- secrets stay out


@pytest.fixture
def debug_log() -> Iterator[dict[str, io.StringIO]]:
    """Every logger at DEBUG (``all``), and ckptcloud's own (``ckptcloud``), each with tracebacks formatted."""
    streams = {"all": io.StringIO(), "ckptcloud": io.StringIO()}
    handlers = {name: logging.StreamHandler(stream) for name, stream in streams.items()}
    for handler in handlers.values():
        handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    root, own = logging.getLogger(), logging.getLogger("ckptcloud")
    levels = root.level, own.level
    root.addHandler(handlers["all"])
    own.addHandler(handlers["ckptcloud"])
    root.setLevel(logging.DEBUG)
    own.setLevel(logging.DEBUG)
    yield streams
    root.removeHandler(handlers["all"])
    own.removeHandler(handlers["ckptcloud"])
    root.setLevel(levels[0])
    own.setLevel(levels[1])


def _failure_text(err: BaseException) -> str:
    """Everything a user could see of ``err``: the traceback with causes, contexts and notes; str and repr."""
    parts = ["".join(traceback.format_exception(type(err), err, err.__traceback__))]
    seen: BaseException | None = err
    while seen is not None:
        parts += [str(seen), repr(seen), *getattr(seen, "__notes__", [])]
        seen = seen.__cause__ or seen.__context__
    return "\n".join(parts)


def _forms(secret: str) -> list[str]:
    raw = secret.encode()
    return [secret, base64.b64encode(raw).decode(), raw.hex()]


def _unreachable(auth_s3, s3_endpoint, bucket):
    dead = f"http://127.0.0.1:{servers.free_port()}"
    S3Saver("bkt", "run", endpoint_url=dead, region_name="us-east-1", retry=Retry(max_attempts=2, initial_backoff=0))


def _unknown_key(auth_s3, s3_endpoint, bucket):
    S3Saver(bucket, "run", endpoint_url=auth_s3.endpoint, region_name="us-east-1", retry=Retry(max_attempts=1))


def _wrong_secret(auth_s3, s3_endpoint, bucket):
    saver = S3Saver(bucket, "run", endpoint_url=auth_s3.endpoint, region_name="us-east-1", check_bucket=False,
                    require_empty=False, retry=Retry(max_attempts=1))  # fmt: skip
    saver.list()  # ListObjectsV2: SignatureDoesNotMatch


def _missing_bucket(auth_s3, s3_endpoint, bucket):
    S3Saver("no-such-bucket-ckptcloud", "run", endpoint_url=s3_endpoint.url, region_name="us-east-1",
            extra_args={"SSECustomerAlgorithm": "AES256", "SSECustomerKey": SSE_C_KEY})  # fmt: skip


def _missing_key(auth_s3, s3_endpoint, bucket):
    boto3.client("s3", endpoint_url=s3_endpoint.url, region_name="us-east-1").create_bucket(Bucket=bucket)
    saver = S3Saver(bucket, "run", endpoint_url=s3_endpoint.url, region_name="us-east-1",
                    extra_args={"SSECustomerAlgorithm": "AES256", "SSECustomerKey": SSE_C_KEY})  # fmt: skip
    saver.load("absent.pt")


def _server_error(auth_s3, s3_endpoint, bucket):
    with FaultProxy(upstream_port=int(s3_endpoint.url.rsplit(":", 1)[1]), error=1.0) as proxy:  # 503 SlowDown
        S3Saver(bucket, "run", endpoint_url=proxy.endpoint, region_name="us-east-1",
                extra_args={"SSECustomerAlgorithm": "AES256", "SSECustomerKey": SSE_C_KEY},
                retry=Retry(max_attempts=2, initial_backoff=0))  # fmt: skip


@pytest.mark.parametrize(
    "fail,expected",
    [
        (_unreachable, ConnectionError),
        (_unknown_key, PermissionError),
        (_wrong_secret, PermissionError),
        (_missing_bucket, FileNotFoundError),
        (_missing_key, FileNotFoundError),
        (_server_error, ConnectionError),
    ],
    ids=["unreachable", "unknown-key", "wrong-secret", "missing-bucket", "missing-key", "server-503"],
)
def test_the_secret_key_appears_in_no_error_traceback_or_log(
    auth_s3, s3_endpoint, bucket, debug_log, monkeypatch, fail, expected
):
    known = fail is _wrong_secret  # the trainer's real key id with a wrong secret, else an unknown key id
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", auth_s3.trainer["aws_access_key_id"] if known else "AKIACKPTCLOUDTEST01")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    with pytest.raises(expected) as info:
        fail(auth_s3, s3_endpoint, bucket)
    seen = _failure_text(info.value)
    logged, own = debug_log["all"].getvalue(), debug_log["ckptcloud"].getvalue()
    assert "Traceback" in seen and logged, "nothing was captured: the test would be vacuous"
    for form in _forms(SECRET):
        assert form not in seen and form not in logged
    for form in _forms(SSE_C_KEY):
        assert form not in seen and form not in own
