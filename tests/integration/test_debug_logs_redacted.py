"""With DEBUG logging on (the usual first step when a save fails), no log line carries a credential.

urllib3 logs each Azure request line with its SAS query string, and botocore logs SigV4 headers with the access
key id (trial 17). ckptcloud puts a redacting filter on those loggers when a store adapter is imported.
"""

from __future__ import annotations

import base64
import datetime
import logging
import uuid

import pytest
import torch

from ckptcloud import AzureBlobSaver, Checkpoint, S3Saver
from ckptcloud.redaction import REDACTED, RedactingFilter, install_log_filters, redact
from ckptcloud.testing import servers
from tests.conftest import AZURITE_API_VERSION

pytestmark = pytest.mark.integration

ACCESS_KEY_ID = "AKIAEXAMPLEKEYID0001"
SECRET_KEY = "secret-value-0123456789-do-not-log"
SSE_C_KEY = "0123456789abcdef0123456789abcdef"  # 32 bytes: an AES-256 customer-provided key


@pytest.fixture
def debug_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Every logger at DEBUG, captured at the root (where an application's basicConfig handler would sit)."""
    caplog.set_level(logging.DEBUG)
    for name in ("urllib3", "botocore", "azure", "ckptcloud"):
        caplog.set_level(logging.DEBUG, logger=name)
    return caplog


def _lines(caplog: pytest.LogCaptureFixture) -> str:
    handler = caplog.handler
    return "\n".join(handler.format(record) for record in caplog.records)


def test_debug_logs_of_an_azure_sas_session_never_show_the_signature(azure_service, azure_container, debug_log):
    from azure.storage.blob import AccountSasPermissions, ResourceTypes, generate_account_sas

    sas = generate_account_sas(
        servers.AZURITE_ACCOUNT,
        servers.AZURITE_KEY,
        ResourceTypes(container=True, object=True),
        AccountSasPermissions(read=True, write=True, delete=True, list=True, create=True),
        datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1),
    )
    signature = dict(field.split("=", 1) for field in sas.split("&"))["sig"]
    endpoint = azure_service.url.rstrip("/")
    saver = AzureBlobSaver(
        azure_container, "run", account_url=endpoint, credential=sas, api_version=AZURITE_API_VERSION
    )
    checkpoint = Checkpoint({"model": torch.nn.Linear(2, 2)}, saver, n_saved=1)
    checkpoint.save(global_step=1)
    checkpoint.save(global_step=2)  # a delete too
    assert saver.list() == ["model_2.pt"]
    saver.load("model_2.pt")

    text = _lines(debug_log)
    assert "GET /" in text or "PUT /" in text, "urllib3's request lines were not captured: the test would be vacuous"
    assert signature not in text
    assert f"sig={REDACTED}" in text  # the request lines are still there, minus the signature


def test_debug_logs_of_an_s3_session_never_show_the_access_key_id_or_secret(s3_endpoint, debug_log, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    from ckptcloud.stores.s3 import make_s3_client

    client = make_s3_client(endpoint_url=s3_endpoint.url, region_name="us-east-1")
    bucket = f"ckpt-{uuid.uuid4().hex[:16]}"
    client.create_bucket(Bucket=bucket)
    sse_c = {"SSECustomerAlgorithm": "AES256", "SSECustomerKey": SSE_C_KEY}
    saver = S3Saver(bucket, "run", client=client, part_size=5 * 2**20, extra_args=sse_c)
    saver({"w": torch.zeros(3 * 2**20)}, "model_1.pt")  # 12 MiB: a multipart upload
    saver.load("model_1.pt")

    text = _lines(debug_log)
    assert "Credential=" in text, "botocore's signed headers were not captured: the test would be vacuous"
    assert "SSECustomerKey" in text, "botocore's request parameters were not captured: the test would be vacuous"
    assert ACCESS_KEY_ID not in text
    assert SECRET_KEY not in text
    assert SSE_C_KEY not in text
    assert base64.b64encode(SSE_C_KEY.encode()).decode() not in text


def test_logged_tracebacks_are_redacted_too():
    record = logging.LogRecord("urllib3.connectionpool", logging.ERROR, __file__, 1, "request failed", None, None)
    try:
        raise ConnectionError("Max retries exceeded with url: /c/b?sv=2025&sig=TOPSECRET%3D (refused)")
    except ConnectionError:
        import sys

        record.exc_info = sys.exc_info()
    RedactingFilter().filter(record)
    assert "TOPSECRET" not in logging.Formatter().format(record)
    assert f"sig={REDACTED}" in logging.Formatter().format(record)


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("https://acct.blob.core.windows.net/c/b?se=2026&sp=r&sig=a%2Bb%3D", "a%2Bb%3D"),
        ("DefaultEndpointsProtocol=http;AccountName=a;AccountKey=Eby8vdM02x==;BlobEndpoint=x", "Eby8vdM02x=="),
        ("{'Authorization': b'AWS4-HMAC-SHA256 Credential=AKIAEXAMPLE/2026/us-east-1/s3'}", "AKIAEXAMPLE"),
        ("{'X-Amz-Security-Token': b'FwoGZXIvYXdzEXAMPLETOKEN'}", "FwoGZXIvYXdzEXAMPLETOKEN"),
        ("{'x-amz-server-side-encryption-customer-key': b'c2VjcmV0a2V5'}", "c2VjcmV0a2V5"),
        ("Authorization: Bearer ya29.a0SECRETTOKEN", "ya29.a0SECRETTOKEN"),
        ("{'x-goog-encryption-key': 'Z29vZ2xlLWtleQ=='}", "Z29vZ2xlLWtleQ=="),
        ("x-ms-encryption-key: YXp1cmUta2V5", "YXp1cmUta2V5"),
        (
            "with params: {'SSECustomerAlgorithm': 'AES256', 'SSECustomerKey': 'c3NlLWMta2V5', 'Bucket': 'b'}",
            "c3NlLWMta2V5",
        ),
        ("{'aws_secret_access_key': 'wJalrXUtnFEMI/K7MDENG'}", "wJalrXUtnFEMI/K7MDENG"),
    ],
)
def test_every_kind_of_credential_is_redacted(text, secret):
    assert secret not in redact(text)
    assert REDACTED in redact(text)


def test_installing_the_filters_twice_adds_one_filter():
    install_log_filters()
    install_log_filters()
    assert sum(isinstance(f, RedactingFilter) for f in logging.getLogger("urllib3.connectionpool").filters) == 1
