"""Real torch_xla (2.9.0 on the CPU, PJRT_DEVICE=CPU) in its own environment, driven from the main one.

Collected only when ``CKPTCLOUD_XLA_PYTHON`` names that environment's python (``scripts/test.sh --xla`` and
``.ci/run`` set it up with ``scripts/xla_env.sh``; it downloads ~4 GB once).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from ckptcloud import serialization
from ckptcloud.testing.faultproxy import FaultProxy

pytestmark = pytest.mark.integration
WORKER = Path(__file__).with_name("xla_worker.py")


def run_worker(*args: str, extra_env: dict[str, str] | None = None) -> list[dict]:
    env = {**os.environ, "PJRT_DEVICE": "CPU", **(extra_env or {})}
    out = subprocess.run(
        [os.environ["CKPTCLOUD_XLA_PYTHON"], str(WORKER), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_xla_tensors_reach_storage_as_cpu_tensors(s3_endpoint, s3_client, s3_bucket, tmp_path):
    [report] = run_worker("single", s3_endpoint.url, s3_bucket, str(tmp_path))
    trained = torch.tensor(report["weight"])
    body = s3_client.get_object(Bucket=s3_bucket, Key=f"xla/{report['s3']}")["Body"].read()
    for name, data in (("s3", body), ("disk", (tmp_path / report["disk"]).read_bytes())):
        # this process has no torch_xla: without map_location, XLA tensors would not load at all
        state = torch.load(io.BytesIO(data), weights_only=True)
        assert state["model"]["weight"].device.type == "cpu", name
        assert torch.allclose(state["model"]["weight"], trained), name
        assert "momentum_buffer" in state["optimizer"]["state"][0], name
        path = tmp_path / f"{name}.pt"
        path.write_bytes(data)
        serialization.load(path, map_location=None)  # the integrity trailer checks out too


def test_two_xla_ranks_one_upload_both_return(s3_endpoint, s3_bucket):
    puts: list[str] = []
    upstream = int(s3_endpoint.url.rsplit(":", 1)[1])
    record = lambda n, method, target: puts.append(target) if method == "PUT" else None  # noqa: E731
    with FaultProxy(upstream, on_request=record) as proxy:
        reports = run_worker("ranks", proxy.endpoint, s3_bucket, extra_env={"CPU_NUM_DEVICES": "2"})
    assert sorted(r["ordinal"] for r in reports) == [0, 1]
    assert all(r["returned"] and r["world"] == 2 for r in reports)
    assert [t for t in puts if "/ranks/" in t] == [f"/{s3_bucket}/ranks/model.pt"]
