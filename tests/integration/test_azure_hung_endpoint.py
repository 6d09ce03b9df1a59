"""An Azure endpoint that accepts connections but never answers is given up on in bounded time, with a message
that names it (never its SAS) and a log line per retry; metadata requests wait less than data transfers."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import torch
from azure.core.pipeline.transport import RequestsTransport

from ckptcloud.errors import TransientError
from ckptcloud.retry import Retry
from ckptcloud.savers import AzureBlobSaver
from ckptcloud.stores import azure
from tests.conftest import AZURITE_API_VERSION

pytestmark = pytest.mark.integration
FAKE_SAS = "sv=2025-01-05&se=2030-01-01T00%3A00%3A00Z&sr=c&sp=rwdl&sig=TOPSECRETSIGNATURE0123456789%3D"


class SilentServer:
    """Accepts every TCP connection on 127.0.0.1 and never sends a byte: a hung proxy or load balancer."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port = self.listener.getsockname()[1]
        self.connections: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:  # closed
                return
            self.connections.append(conn)

    def close(self) -> None:
        self.listener.close()
        for conn in self.connections:
            conn.close()


@pytest.fixture
def silent() -> Iterator[SilentServer]:
    server = SilentServer()
    yield server
    server.close()


def test_a_silent_endpoint_fails_the_constructor_in_bounded_time_naming_it_without_its_sas(silent, monkeypatch, caplog):
    monkeypatch.setattr(azure, "METADATA_READ_TIMEOUT", 0.5)
    caplog.set_level(logging.INFO, logger="ckptcloud")
    endpoint = f"http://127.0.0.1:{silent.port}"
    start = time.monotonic()
    with pytest.raises(TransientError) as raised:
        AzureBlobSaver("ckpts", "run", account_url=f"{endpoint}/devstoreaccount1?{FAKE_SAS}",
                       api_version=AZURITE_API_VERSION, retry=Retry(max_attempts=3, initial_backoff=0.01))  # fmt: skip
    elapsed = time.monotonic() - start
    message = str(raised.value)
    assert message == f"no answer from {endpoint} within 0.5 s (checking the container az://ckpts)"
    assert elapsed < 5, f"gave up after {elapsed:.1f} s"
    assert len(silent.connections) == 3  # one connection per attempt: the SDK's own retries are off
    retries = [r for r in caplog.records if r.name == "ckptcloud" and "retrying" in r.getMessage()]
    assert len(retries) == 2 and all(r.levelno >= logging.INFO and endpoint in r.getMessage() for r in retries)
    assert "TOPSECRET" not in caplog.text + repr(raised.value) + str(raised.value.__cause__)


def test_metadata_requests_wait_less_than_block_uploads_and_downloads(azure_endpoint, azure_container, monkeypatch):
    """Every request's effective timeouts, recorded at the transport: the read timeout is short for the container
    check, HEAD, listing and delete, the data timeout for blocks, the commit and ranged downloads (which before
    were 300 s, azure-core's default: a transport passed to the client ignored the client's timeouts)."""
    monkeypatch.setattr(azure, "METADATA_READ_TIMEOUT", 7)
    monkeypatch.setattr(azure, "DATA_READ_TIMEOUT", 99)
    monkeypatch.setattr(azure, "CONNECT_TIMEOUT", 3)
    seen: list[tuple[str, str, float]] = []
    connect: set[float] = set()
    send = RequestsTransport.send

    def recording_send(self, request, **kwargs):
        query = request.url.split("?", 1)[1] if "?" in request.url else ""
        kind = next((p.split("=")[1] for p in query.split("&") if p.startswith("comp=")), "")
        seen.append((request.method, kind, kwargs.get("read_timeout", self.connection_config.read_timeout)))
        connect.add(kwargs.get("connection_timeout", self.connection_config.timeout))
        return send(self, request, **kwargs)

    monkeypatch.setattr(RequestsTransport, "send", recording_send)
    saver = AzureBlobSaver(
        azure_container, "run", connection_string=azure_endpoint.url, api_version=AZURITE_API_VERSION, part_size=1 << 20
    )
    saver({"w": torch.randn(3 << 18)}, "model_1.pt")  # 3 MiB: blocks and a commit
    saver.load("model_1.pt")
    saver.list()
    saver.remove("model_1.pt")
    timeouts: dict[tuple[str, str], set[float]] = {}
    for method, kind, timeout in seen:
        timeouts.setdefault((method, kind), set()).add(timeout)
    assert timeouts == {
        ("GET", "list"): {7},  # the container check and the listings
        ("PUT", "block"): {99},
        ("PUT", "blocklist"): {99},
        ("HEAD", ""): {7},  # the load's size and version
        ("GET", ""): {99},  # ranged downloads
        ("DELETE", ""): {7},
    }
    assert connect == {3}
