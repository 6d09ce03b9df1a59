"""A fault-injecting HTTP/1.1 proxy on loopback, for tests: 503s, connection resets, stalls, latency, bandwidth caps.

Put it between an SDK and an emulator (``endpoint_url=proxy.endpoint``). Each request is drawn against the rates
with a seeded RNG: ``error`` answers ``503 SlowDown`` without forwarding; ``reset`` resets the connection (RST)
before forwarding; ``reset_mid`` forwards, then resets in the middle of relaying the response (the server did the
work, the client never hears it); ``stall`` sleeps ``stall_seconds``, then forwards. Keep-alive, ``Expect:
100-continue`` and chunked bodies are handled; bodies are streamed, never buffered whole.

Example:
    >>> with FaultProxy(upstream_port=9000, seed=1, error=0.1) as proxy:  # doctest: +SKIP
    ...     client = make_s3_client(endpoint_url=proxy.endpoint)
    ...     proxy.set_rates(error=0.0)  # a clean network for verification reads
    ...     print(proxy.counters)
"""

from __future__ import annotations

import collections
import random
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, BinaryIO

FAULTS = ("error", "reset", "reset_mid", "stall")
_BODY_503 = b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"  # noqa: E501
_CHUNK = 256 * 1024


class _Cut(ConnectionResetError):
    """Raised by a sink to stop relaying a response midway (``reset_mid``)."""


class _Throttle:
    """A byte-rate cap shared by every connection in one direction (``None``: no cap)."""

    def __init__(self, rate: float | None) -> None:
        self.rate, self._next, self._lock = rate, 0.0, threading.Lock()

    def take(self, nbytes: int) -> None:
        if not self.rate:
            return
        with self._lock:
            now = time.monotonic()
            self._next = max(self._next, now) + nbytes / self.rate
            wait = self._next - now
        time.sleep(min(wait, 60.0))


class FaultProxy:
    """Fault-injecting proxy from ``127.0.0.1:port`` to the upstream ``127.0.0.1:upstream_port``.

    Args:
        upstream_port: the server's port on 127.0.0.1.
        seed: seed of the RNG that draws the faults.
        error, reset, reset_mid, stall: probability of each fault per request (their sum is at most 1).
        stall_seconds: how long a ``stall`` sleeps (at most 60).
        latency: seconds added to every request before it is forwarded (a WAN round trip).
        bandwidth: bytes per second, per direction, shared by every connection (``None``: unlimited).
        on_request: ``fn(number, method, target)`` called in the proxy thread before each request is handled.

    ``counters`` counts ``requests``, ``forwarded``, each fault and ``upstream_down`` (the server refused or broke the
    connection: the client's connection is reset). ``log`` keeps ``(method, target, fault)`` of recent requests.
    """

    def __init__(
        self,
        upstream_port: int,
        *,
        seed: int = 0,
        stall_seconds: float = 0.5,
        latency: float = 0.0,
        bandwidth: float | None = None,
        on_request: Callable[[int, str, str], None] | None = None,
        idle_timeout: float = 120.0,
        **rates: float,
    ) -> None:
        self.upstream_port, self.stall_seconds, self.latency = upstream_port, min(stall_seconds, 60.0), latency
        self.on_request, self.idle_timeout = on_request, idle_timeout
        self._up, self._down = _Throttle(bandwidth), _Throttle(bandwidth)
        self._rng, self._lock = random.Random(seed), threading.Lock()
        self._rates = dict.fromkeys(FAULTS, 0.0)
        self.set_rates(**rates)
        self.counters: collections.Counter[str] = collections.Counter()
        self.log: collections.deque[tuple[str, str, str]] = collections.deque(maxlen=10_000)
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._sockets: set[socket.socket] = set()
        self._stopping = threading.Event()
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set_rates(self, **rates: float) -> None:
        """Change fault probabilities at runtime, e.g. ``set_rates(error=0, reset=0, reset_mid=0, stall=0)``."""
        unknown = set(rates) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; expected some of {FAULTS}")
        with self._lock:
            new = {**self._rates, **rates}
            if any(p < 0 for p in new.values()) or sum(new.values()) > 1:
                raise ValueError(f"fault rates should be >= 0 and sum to at most 1, but given {new}")
            self._rates = new

    def clear_faults(self) -> None:
        self.set_rates(**dict.fromkeys(FAULTS, 0.0))

    def start(self) -> FaultProxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        listener.settimeout(0.2)
        self._listener, self.port = listener, listener.getsockname()[1]
        self._spawn(self._accept_loop)
        return self

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:  # shutdown wakes a thread blocked reading it; close alone does not
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            _close(sock)
        for thread in list(self._threads):
            thread.join(timeout=5)
        if self._listener is not None:
            self._listener.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --------------------------------------------------------------------------------------------- internals
    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True, name="faultproxy")
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    def _track(self, sock: socket.socket, add: bool) -> None:
        with self._lock:
            (self._sockets.add if add else self._sockets.discard)(sock)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            conn.settimeout(self.idle_timeout)
            self._track(conn, True)
            self._spawn(self._serve, conn)

    def _draw(self) -> tuple[int, str]:
        with self._lock:
            self.counters["requests"] += 1
            number, x = self.counters["requests"], self._rng.random()
            for kind in FAULTS:
                x -= self._rates[kind]
                if x < 0:
                    self.counters[kind] += 1
                    return number, kind
        return number, ""

    def _serve(self, conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        try:
            for _ in range(1_000_000):  # requests on one keep-alive connection
                if self._stopping.is_set() or not self._one_request(conn, reader):
                    break
        except (OSError, ValueError):
            pass
        finally:
            reader.close()
            self._track(conn, False)
            _close(conn)

    def _one_request(self, conn: socket.socket, reader: BinaryIO) -> bool:
        """Handle one request; False when the connection should end."""
        line = reader.readline(65536)
        if not line.strip():
            return False
        method, target = [*line.decode("latin-1").split(" "), "", ""][:2]
        raw_headers, headers = _read_headers(reader)
        number, kind = self._draw()
        self.log.append((method, target, kind))
        if self.on_request is not None:
            self.on_request(number, method, target)
        if "100-continue" in headers.get("expect", "").lower():
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        keep = "close" not in headers.get("connection", "").lower()
        if kind in ("error", "reset"):
            _copy_body(reader, headers, lambda data: None, until_close=False)
            if kind == "reset":
                raise _reset(conn)
            head = f"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: {len(_BODY_503)}\r\n"
            conn.sendall(head.encode() + (b"Retry-After: 0\r\n\r\n" if keep else b"Connection: close\r\n\r\n"))
            conn.sendall(_BODY_503)
            return keep
        time.sleep(self.latency + (self.stall_seconds if kind == "stall" else 0.0))
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=self.idle_timeout)
        except OSError:
            self.counters["upstream_down"] += 1
            raise _reset(conn) from None
        self._track(upstream, True)
        try:
            head = b"".join([line, *(h for h in raw_headers if not h.lower().startswith(b"expect:")), b"\r\n"])
            return self._forward(conn, reader, upstream, head, headers, method, kind == "reset_mid") and keep
        except OSError as err:
            if not isinstance(err, _Cut):
                self.counters["upstream_down"] += 1
            raise _reset(conn) from None
        finally:
            self._track(upstream, False)
            _close(upstream)

    def _forward(self, conn: socket.socket, reader: BinaryIO, upstream: socket.socket, head: bytes,
                 headers: dict[str, str], method: str, cut: bool) -> bool:  # fmt: skip
        upstream.sendall(head)

        def send_up(data: bytes) -> None:
            self._up.take(len(data))
            upstream.sendall(data)

        _copy_body(reader, headers, send_up, until_close=False)
        self.counters["forwarded"] += 1
        up_reader = upstream.makefile("rb")
        try:
            for _ in range(10):  # interim 1xx responses, relayed as they come
                status_line = up_reader.readline(65536)
                if not status_line:
                    raise ConnectionResetError("upstream closed before answering")
                raw_lines, up_headers = _read_headers(up_reader)
                raw = b"".join([status_line, *raw_lines])
                status = int(status_line.split()[1])
                if status >= 200:
                    break
                conn.sendall(raw + b"\r\n")
            has_body = method != "HEAD" and status not in (204, 304)
            length = int(up_headers.get("content-length", "0") or 0)
            chunked = "chunked" in up_headers.get("transfer-encoding", "").lower()
            until_close = has_body and not chunked and "content-length" not in up_headers
            if cut and not (has_body and (length or chunked or until_close)):
                conn.sendall(raw[: len(raw) // 2])
                raise _Cut()
            conn.sendall(raw + b"\r\n")
            left = [length // 2 if length else 1] if cut else None

            def send_down(data: bytes) -> None:
                self._down.take(len(data))
                if left is not None and len(data) >= left[0]:
                    conn.sendall(data[: left[0]])
                    raise _Cut()
                if left is not None:
                    left[0] -= len(data)
                conn.sendall(data)

            if has_body:
                _copy_body(up_reader, up_headers, send_down, until_close=until_close)
            return not until_close and "close" not in up_headers.get("connection", "").lower()
        finally:
            up_reader.close()


def _reset(sock: socket.socket) -> ConnectionResetError:
    """Close with SO_LINGER 0: the peer gets an RST. Returns an exception for the caller to raise."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    _close(sock)
    return ConnectionResetError("connection reset by the fault proxy")


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass


def _read_headers(reader: BinaryIO) -> tuple[list[bytes], dict[str, str]]:
    """The raw header lines (for forwarding) and a lower-cased name -> value view (for framing)."""
    lines: list[bytes] = []
    headers: dict[str, str] = {}
    for _ in range(200):
        line = reader.readline(65536)
        if not line:
            raise ConnectionResetError("connection closed inside the headers")
        if line in (b"\r\n", b"\n"):
            return lines, headers
        lines.append(line)
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    raise ValueError("too many header lines")


def _copy_body(reader: BinaryIO, headers: dict[str, str], sink: Callable[[bytes], None], *, until_close: bool) -> None:
    """Pass a message body to ``sink`` as its raw bytes (chunk framing included)."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        for _ in range(10_000_000):
            size_line = reader.readline(65536)
            if not size_line:
                raise ConnectionResetError("connection closed inside a chunked body")
            sink(size_line)
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                for _ in range(200):  # trailer fields, then the empty line
                    trailer = reader.readline(65536)
                    sink(trailer)
                    if trailer in (b"\r\n", b"\n", b""):
                        return
                return
            _copy_exact(reader, size + 2, sink)
        return
    if until_close:
        for _ in range(100_000_000):
            data = reader.read1(_CHUNK)
            if not data:
                return
            sink(data)
        return
    _copy_exact(reader, int(headers.get("content-length", "0") or 0), sink)


def _copy_exact(reader: BinaryIO, nbytes: int, sink: Callable[[bytes], None]) -> None:
    while nbytes > 0:
        data = reader.read1(min(nbytes, _CHUNK))
        if not data:
            raise ConnectionResetError(f"connection closed with {nbytes} body bytes missing")
        sink(data)
        nbytes -= len(data)
