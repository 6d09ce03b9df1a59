"""Shared fixtures: real S3 servers started by the suite (or given by the environment).

Environment (all optional):
- ``CKPTCLOUD_TEST_S3_ENDPOINT``: use this S3 server (e.g. MinIO from docker compose) instead of starting
  moto_server; credentials then come from the usual ``AWS_*`` variables.
- ``CKPTCLOUD_TEST_LARGE_S3_ENDPOINT``: the server for objects over 256 MiB instead of starting SeaweedFS.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from ckptcloud.testing import servers

# Test credentials for the local emulators; set before any boto3 client is made.
if not os.environ.get("CKPTCLOUD_TEST_S3_ENDPOINT"):
    os.environ["AWS_ACCESS_KEY_ID"] = "ckptcloud-test-key"
    os.environ["AWS_SECRET_ACCESS_KEY"] = "ckptcloud-test-secret"
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
for _var in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
    os.environ.pop(_var, None)

# The torch_xla stage runs in its own environment (scripts/xla_env.sh); it is collected only when that exists.
collect_ignore = [] if os.environ.get("CKPTCLOUD_XLA_PYTHON") else ["xla"]


@dataclass
class S3Endpoint:
    url: str
    server: servers.Server | None  # None when the endpoint came from the environment

    @property
    def is_moto(self) -> bool:
        return self.server is not None and self.server.name == "moto_server"

    def client(self) -> object:
        from ckptcloud.stores.s3 import make_s3_client

        return make_s3_client(endpoint_url=self.url, region_name="us-east-1", max_concurrency=16)


def _endpoint(env_var: str, start: object) -> Iterator[S3Endpoint]:
    given = os.environ.get(env_var)
    if given:
        yield S3Endpoint(given, None)
        return
    server = start()  # type: ignore[operator]
    try:
        yield S3Endpoint(server.endpoint, server)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[S3Endpoint]:
    """moto_server for the session (or ``CKPTCLOUD_TEST_S3_ENDPOINT``)."""
    yield from _endpoint("CKPTCLOUD_TEST_S3_ENDPOINT", servers.start_moto)


@pytest.fixture(scope="session")
def large_s3_endpoint() -> Iterator[S3Endpoint]:
    """SeaweedFS for objects over 256 MiB (or ``CKPTCLOUD_TEST_LARGE_S3_ENDPOINT``)."""
    yield from _endpoint("CKPTCLOUD_TEST_LARGE_S3_ENDPOINT", servers.start_seaweedfs)


@pytest.fixture(scope="session")
def s3_client(s3_endpoint: S3Endpoint) -> object:
    return s3_endpoint.client()


def _fresh_bucket(endpoint: S3Endpoint, client: object) -> Iterator[str]:
    name = f"ckpt-{uuid.uuid4().hex[:16]}"
    client.create_bucket(Bucket=name)  # type: ignore[attr-defined]
    yield name
    if endpoint.is_moto:
        servers.reset_moto(endpoint.url)  # drops every bucket: keeps moto's memory flat across the session
        return
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):  # type: ignore[attr-defined]
        for obj in page.get("Contents", []):
            client.delete_object(Bucket=name, Key=obj["Key"])  # type: ignore[attr-defined]
    for key, upload_id in incomplete_uploads(client, name):
        client.abort_multipart_upload(Bucket=name, Key=key, UploadId=upload_id)  # type: ignore[attr-defined]
    client.delete_bucket(Bucket=name)  # type: ignore[attr-defined]


def incomplete_uploads(client: object, bucket: str) -> list[tuple[str, str]]:
    response = client.list_multipart_uploads(Bucket=bucket)  # type: ignore[attr-defined]
    return [(u["Key"], u["UploadId"]) for u in response.get("Uploads", [])]


@pytest.fixture
def s3_bucket(s3_endpoint: S3Endpoint, s3_client: object) -> Iterator[str]:
    """A new, empty bucket on the session's S3 server, for one test."""
    yield from _fresh_bucket(s3_endpoint, s3_client)


@pytest.fixture
def large_s3_bucket(large_s3_endpoint: S3Endpoint) -> Iterator[tuple[str, object]]:
    client = large_s3_endpoint.client()
    for name in _fresh_bucket(large_s3_endpoint, client):
        yield name, client


# --------------------------------------------------------------------------------------------- GCS and Azure
@dataclass
class Emulator:
    url: str
    server: servers.Server | None  # None when the endpoint came from the environment


@pytest.fixture(scope="session")
def gcs_endpoint() -> Iterator[Emulator]:
    """fake-gcs-server for the session (or ``CKPTCLOUD_TEST_GCS_ENDPOINT``, e.g. from docker compose)."""
    given = os.environ.get("CKPTCLOUD_TEST_GCS_ENDPOINT")
    if given:
        yield Emulator(given, None)
        return
    server = servers.start_fake_gcs()
    try:
        yield Emulator(server.endpoint, server)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def gcs_client(gcs_endpoint: Emulator) -> object:
    """An anonymous google-cloud-storage client pointed at the emulator."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    return storage.Client(
        project="test", credentials=AnonymousCredentials(), client_options={"api_endpoint": gcs_endpoint.url}
    )


@pytest.fixture
def gcs_bucket(gcs_client: object) -> Iterator[str]:
    """A new, empty GCS bucket on the emulator, for one test (deleted with its objects afterwards)."""
    name = f"ckpt-{uuid.uuid4().hex[:16]}"
    bucket = gcs_client.create_bucket(name)  # type: ignore[attr-defined]
    yield name
    for blob in gcs_client.list_blobs(name):  # type: ignore[attr-defined]
        blob.delete()
    bucket.delete()


@pytest.fixture(scope="session")
def azure_endpoint() -> Iterator[Emulator]:
    """Azurite for the session; ``url`` is a connection string (or ``CKPTCLOUD_TEST_AZURE_CONNECTION_STRING``)."""
    given = os.environ.get("CKPTCLOUD_TEST_AZURE_CONNECTION_STRING")
    if given:
        yield Emulator(given, None)
        return
    server = servers.start_azurite()
    try:
        yield Emulator(server.extra["connection_string"], server)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def azure_service(azure_endpoint: Emulator) -> object:
    """A ``BlobServiceClient`` on the emulator (API version Azurite 3.35 accepts)."""
    from azure.storage.blob import BlobServiceClient

    return BlobServiceClient.from_connection_string(azure_endpoint.url, api_version=AZURITE_API_VERSION)


def _azurite_api_version() -> str:
    """The newest storage REST version that both Azurite 3.35 (2025-11-05) and the installed SDK accept: the SDK
    floors stage runs azure-storage-blob 12.19, which knows versions up to 2023-11-03 only."""
    try:
        from azure.storage.blob._serialize import _SUPPORTED_API_VERSIONS
    except ImportError:
        return "2025-11-05"
    return min(_SUPPORTED_API_VERSIONS[-1], "2025-11-05")


AZURITE_API_VERSION = _azurite_api_version()


@pytest.fixture(scope="session")
def azurite_blob_endpoint(azure_endpoint: Emulator) -> str:
    """Azurite's blob endpoint without credentials, e.g. ``http://127.0.0.1:PORT/devstoreaccount1``, for tests that
    sign their own SAS tokens with Azurite's well-known key."""
    if servers.AZURITE_KEY not in azure_endpoint.url:
        pytest.skip("signs SAS tokens with Azurite's well-known key, and this Azure endpoint uses another")
    fields = dict(part.split("=", 1) for part in azure_endpoint.url.split(";") if part)
    return fields["BlobEndpoint"].rstrip("/")


@pytest.fixture
def azure_container(azure_service: object) -> Iterator[str]:
    """A new, empty container on Azurite for one test (deleted afterwards)."""
    name = f"ckpt-{uuid.uuid4().hex[:16]}"
    azure_service.create_container(name)  # type: ignore[attr-defined]
    yield name
    azure_service.delete_container(name)  # type: ignore[attr-defined]


@pytest.fixture(params=["gcs", "azure"])
def cloud(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> tuple:
    """``(url root, raw get, raw put)`` of a fresh GCS bucket or Azure container, URLs pointed at the emulator."""
    if request.param == "gcs":
        client, bucket = request.getfixturevalue("gcs_client"), request.getfixturevalue("gcs_bucket")
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", request.getfixturevalue("gcs_endpoint").url)
        monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "test")
        blob = lambda key: client.bucket(bucket).blob(key)  # noqa: E731
        return f"gs://{bucket}", lambda k: blob(k).download_as_bytes(), lambda k, d: blob(k).upload_from_string(d)
    service, container = request.getfixturevalue("azure_service"), request.getfixturevalue("azure_container")
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", request.getfixturevalue("azure_endpoint").url)
    monkeypatch.setenv("AZURE_STORAGE_API_VERSION", AZURITE_API_VERSION)
    client = service.get_container_client(container)
    return (
        f"az://{container}",
        lambda key: client.download_blob(key).readall(),
        lambda key, data: client.upload_blob(key, data, overwrite=True),
    )
