"""Loopback stand-ins for the GCS cases fake-gcs-server cannot express (its 404s never say what is missing, it
answers no 403, and it finishes a resumable upload when asked for its status), and clients for them."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import requests

Answer = tuple[int, dict, object]  # status, headers, body (dict: JSON; bytes; None: drop the connection)
Route = Callable[[str, str, dict, dict, bytes], Answer]


def gcs_error(status: int, message: str) -> Answer:
    return status, {}, {"error": {"code": status, "message": message}}


class Stub:
    """A threaded HTTP server on 127.0.0.1 answering each request with ``route(method, path, query, headers, body)``."""

    def __init__(self, route: Route) -> None:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _any(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                parts = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(parts.query).items()}
                status, headers, payload = route(self.command, parts.path, query, dict(self.headers), body)
                stub.seen.append((self.command, self.path))
                if payload is None:  # no answer at all: the connection closes
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                data = json.dumps(payload).encode() if isinstance(payload, dict) else bytes(payload)  # type: ignore[arg-type]
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _any

            def log_message(self, *args: object) -> None:
                pass

        self.seen: list[tuple[str, str]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Stub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class SilentEndpoint:
    """Accepts TCP connections and never answers (a hung proxy, a load balancer without backends)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                self.held.append(self.listener.accept()[0])
            except OSError:
                continue

    def __enter__(self) -> SilentEndpoint:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        for conn in self.held:
            conn.close()
        self.listener.close()


def client(endpoint: str, credentials: object = None) -> object:
    """A ``google.cloud.storage.Client`` for ``endpoint`` (anonymous unless ``credentials``)."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    credentials = credentials or AnonymousCredentials()
    return storage.Client(project="test", credentials=credentials, client_options={"api_endpoint": endpoint})


class Recorder(requests.adapters.HTTPAdapter):
    """A transport adapter that records each request as it goes out: ``(method, url, headers)``."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[str, str, dict]] = []

    def send(self, request: requests.PreparedRequest, **kwargs: object) -> requests.Response:  # type: ignore[override]
        self.sent.append((str(request.method), str(request.url), dict(request.headers)))
        return super().send(request, **kwargs)  # type: ignore[arg-type]


def recording_client(endpoint: str) -> tuple[object, Recorder]:
    made = client(endpoint)
    recorder = Recorder()
    made._http.mount("http://", recorder)  # type: ignore[attr-defined]
    return made, recorder


def stub_fixture() -> Iterator[Callable[[Route], Stub]]:
    """Yields ``start(route)``; every stub started is stopped afterwards."""
    started: list[Stub] = []

    def start(route: Route) -> Stub:
        stub = Stub(route).__enter__()
        started.append(stub)
        return stub

    yield start
    for stub in started:
        stub.__exit__()


def keys(gcs_client: Any, bucket: str) -> list[str]:
    """Every object name in ``bucket``, sorted."""
    return sorted(blob.name for blob in gcs_client.list_blobs(bucket))


def object_bytes(gcs_client: Any, bucket: str, key: str) -> bytes:
    return gcs_client.bucket(bucket).blob(key).download_as_bytes()
