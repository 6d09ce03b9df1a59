"""Fixtures of the fault-injection suite: restartable emulators with persistent data, and the outcome report.

The report collects one entry per scenario (store, fault rate or trial kind, saves attempted/succeeded, objects
lost or partial, faults injected) and is written as JSON at the end of the session to ``$CKPTCLOUD_FAULT_REPORT``
or ``<pytest basetemp>/fault-report.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ckptcloud.testing import servers


@pytest.fixture
def restartable() -> Iterator[Callable[[str], servers.Server]]:
    """``restartable(kind)`` starts a dedicated emulator that keeps its data across a SIGKILL and a restart."""
    made: list[servers.Server] = []
    factories: dict[str, Callable[[], servers.Server]] = {
        "s3": servers.seaweedfs_server,
        "gcs": lambda: servers.fake_gcs_server(persistent=True),
        "azure": servers.azurite_server,
    }

    def make(kind: str) -> servers.Server:
        server = factories[kind]()
        made.append(server)
        return server.start()

    yield make
    for server in made:
        server.stop()


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
