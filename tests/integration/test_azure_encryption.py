"""AzureBlobSaver's encryption options reach every request that needs them, on Azurite.

Azurite accepts ``x-ms-encryption-scope`` and customer-provided keys but does not encrypt with them (a blob written
with a key reads back without it), so these tests check what the emulator can show: the headers on each request,
recorded with the SDK's ``raw_request_hook``, and whole save/load cycles. CPK needs HTTPS (the SDK refuses to send
a key over http), so its test runs a second Azurite with a self-signed certificate.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import hashlib
import ipaddress
import os
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from azure.storage.blob import ContainerClient, CustomerProvidedEncryptionKey
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ckptcloud import Checkpoint
from ckptcloud.savers import AzureBlobSaver
from ckptcloud.stores.azure import AzureBlobStore
from ckptcloud.testing import servers
from tests.conftest import AZURITE_API_VERSION
from tests.helpers import torch_bytes

MiB = 1024 * 1024
pytestmark = pytest.mark.integration
KEY = {"account_name": servers.AZURITE_ACCOUNT, "account_key": servers.AZURITE_KEY}


class Recorder:
    """A ``raw_request_hook``: (method, ``comp=`` or ``restype=`` of the query, encryption headers) of each request."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, str]]] = []

    def __call__(self, pipeline_request) -> None:
        request = pipeline_request.http_request
        query = request.url.split("?", 1)[1] if "?" in request.url else ""
        fields = dict(p.split("=", 1) for p in query.split("&") if "=" in p)
        comp = fields.get("comp") or fields.get("restype", "")  # "": a blob request; "container": create etc.
        headers = {k.lower(): v for k, v in request.headers.items() if k.lower().startswith("x-ms-encryption")}
        self.requests.append((request.method, comp, headers))

    def kinds(self) -> set[tuple[str, str]]:
        return {(method, comp) for method, comp, _ in self.requests}


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, as PEM files (valid one day)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
    return cert_file, key_file


@pytest.fixture(scope="module")
def https_azurite(tmp_path_factory) -> Iterator[tuple[str, str]]:
    """An Azurite serving HTTPS: (blob endpoint, CA file that verifies it)."""
    cert, key = self_signed_certificate(tmp_path_factory.mktemp("tls"))
    server = servers.azurite_server()
    server.argv += ["--cert", str(cert), "--key", str(key)]
    server.endpoint = server.endpoint.replace("http://", "https://")
    server.ready_url = server.ready_url.replace("http://", "https://")
    before = os.environ.get("SSL_CERT_FILE")
    os.environ["SSL_CERT_FILE"] = str(cert)  # for the readiness check's urllib
    try:
        server.start()
    finally:
        if before is None:
            del os.environ["SSL_CERT_FILE"]
        else:
            os.environ["SSL_CERT_FILE"] = before
    try:
        yield server.endpoint, str(cert)
    finally:
        server.stop()


def customer_key() -> CustomerProvidedEncryptionKey:
    raw = os.urandom(32)
    return CustomerProvidedEncryptionKey(
        base64.b64encode(raw).decode(), base64.b64encode(hashlib.sha256(raw).digest()).decode()
    )


def cycle(saver: AzureBlobSaver) -> None:
    """A one-request save, a multi-block save, loads of both, retention, a listing and a resume."""
    small, big = {"w": torch.ones(4)}, {"w": torch.randn(3 * MiB // 4)}  # a few bytes; 3 MiB: blocks + commit
    saver(small, "small.pt")
    saver(big, "big.pt")
    assert torch_bytes(saver.load("small.pt")) == torch_bytes(small)
    assert torch_bytes(saver.load("big.pt")) == torch_bytes(big)
    net = torch.nn.Linear(2, 2)
    ckpt = Checkpoint({"model": net}, saver, n_saved=1)
    ckpt.save(global_step=1)
    ckpt.save(global_step=2)  # deletes model_1.pt
    assert saver.list() == ["big.pt", "model_2.pt", "small.pt"]
    assert Checkpoint({"model": net}, saver, n_saved=1, resume=True).last_checkpoint == "model_2.pt"


def test_the_encryption_scope_is_named_on_every_write_and_on_nothing_else(azure_endpoint, azure_container):
    recorder = Recorder()
    client = ContainerClient.from_connection_string(
        azure_endpoint.url, azure_container, api_version=AZURITE_API_VERSION, raw_request_hook=recorder
    )
    saver = AzureBlobSaver(azure_container, "run", container_client=client, encryption_scope="ckpt-scope",
                           part_size=1 * MiB)  # fmt: skip
    cycle(saver)
    writes = [(m, c, h) for m, c, h in recorder.requests if m == "PUT"]
    assert {(m, c) for m, c, _ in writes} == {("PUT", ""), ("PUT", "block"), ("PUT", "blocklist")}
    assert all(h == {"x-ms-encryption-scope": "ckpt-scope"} for _, _, h in writes), writes
    others = [(m, c, h) for m, c, h in recorder.requests if m != "PUT"]
    assert {("GET", "list"), ("HEAD", ""), ("GET", ""), ("DELETE", "")} <= {(m, c) for m, c, _ in others}
    assert not any(h for _, _, h in others), others


def test_a_customer_provided_key_goes_with_every_write_and_read_over_https(https_azurite, monkeypatch):
    endpoint, ca_file = https_azurite
    recorder = Recorder()
    container = f"ckpt-{os.urandom(6).hex()}"
    client = ContainerClient(endpoint, container, credential=KEY, api_version=AZURITE_API_VERSION,
                             connection_verify=ca_file, raw_request_hook=recorder)  # fmt: skip
    client.create_container()
    cpk = customer_key()
    saver = AzureBlobSaver(container, "run", container_client=client, cpk=cpk, part_size=1 * MiB)
    cycle(saver)
    needs_key = {("PUT", ""), ("PUT", "block"), ("PUT", "blocklist"), ("HEAD", ""), ("GET", "")}
    assert needs_key <= recorder.kinds()
    sent = {"x-ms-encryption-key": cpk.key_value, "x-ms-encryption-key-sha256": cpk.key_hash,
            "x-ms-encryption-algorithm": "AES256"}  # fmt: skip
    for method, comp, headers in recorder.requests:
        if (method, comp) in needs_key:
            assert headers == sent, (method, comp)
        else:  # listing, delete, container requests: no key needed, none sent
            assert not headers, (method, comp)
    # Azure lists CPK-encrypted blobs without their metadata (Azurite does not): resume then HEADs each, with the key
    original = AzureBlobStore.list
    strip = lambda self, prefix: [dataclasses.replace(i, metadata={}) for i in original(self, prefix)]  # noqa: E731
    monkeypatch.setattr(AzureBlobStore, "list", strip)
    recorder.requests.clear()
    assert Checkpoint({"model": torch.nn.Linear(2, 2)}, saver, resume=True).last_checkpoint == "model_2.pt"
    heads = [h for m, c, h in recorder.requests if m == "HEAD"]
    assert heads and all(h == sent for h in heads)
    with pytest.raises(FileNotFoundError) as missing:
        saver.load("absent.pt")
    shown = "".join(traceback.format_exception(missing.type, missing.value, missing.tb)) + repr(saver)
    assert cpk.key_value not in shown


def test_encryption_arguments_are_checked_at_construction():
    http_client = ContainerClient(f"http://127.0.0.1:9/{servers.AZURITE_ACCOUNT}", "ckpts", credential=KEY)
    https_client = ContainerClient(f"https://127.0.0.1:9/{servers.AZURITE_ACCOUNT}", "ckpts", credential=KEY)
    cpk = customer_key()
    with pytest.raises(ValueError, match=r"`cpk` needs an https:// endpoint.*http://127\.0\.0\.1:9"):
        AzureBlobSaver("ckpts", container_client=http_client, cpk=cpk)
    with pytest.raises(ValueError, match="either `encryption_scope` or `cpk`, not both"):
        AzureBlobSaver("ckpts", container_client=https_client, cpk=cpk, encryption_scope="scope")
    with pytest.raises(TypeError, match=r"`cpk` should be an azure\.storage\.blob\.CustomerProvidedEncryptionKey"):
        AzureBlobSaver("ckpts", container_client=https_client, cpk=cpk.key_value)
    with pytest.raises(ValueError, match="`encryption_scope` should be a non-empty str"):
        AzureBlobSaver("ckpts", container_client=https_client, encryption_scope="")
