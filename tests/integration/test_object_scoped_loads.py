"""Loads by URL need only read access to the object (review 19, trial 7).

moto enforces IAM here: the reader may only ``s3:GetObject`` on ``models/runs/exp1/*``. It cannot HEAD the bucket
nor list it, which is exactly what an evaluation or serving job is usually granted.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ckptcloud import Checkpoint, serialization
from ckptcloud.testing import servers
from ckptcloud.urls import load_checkpoint

pytestmark = pytest.mark.integration

URL = "s3://models/runs/exp1/model_3.pt"
WEIGHTS = {"weight": torch.arange(6.0).reshape(3, 2), "bias": torch.ones(3)}
SETUP_CALLS = 6  # the requests below sent before moto starts enforcing IAM


def _checkpoint_bytes() -> bytes:
    buf = io.BytesIO()
    serialization.save({"model": WEIGHTS}, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def reader() -> Iterator[dict[str, str]]:
    """The environment of a reader allowed only ``s3:GetObject`` on ``models/runs/exp1/*``."""
    import boto3

    server = servers.moto_server(enforce_auth=True)
    assert server.env is not None
    server.env["INITIAL_NO_AUTH_ACTION_COUNT"] = str(SETUP_CALLS)
    server.start()
    try:
        admin = {"endpoint_url": server.endpoint, "region_name": "us-east-1"}
        admin |= {"aws_access_key_id": "admin", "aws_secret_access_key": "admin"}
        s3, iam = boto3.client("s3", **admin), boto3.client("iam", **admin)
        s3.create_bucket(Bucket="models")
        s3.put_object(Bucket="models", Key="runs/exp1/model_3.pt", Body=_checkpoint_bytes())
        s3.put_object(Bucket="models", Key="runs/exp2/model_1.pt", Body=_checkpoint_bytes())
        iam.create_user(UserName="reader")
        statement = {"Effect": "Allow", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::models/runs/exp1/*"}
        policy = json.dumps({"Version": "2012-10-17", "Statement": [statement]})
        iam.put_user_policy(UserName="reader", PolicyName="read-exp1", PolicyDocument=policy)
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        yield {
            "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": server.endpoint,
        }
    finally:
        server.stop()


@pytest.fixture
def as_reader(reader: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """This process runs with the reader's credentials."""
    for name, value in reader.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    return reader


ROOT = Path(__file__).resolve().parents[2]  # this checkout's ckptcloud, whatever is installed


def _cli(env: dict[str, str], *argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | env
    full["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return subprocess.run(
        [sys.executable, "-m", "ckptcloud", *argv],
        capture_output=True,
        text=True,
        env=full,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )


def test_the_reader_is_really_denied_the_bucket(as_reader):
    """The premise: HeadBucket and listing are denied to these credentials, so no load may use them."""
    import boto3
    from botocore.exceptions import ClientError

    client = boto3.client("s3")
    with pytest.raises(ClientError, match=r"\(403\)"):
        client.head_bucket(Bucket="models")
    with pytest.raises(ClientError, match="AccessDenied"):
        client.list_objects_v2(Bucket="models", Prefix="runs/exp1/")


def test_get_object_credentials_load_the_checkpoint_by_url(as_reader):
    loaded = load_checkpoint(URL)
    assert torch.equal(loaded["model"]["weight"], WEIGHTS["weight"])


def test_get_object_credentials_load_objects_by_url(as_reader):
    model = torch.nn.Linear(2, 3)
    Checkpoint.load_objects({"model": model}, URL)
    assert torch.equal(model.weight.detach(), WEIGHTS["weight"])


def test_get_object_credentials_download_and_verify_with_the_cli(reader, tmp_path):
    done = _cli(reader, "get", URL, str(tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "model_3.pt").read_bytes() == _checkpoint_bytes()
    assert "verified CRC32C" in done.stdout
    done = _cli(reader, "verify", URL, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "loads with weights_only=True (2 tensors" in done.stdout


def test_a_missing_object_is_reported_by_its_url_not_the_bucket(as_reader, reader, tmp_path):
    missing = "s3://models/runs/exp1/x.pt"
    with pytest.raises((FileNotFoundError, PermissionError)) as info:
        load_checkpoint(missing)
    message = str(info.value)
    assert f"no object at {missing}" in message or f"access denied to {missing}" in message
    assert "checking the bucket" not in message
    done = _cli(reader, "get", missing, str(tmp_path), cwd=tmp_path)
    assert done.returncode in (3, 4) and missing in done.stderr and "checking the bucket" not in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_an_object_outside_the_policy_is_denied_by_its_url(as_reader, reader, tmp_path):
    other = "s3://models/runs/exp2/model_1.pt"
    with pytest.raises(PermissionError, match=re.escape(f"access denied to {other}")):
        load_checkpoint(other)
    done = _cli(reader, "verify", other, cwd=tmp_path)
    assert done.returncode == 4 and f"access denied to {other}" in done.stderr


# ----------------------------------------------------------------------------------------------- Azure
def test_a_blob_scoped_read_sas_loads_and_verifies_the_checkpoint(azure_service, azure_endpoint, tmp_path):
    """Azure's equivalent: a read SAS for the one blob (no container rights) loads it; a missing blob is named."""
    import datetime

    from azure.storage.blob import generate_blob_sas

    from tests.conftest import AZURITE_API_VERSION

    if azure_endpoint.server is None:
        pytest.skip("needs Azurite's well-known account key to sign a SAS")
    container = f"models-{uuid.uuid4().hex[:12]}"
    azure_service.create_container(container)
    try:
        azure_service.get_blob_client(container, "runs/exp1/model_3.pt").upload_blob(_checkpoint_bytes())
        endpoint = azure_endpoint.server.endpoint
        for name in ("runs/exp1/model_3.pt", "runs/exp1/x.pt"):
            expiry = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1)
            sas = generate_blob_sas(
                servers.AZURITE_ACCOUNT, container, name, account_key=servers.AZURITE_KEY, permission="r", expiry=expiry
            )
            env = {"AZURE_STORAGE_ACCOUNT_URL": f"{endpoint}?{sas}", "AZURE_STORAGE_API_VERSION": AZURITE_API_VERSION}
            env = {k: v for k, v in os.environ.items() if not k.startswith("AZURE_")} | env
            url = f"az://{container}/{name}"
            got = _cli(env, "get", url, str(tmp_path), cwd=tmp_path)
            checked = _cli(env, "verify", url, cwd=tmp_path)
            if name.endswith("model_3.pt"):
                assert got.returncode == 0, got.stderr
                assert (tmp_path / "model_3.pt").read_bytes() == _checkpoint_bytes()
                assert checked.returncode == 0 and "loads with weights_only=True" in checked.stdout, checked.stderr
            else:
                for done in (got, checked):
                    assert done.returncode in (3, 4) and url in done.stderr and "checking the" not in done.stderr
    finally:
        azure_service.delete_container(container)
