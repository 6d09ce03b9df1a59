"""A fault-injecting HTTP/1.1 proxy on loopback for tests: 503s, connection resets, stalls, latency, bandwidth caps.

It doubles as a WAN simulator for benchmarks: ``latency`` per request and ``connection_bandwidth`` per connection
(what a real cloud applies to each TCP stream), where the kernel offers no ``netem``.

Each request is drawn against the rates with a seeded RNG: ``error`` answers ``503 SlowDown`` without forwarding;
``reset`` resets the connection (RST) before forwarding; ``reset_mid`` forwards, then resets in the middle of the
response (the server did the work, the client never hears it); ``stall`` sleeps ``stall_seconds``, then forwards.
Keep-alive, ``Expect: 100-continue`` and chunked bodies work; bodies stream through, never buffered whole.

Example:
    >>> with FaultProxy(upstream_port=9000, seed=1, error=0.1, reset=0.05) as proxy:  # doctest: +SKIP
    ...     client = make_s3_client(endpoint_url=proxy.endpoint)
    ...     proxy.clear_faults()  # a clean network for verification reads
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
from typing import BinaryIO

FAULTS = ("error", "reset", "reset_mid", "stall")
_BODY_503 = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
_CHUNK = 256 * 1024


class _Cut(ConnectionResetError):
    """Stop relaying a response midway (``reset_mid``)."""


class _Throttle:
    """A byte-rate cap in one direction, for every connection or one (``None``: no cap)."""

    def __init__(self, rate: float | None) -> None:
        self.rate, self._next, self._lock = rate, 0.0, threading.Lock()

    def take(self, nbytes: int) -> None:
        if self.rate:
            with self._lock:
                now = time.monotonic()
                self._next = max(self._next, now) + nbytes / self.rate
                wait = self._next - now
            time.sleep(min(wait, 60.0))


class FaultProxy:
    """Proxy from ``127.0.0.1:port`` (picked free at ``start``) to the upstream ``127.0.0.1:upstream_port``.

    Args:
        upstream_port: the server's port on 127.0.0.1.
        seed: seed of the RNG that draws the faults.
        stall_seconds: how long a ``stall`` sleeps (at most 60).
        latency: seconds added before each request is forwarded (a WAN round trip).
        bandwidth: bytes per second per direction, shared by all connections (``None``: unlimited).
        connection_bandwidth: bytes per second per direction for each client connection on its own.
        on_request: ``fn(number, method, target)``, called in the proxy's thread as each request arrives.
        **rates: probability per request of each fault in :data:`FAULTS` (their sum at most 1).

    ``counters`` counts ``requests``, ``forwarded``, each fault, ``upstream_down`` (the server refused the
    connection) and ``broken`` (a connection failed while relaying); the client's connection is then reset.
    ``log`` keeps ``(method, target, fault)`` of the last 10,000 requests.
    """

    def __init__(
        self,
        upstream_port: int,
        *,
        seed: int = 0,
        stall_seconds: float = 0.5,
        latency: float = 0.0,
        bandwidth: float | None = None,
        connection_bandwidth: float | None = None,
        on_request: Callable[[int, str, str], None] | None = None,
        idle_timeout: float = 120.0,
        **rates: float,
    ) -> None:
        self.upstream_port, self.stall_seconds, self.latency = upstream_port, min(stall_seconds, 60.0), latency
        self.on_request, self.idle_timeout = on_request, idle_timeout
        self._up, self._down = _Throttle(bandwidth), _Throttle(bandwidth)
        self.connection_bandwidth = connection_bandwidth
        self._rng, self._lock, self._rates = random.Random(seed), threading.Lock(), dict.fromkeys(FAULTS, 0.0)
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
        """Change fault probabilities at runtime; kinds not named keep theirs."""
        with self._lock:
            new = {**self._rates, **rates}
            if set(new) != set(FAULTS) or min(new.values()) < 0 or sum(new.values()) > 1:
                raise ValueError(f"rates should be some of {FAULTS}, each >= 0, summing to <= 1; given {rates}")
            self._rates = new

    def clear_faults(self) -> None:
        self.set_rates(**dict.fromkeys(FAULTS, 0.0))

    def start(self) -> FaultProxy:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._spawn(self._accept_loop)
        return self

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:  # shutdown wakes a thread blocked reading the socket; close alone does not
            for step in (lambda s=sock: s.shutdown(socket.SHUT_RDWR), sock.close):
                try:
                    step()
                except OSError:
                    pass
        for thread in list(self._threads):
            thread.join(timeout=5)
        if self._listener is not None:
            self._listener.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --------------------------------------------------------------------------------------------- internals
    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        self._threads = [t for t in self._threads if t.is_alive()]
        self._threads.append(threading.Thread(target=target, args=args, daemon=True, name="faultproxy"))
        self._threads[-1].start()

    def _count(self, name: str, sock: socket.socket | None = None, track: bool | None = None) -> None:
        with self._lock:
            if name:
                self.counters[name] += 1
            if sock is not None:
                (self._sockets.add if track else self._sockets.discard)(sock)

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()  # type: ignore[union-attr]
            except OSError:  # the 0.2 s timeout, or the listener closed
                continue
            conn.settimeout(self.idle_timeout)
            self._count("", conn, True)
            self._spawn(self._serve, conn)

    def _serve(self, conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        throttles = (_Throttle(self.connection_bandwidth), _Throttle(self.connection_bandwidth))  # up, down
        try:
            for _ in range(1_000_000):  # requests on one keep-alive connection
                if self._stopping.is_set() or not self._one_request(conn, reader, throttles):
                    break
        except (OSError, ValueError, IndexError):  # a broken or malformed exchange ends the connection
            pass
        finally:
            reader.close()  # the real close (with SO_LINGER 0 after a reset: the RST) happens here
            conn.close()
            self._count("", conn, False)

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

    def _one_request(self, conn: socket.socket, reader: BinaryIO, throttles: tuple[_Throttle, _Throttle]) -> bool:
        """Handle one request; False when the connection should end."""
        line = reader.readline(65536)
        if not line.strip():
            return False
        method, target = [*line.decode("latin-1").split(" "), "", ""][:2]
        raw_headers, headers = _read_head(reader)
        number, kind = self._draw()
        self.log.append((method, target, kind))
        if self.on_request is not None:
            self.on_request(number, method, target)
        if "100-continue" in headers.get("expect", "").lower():
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        keep = "close" not in headers.get("connection", "").lower()
        if kind in ("error", "reset"):
            _copy_body(reader, headers, lambda data: None)
            if kind == "reset":
                raise _reset(conn)
            close = b"" if keep else b"Connection: close\r\n"
            conn.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n%sContent-Length: %d\r\n\r\n%s"
                         % (close, len(_BODY_503), _BODY_503))  # fmt: skip
            return keep
        time.sleep(self.latency + (self.stall_seconds if kind == "stall" else 0.0))
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=self.idle_timeout)
        except OSError:
            self._count("upstream_down")
            raise _reset(conn) from None
        self._count("", upstream, True)
        try:
            head = b"".join([line, *(h for h in raw_headers if not h.lower().startswith(b"expect:")), b"\r\n"])
            cut = kind == "reset_mid"
            return self._forward(conn, reader, upstream, head, headers, method, cut, throttles) and keep
        except OSError as err:
            self._count("" if isinstance(err, _Cut) else "broken")
            raise _reset(conn) from None
        finally:
            upstream.close()
            self._count("", upstream, False)

    def _forward(self, conn: socket.socket, reader: BinaryIO, upstream: socket.socket, head: bytes,
                 headers: dict[str, str], method: str, cut: bool,
                 throttles: tuple[_Throttle, _Throttle]) -> bool:  # fmt: skip
        up, down = throttles
        upstream.sendall(head)

        def send_up(data: bytes) -> None:
            self._up.take(len(data))
            up.take(len(data))
            upstream.sendall(data)

        _copy_body(reader, headers, send_up)
        self._count("forwarded")
        with upstream.makefile("rb") as up_reader:  # no 1xx: the Expect header was not forwarded
            status_line = up_reader.readline(65536)
            raw_lines, up_headers = _read_head(up_reader)
            raw, status = b"".join([status_line, *raw_lines]), int(status_line.split()[1])
            has_body = method != "HEAD" and status not in (204, 304)
            length = int(up_headers.get("content-length", "0") or 0)
            chunked = "chunked" in up_headers.get("transfer-encoding", "").lower()
            until_close = has_body and not chunked and "content-length" not in up_headers
            if cut and not (has_body and (length or chunked or until_close)):
                conn.sendall(raw[: len(raw) // 2])  # nothing to cut in the body: cut the head
                raise _Cut()
            conn.sendall(raw + b"\r\n")
            left = [length // 2 if length else 1]

            def send_down(data: bytes) -> None:
                self._down.take(len(data))
                down.take(len(data))
                if cut and len(data) >= left[0]:
                    conn.sendall(data[: left[0]])
                    raise _Cut()
                left[0] -= len(data)
                conn.sendall(data)

            if has_body:
                _copy_body(up_reader, up_headers, send_down, until_close=until_close)
            return not until_close and "close" not in up_headers.get("connection", "").lower()


def _reset(sock: socket.socket) -> ConnectionResetError:
    """Arm SO_LINGER 0, so that closing sends an RST; returns the exception for the caller to raise."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    return ConnectionResetError("connection reset by the fault proxy")


def _read_head(reader: BinaryIO) -> tuple[list[bytes], dict[str, str]]:
    """Header lines as read (to forward) and a lower-cased name -> value view (to frame the body)."""
    lines: list[bytes] = []
    for _ in range(200):
        line = reader.readline(65536)
        if not line:
            raise ConnectionResetError("connection closed inside the head")
        if line in (b"\r\n", b"\n"):
            fields = (h.decode("latin-1").partition(":") for h in lines)
            return lines, {name.strip().lower(): value.strip() for name, _, value in fields}
        lines.append(line)
    raise ValueError("more than 200 header lines")


def _copy_body(reader: BinaryIO, headers: dict[str, str], sink: Callable[[bytes], object], *,
               until_close: bool = False) -> None:  # fmt: skip
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
                        break
                return
            _copy_body(reader, {"content-length": str(size + 2)}, sink)
        return
    left = 1 << 62 if until_close else int(headers.get("content-length", "0") or 0)
    while left > 0:
        data = reader.read1(min(left, _CHUNK))
        if not data and until_close:
            return
        if not data:
            raise ConnectionResetError(f"connection closed with {left} body bytes missing")
        sink(data)
        left -= len(data)
