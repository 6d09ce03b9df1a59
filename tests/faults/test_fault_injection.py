"""Fault injection against real emulators: what a flaky network, a dying server or a killed trainer may do to a save.

Three invariants, for S3 (moto / SeaweedFS), GCS (fake-gcs-server) and Azure (Azurite):

- through a network that answers 503, resets connections (before the request, or after the server did the work but
  in the middle of its answer) and stalls, every save succeeds and loads back bit-identical;
- a server SIGKILLed mid-upload fails the save with a clear, retryable error in bounded time; after a restart
  nothing is visible at the new key and an older checkpoint loads intact;
- a saving process SIGKILLed mid-upload publishes nothing; older checkpoints stay intact.

Outcome numbers go to stdout (``pytest -s``) and to a JSON report (see ``tests/faults/conftest.py``).
"""

from __future__ import annotations

import http.client
import http.server
import io
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch

from ckptcloud.errors import CkptcloudError
from ckptcloud.remote import RemoteSaver
from ckptcloud.retry import Retry
from ckptcloud.stores.base import MiB
from ckptcloud.testing.faultproxy import FAULTS, FaultProxy

STORES = ["s3", "gcs", "azure"]
PART_SIZE = {"s3": 5 * MiB, "gcs": 2 * MiB, "azure": 1 * MiB}
AZURITE_API_VERSION = "2025-11-05"
FAST_RETRY = Retry(max_attempts=10, initial_backoff=0.01, max_backoff=0.2)
SHORT_RETRY = Retry(max_attempts=3, initial_backoff=0.05, max_backoff=0.2, deadline=5)
SAVES_PER_RATE = {"gcs": 3}  # others 5; fake-gcs-server is the slowest emulator through the proxy
KILL_TRIALS = 10


def state(seed: int, mib: int = 12) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(mib * MiB // 4, generator=g), "b": torch.randn(7, generator=g), "step": seed}


def torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def rates(total: float) -> dict[str, float]:
    """``total`` fault probability per request: 40 % 503s, 25 % resets before, 25 % resets mid-answer, 10 % stalls."""
    return {"error": 0.4 * total, "reset": 0.25 * total, "reset_mid": 0.25 * total, "stall": 0.1 * total}


def port_of(url: str) -> int:
    host_port = url.split("://", 1)[1].split("/", 1)[0]
    assert host_port.rsplit(":", 1)[0] in ("127.0.0.1", "localhost"), f"the proxy reaches loopback only, not {url}"
    return int(host_port.rsplit(":", 1)[1])


# ------------------------------------------------------------------------------------------ savers via a proxy
def s3_saver(bucket: str, endpoint: str, *, fail_fast: bool = False, **options: Any) -> RemoteSaver:
    """The library's own client (SDK retries off, metadata/data read timeouts), or one built here with SDK retries
    off and short timeouts (``fail_fast``)."""
    from ckptcloud.savers import S3Saver
    from ckptcloud.stores.s3 import make_s3_client

    if not fail_fast:
        client = make_s3_client(endpoint_url=endpoint, region_name="us-east-1", max_concurrency=8)
    else:
        import boto3
        from botocore.config import Config

        config = Config(
            retries={"mode": "standard", "max_attempts": 1}, connect_timeout=2, read_timeout=10,
            s3={"addressing_style": "path"}, max_pool_connections=10,
        )  # fmt: skip
        client = boto3.session.Session().client("s3", endpoint_url=endpoint, region_name="us-east-1", config=config)
    return S3Saver(bucket, "run", client=client, part_size=PART_SIZE["s3"], **options)


def gcs_client(endpoint: str) -> Any:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    return storage.Client(project="test", credentials=AnonymousCredentials(), client_options={"api_endpoint": endpoint})


def gcs_saver(bucket: str, endpoint: str, **options: Any) -> RemoteSaver:
    from ckptcloud.savers import GCSSaver

    return GCSSaver(bucket, "run", client=gcs_client(endpoint), part_size=PART_SIZE["gcs"], **options)


def azure_connection_string(endpoint: str) -> str:
    from ckptcloud.testing.servers import AZURITE_ACCOUNT, AZURITE_KEY

    return (
        f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
        f"BlobEndpoint={endpoint}/{AZURITE_ACCOUNT};"
    )


def azure_saver(container: str, endpoint: str, **options: Any) -> RemoteSaver:
    """A client with the SDK's own retries off (``retry_total=0``, as the clients ckptcloud builds have): the
    pipeline's ``Retry`` does all retrying."""
    from azure.storage.blob import ContainerClient

    from ckptcloud.savers import AzureBlobSaver

    client = ContainerClient.from_connection_string(
        azure_connection_string(endpoint), container, api_version=AZURITE_API_VERSION,
        retry_total=0, connection_timeout=5, read_timeout=30,
    )  # fmt: skip
    return AzureBlobSaver(container, "run", container_client=client, part_size=PART_SIZE["azure"], **options)


@dataclass
class Target:
    """One store's bucket, the upstream port a proxy forwards to, and how to make a saver through an endpoint."""

    kind: str
    bucket: str
    port: int
    make: Callable[..., RemoteSaver]  # make(endpoint, **options)


def session_target(kind: str, request: pytest.FixtureRequest) -> Target:
    if kind.startswith("s3"):
        bucket = request.getfixturevalue("s3_bucket")
        url = request.getfixturevalue("s3_endpoint").url
        fail_fast = kind == "s3-sdk-retries-off"
        return Target(
            kind, bucket, port_of(url), lambda endpoint, **kw: s3_saver(bucket, endpoint, fail_fast=fail_fast, **kw)
        )
    if kind == "gcs":
        bucket = request.getfixturevalue("gcs_bucket")
        url = request.getfixturevalue("gcs_endpoint").url
        return Target(kind, bucket, port_of(url), lambda endpoint, **kw: gcs_saver(bucket, endpoint, **kw))
    container = request.getfixturevalue("azure_container")
    connection_string = request.getfixturevalue("azure_endpoint").url
    url = dict(p.split("=", 1) for p in connection_string.split(";") if "=" in p)["BlobEndpoint"]
    return Target(kind, container, port_of(url), lambda endpoint, **kw: azure_saver(container, endpoint, **kw))


# ------------------------------------------------------------------------------------------ the proxy itself
class _Upstream(http.server.BaseHTTPRequestHandler):
    """GET /n: n bytes (chunked when n is odd); PUT: answers the body's length. Keep-alive (HTTP/1.1)."""

    protocol_version = "HTTP/1.1"
    seen: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.seen.append(f"GET {self.path}")
        size = int(self.path.strip("/"))
        body = bytes(range(256)) * (size // 256) + bytes(size % 256)
        self.send_response(200)
        if size % 2:
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(0, size, 100_000):
                piece = body[i : i + 100_000]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.send_header("Content-Length", str(size))
            self.end_headers()
            self.wfile.write(body)

    def do_PUT(self) -> None:
        self.seen.append(f"PUT {self.path}")
        answer = str(len(self.rfile.read(int(self.headers["Content-Length"])))).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: object) -> None:
        pass


def test_the_proxy_relays_faithfully_over_keep_alive_and_injects_each_fault_as_the_client_sees_it():
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    upstream.handle_error = lambda request, address: None  # type: ignore[method-assign]  # resets are the point
    serving = threading.Thread(target=upstream.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    serving.start()
    try:
        with FaultProxy(upstream.server_address[1], seed=1, stall_seconds=0.3, bandwidth=16 * MiB) as proxy:
            conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
            for size in (0, 1_000_001, 2 * MiB):  # one connection: keep-alive, chunked, content-length
                conn.request("GET", f"/{size}")
                body = conn.getresponse().read()
                assert len(body) == size and body[:512] == (bytes(range(256)) * 2)[: min(size, 512)]
            started = time.monotonic()
            conn.request("PUT", "/part", body=b"x" * (2 * MiB))
            assert conn.getresponse().read() == str(2 * MiB).encode()
            assert time.monotonic() - started >= 0.1  # 2 MiB at 16 MiB/s
            for kind, effect in [("error", "503"), ("reset", "reset before the answer"), ("reset_mid", "cut body")]:
                proxy.set_rates(**{kind: 1.0})
                seen = len(_Upstream.seen)
                conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
                outcome = "reset before the answer"
                try:
                    conn.request("GET", "/300000")
                    response = conn.getresponse()
                    outcome = str(response.status) if response.status != 200 else "cut body"
                    if response.status == 200:
                        outcome = "whole body" if len(response.read()) == 300000 else "short body"
                except (ConnectionError, http.client.IncompleteRead):
                    pass
                assert outcome == effect, (kind, outcome)
                assert len(_Upstream.seen) - seen == (1 if kind == "reset_mid" else 0), kind  # forwarded or not
                proxy.clear_faults()
            proxy.set_rates(stall=1.0)
            started = time.monotonic()
            conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
            conn.request("GET", "/10")
            assert conn.getresponse().read() == bytes(10) and time.monotonic() - started >= 0.3
            assert proxy.counters["requests"] == 8 and proxy.counters["forwarded"] == 6
            assert all(proxy.counters[kind] == 1 for kind in FAULTS)
    finally:
        upstream.shutdown()
        upstream.server_close()


def test_the_wan_proxy_caps_each_connection_on_its_own_and_delays_each_request():
    """What a cloud does to each TCP stream: one connection is capped, two in parallel get twice the bytes."""
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    serving = threading.Thread(target=upstream.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    serving.start()
    size, rate, latency = 4 * MiB, 4 * MiB, 0.2

    def fetch(port: int, seconds: list[float]) -> None:
        started = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", f"/{size}")
        assert len(conn.getresponse().read()) == size
        seconds.append(time.monotonic() - started)

    try:
        with FaultProxy(upstream.server_address[1], latency=latency, connection_bandwidth=rate) as proxy:
            alone: list[float] = []
            fetch(proxy.port, alone)
            assert alone[0] >= latency + size / rate * 0.95  # 1 s of bytes plus the request's latency
            together: list[float] = []
            started = time.monotonic()
            threads = [threading.Thread(target=fetch, args=(proxy.port, together)) for _ in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=30)
            both = time.monotonic() - started
            assert len(together) == 2 and min(together) >= size / rate * 0.95
            assert both < latency + 2 * size / rate * 0.9, both  # a shared cap would need 2 s of bytes for both
    finally:
        upstream.shutdown()
        upstream.server_close()


# ------------------------------------------------------------------------------ a. saves through a faulty network
@pytest.mark.integration
@pytest.mark.parametrize("rate", [0.1, 0.3], ids=["faults10pct", "faults30pct"])
@pytest.mark.parametrize("kind", [*STORES, "s3-sdk-retries-off"])  # the last: the pipeline's Retry alone copes
def test_every_save_through_a_faulty_network_succeeds_and_loads_bit_identical(
    kind, rate, request, fault_report, caplog
):
    caplog.set_level(logging.WARNING, logger="ckptcloud")
    target = session_target(kind, request)
    seed = 1000 * len(kind) + int(rate * 100)
    started = time.monotonic()
    with FaultProxy(target.port, seed=seed, stall_seconds=0.2) as proxy:
        saver = target.make(proxy.endpoint, retry=FAST_RETRY, max_concurrency=4)
        proxy.set_rates(**rates(rate))
        failures: list[str] = []
        originals: dict[str, bytes] = {}
        saves = SAVES_PER_RATE.get(kind, 5)
        for i in range(saves):
            name, obj = f"model_{i}.pt", state(seed + i, mib=12 + 2 * i)
            originals[name] = torch_bytes(obj)
            try:
                saver(obj, name)
                if torch_bytes(saver.load(name)) != originals[name]:  # the load goes through the faults too
                    failures.append(f"{name}: loaded bytes differ")
            except Exception as err:
                failures.append(f"{name}: {type(err).__name__}: {err}")
        injected = {kind_: proxy.counters[kind_] for kind_ in FAULTS}
        requests = proxy.counters["requests"]
        proxy.clear_faults()  # verification over a clean network
        listed = saver.list()
        lost = [name for name in originals if name not in listed]
        partial = [n for n in originals if n in listed and torch_bytes(saver.load(n)) != originals[n]]
    retries = sum("retrying in" in r.getMessage() for r in caplog.records)
    entry = {
        "test": "faulty_network", "store": kind, "fault_rate": rate, "saves_attempted": saves,
        "saves_succeeded": saves - len(failures), "objects_lost": len(lost), "objects_partial": len(partial),
        "requests": requests, "faults_injected": injected, "pipeline_retries": retries,
        "seconds": round(time.monotonic() - started, 1), "failures": failures,
    }  # fmt: skip
    fault_report.append(entry)
    print(
        f"\n[faults] {kind} rate={rate:.0%}: saves {entry['saves_succeeded']}/{saves} ok, "
        f"lost {len(lost)}, partial {len(partial)}, {requests} requests, faults {injected}, "
        f"pipeline retries {retries}, {entry['seconds']} s"
    )
    assert not failures
    assert not lost and not partial
    assert sum(injected.values()) > 0, "the proxy injected no fault: the test proved nothing"
    assert injected["error"] + injected["reset"] + injected["reset_mid"] > 0


# ---------------------------------------------------------------------------- b. the server dies mid-upload
def direct_bucket(kind: str, endpoint: str, connection_string: str = "") -> str:
    """A new bucket made straight on the server (not through a proxy)."""
    name = f"ckpt-{uuid.uuid4().hex[:16]}"
    if kind == "s3":
        from ckptcloud.stores.s3 import make_s3_client

        make_s3_client(endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    elif kind == "gcs":
        gcs_client(endpoint).create_bucket(name)
    else:
        from azure.storage.blob import BlobServiceClient

        service = BlobServiceClient.from_connection_string(connection_string, api_version=AZURITE_API_VERSION)
        service.create_container(name)
    return name


def leftovers(kind: str, saver: RemoteSaver, names: list[str]) -> int:
    """Traces of failed uploads the store keeps, seen with the SDK (all invisible to ``saver.list()``): S3 incomplete
    multipart uploads, GCS temporary part objects, Azure uncommitted blocks."""
    prefix = f"{saver.prefix}/"
    if kind == "s3":
        response = saver.store.client.list_multipart_uploads(Bucket=saver.store.bucket, Prefix=prefix)
        return len(response.get("Uploads", []))
    if kind == "gcs":  # temporary part objects of uploads never composed
        return sum("/.ckptcloud-tmp/" in f"/{info.key}" for info in saver.store.list(prefix))
    from azure.core.exceptions import ResourceNotFoundError

    count = 0
    for name in names:
        try:
            _, uncommitted = saver.store.client.get_blob_client(saver.key(name)).get_block_list("uncommitted")
        except ResourceNotFoundError:
            continue
        count += len(uncommitted)
    return count


def until_ready(fn: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    """``fn()`` retried (bounded) while a just-restarted server still refuses requests."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except (ConnectionError, TimeoutError) as err:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: server not serving {timeout:.0f} s after its restart") from err
            time.sleep(0.1)


def cleanup_incomplete(saver: RemoteSaver) -> str:
    """Call ``RemoteSaver.cleanup_incomplete()`` where the library has it; say which."""
    if not hasattr(saver, "cleanup_incomplete"):
        return "missing"
    saver.cleanup_incomplete(older_than=0)
    return "called"


@pytest.mark.integration
@pytest.mark.parametrize("kind", STORES)
def test_a_server_killed_mid_upload_fails_the_save_fast_and_publishes_nothing_and_keeps_older_checkpoints(
    kind, restartable, fault_report, monkeypatch
):
    if kind == "gcs":
        # The GCS adapter wraps each request in google's DEFAULT_RETRY (120 s budget, 1 s first backoff) and offers no
        # knob: against a dead endpoint a save then takes minutes and ends in an unmapped RetryError. Turning the SDK's
        # retries off (as for S3 and Azure below) leaves all retrying to the pipeline's ``Retry``.
        from google.cloud.storage.retry import DEFAULT_RETRY

        monkeypatch.setattr(DEFAULT_RETRY, "_predicate", lambda err: False)
    server = restartable(kind)
    bucket = direct_bucket(kind, server.endpoint, server.extra.get("connection_string", ""))
    options = {"retry": SHORT_RETRY, "max_concurrency": 2, "require_empty": False}
    with FaultProxy(server.port, seed=7, bandwidth=20 * MiB) as proxy:  # no faults: it counts, throttles and kills
        endpoint = proxy.endpoint
        saver = (
            s3_saver(bucket, endpoint, fail_fast=True, **options) if kind == "s3"
            else gcs_saver(bucket, endpoint, **options) if kind == "gcs"
            else azure_saver(bucket, endpoint, **options)
        )  # fmt: skip
        old = state(99, mib=6)
        saver(old, "old.pt")
        if kind == "azure":  # Azurite writes its metadata to disk on a ~5 s timer or at exit: flush it now
            server.stop(remove_data=False)
            server.start()
        trials: list[dict] = []
        for trial in range(KILL_TRIALS):
            name = f"model_{trial}.pt"
            base = proxy.counters["requests"]
            killed_after: list[int] = []  # requests the proxy had seen in this trial when the server died

            def kill(base: int = base, killed_after: list[int] = killed_after) -> None:
                killed_after.append(proxy.counters["requests"] - base)
                server.kill()

            timer = None
            if trial % 2 == 0:  # as the k-th request of the save arrives, before it reaches the server (k = 1..5)
                at = base + 1 + (trial // 2) % 5
                proxy.on_request = lambda number, method, target, at=at, kill=kill: kill() if number == at else None
                how = f"at request {at - base}"
            else:  # at a random moment; the throttle makes the save last >= 0.8 s
                delay = random.Random(100 * STORES.index(kind) + trial).uniform(0.05, 0.5)
                timer = threading.Timer(delay, kill)
                how = f"after {delay:.2f} s"
            outcome: dict[str, Any] = {}

            def save(name: str = name, trial: int = trial, outcome: dict = outcome) -> None:
                try:
                    saver(state(trial, mib=16), name)
                except Exception as err:
                    outcome["error"] = err

            started = time.monotonic()
            thread = threading.Thread(target=save, daemon=True)
            thread.start()
            if timer is not None:
                timer.start()
            thread.join(timeout=60)
            elapsed = time.monotonic() - started
            proxy.on_request = None
            if timer is not None:
                timer.cancel()
            assert not thread.is_alive(), f"trial {trial} (killed {how}): the save hangs"
            error = outcome.get("error")
            assert killed_after, f"trial {trial}: the server was never killed ({how})"
            assert error is not None, f"trial {trial}: the save succeeded although the server was killed {how}"
            assert isinstance(error, (ConnectionError, CkptcloudError)), f"trial {trial}: unclear error {error!r}"
            assert f"{saver.store.scheme}://{bucket}" in str(error), f"trial {trial}: {error} names no object"
            assert elapsed < 30, f"trial {trial}: the save took {elapsed:.1f} s to fail"
            server.start()
            listed = until_ready(saver.list, "listing")
            assert name not in listed and "old.pt" in listed, listed
            with pytest.raises(FileNotFoundError):
                saver.store.head(saver.key(name))
            loaded = until_ready(lambda: saver.load("old.pt"), "loading")  # SeaweedFS: 500s until volumes are back
            assert torch_bytes(loaded) == torch_bytes(old), f"trial {trial}: old.pt changed"
            trials.append(
                {"killed": how, "requests_before_kill": killed_after[0], "seconds_to_fail": round(elapsed, 2),
                 "error": f"{type(error).__name__}: {str(error)[:160]}"}
            )  # fmt: skip
        names = [f"model_{t}.pt" for t in range(KILL_TRIALS)]
        left = leftovers(kind, saver, names)
        incomplete = len(saver.store.list_incomplete(f"{saver.prefix}/"))
        cleanup = cleanup_incomplete(saver)
        left_after_cleanup = leftovers(kind, saver, names) if cleanup == "called" else None
        assert sorted(saver.list()) == ["old.pt"]
    entry = {
        "test": "server_killed", "store": kind, "server": server.name, "trials": len(trials),
        "saves_failed_cleanly": len(trials), "objects_published": 0, "older_checkpoint_intact": len(trials),
        "max_seconds_to_fail": max(t["seconds_to_fail"] for t in trials), "leftovers": left,
        "incomplete_uploads_listed": incomplete, "cleanup_incomplete": cleanup,
        "leftovers_after_cleanup": left_after_cleanup, "details": trials,
    }  # fmt: skip
    fault_report.append(entry)
    print(
        f"\n[faults] {kind} ({server.name}) killed mid-upload x{len(trials)}: every save raised within "
        f"{entry['max_seconds_to_fail']} s, nothing published, old.pt intact; leftovers {left} "
        f"(cleanup_incomplete {cleanup}{'' if left_after_cleanup is None else f', then {left_after_cleanup}'})"
    )
    if left_after_cleanup is not None:
        assert left_after_cleanup == 0


# ---------------------------------------------------------------------------- c. the saving process dies
CHILD = textwrap.dedent(
    """
    import sys
    import torch
    from ckptcloud.savers import S3Saver
    from ckptcloud.stores.s3 import make_s3_client

    endpoint, bucket, name = sys.argv[1:4]
    client = make_s3_client(endpoint_url=endpoint, region_name="us-east-1")
    saver = S3Saver(bucket, "run", client=client, part_size=5 << 20, max_concurrency=2, require_empty=False)
    state = {"w": torch.randn(40 << 18, generator=torch.Generator().manual_seed(5))}  # 40 MiB: 9 parts
    print("saving", flush=True)
    saver(state, name)
    print("saved", flush=True)
    """
)


@pytest.mark.integration
def test_a_saver_process_killed_mid_upload_publishes_nothing_and_keeps_older_checkpoints(
    s3_endpoint, s3_bucket, tmp_path, fault_report
):
    direct = s3_saver(s3_bucket, s3_endpoint.url, retry=FAST_RETRY)
    old = state(42, mib=6)
    direct(old, "old.pt")
    trials: list[dict] = []
    with FaultProxy(port_of(s3_endpoint.url), seed=3) as proxy:  # no faults: it watches the parts and kills
        for trial, kill_after_parts in enumerate([1, 3, 6]):
            name = f"model_{trial}.pt"
            log = open(tmp_path / f"child-{trial}.log", "wb")
            child = subprocess.Popen(
                [sys.executable, "-c", CHILD, proxy.endpoint, s3_bucket, name], stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
            log.close()
            parts_seen = [0]

            def kill_on_part(number: int, method: str, target: str, child=child, n=kill_after_parts, seen=parts_seen):
                if method == "PUT" and "partNumber=" in target:
                    seen[0] += 1
                    if seen[0] == n + 1:  # n parts sent, the next one arrives: SIGKILL the saver
                        os.kill(child.pid, signal.SIGKILL)

            proxy.on_request = kill_on_part
            try:
                returncode = child.wait(timeout=60)
            finally:
                proxy.on_request = None
                if child.poll() is None:
                    os.kill(child.pid, signal.SIGKILL)
                    child.wait(timeout=10)
            output = (tmp_path / f"child-{trial}.log").read_text(errors="replace")
            assert returncode == -signal.SIGKILL, f"the saver was not killed mid-upload ({returncode}):\n{output}"
            assert "saved" not in output
            listed = direct.list()
            assert name not in listed and "old.pt" in listed, listed
            with pytest.raises(FileNotFoundError):
                direct.store.head(direct.key(name))
            assert torch_bytes(direct.load("old.pt")) == torch_bytes(old)
            trials.append({"killed_after_parts": kill_after_parts, "parts_seen": parts_seen[0]})
    left = leftovers("s3", direct, [])
    cleanup = cleanup_incomplete(direct)
    left_after_cleanup = leftovers("s3", direct, []) if cleanup == "called" else None
    entry = {
        "test": "saver_killed", "store": "s3", "server": "moto_server", "trials": len(trials), "objects_published": 0,
        "older_checkpoint_intact": len(trials), "incomplete_uploads_left": left, "cleanup_incomplete": cleanup,
        "incomplete_uploads_after_cleanup": left_after_cleanup, "details": trials,
    }  # fmt: skip
    fault_report.append(entry)
    print(
        f"\n[faults] s3 saver process SIGKILLed mid-upload x{len(trials)}: nothing published, old.pt intact; "
        f"incomplete multipart uploads left {left} (cleanup_incomplete {cleanup}"
        f"{'' if left_after_cleanup is None else f', then {left_after_cleanup}'})"
    )
    assert left == len(trials), "every killed save leaves exactly one incomplete multipart upload"
    if left_after_cleanup is not None:
        assert left_after_cleanup == 0
