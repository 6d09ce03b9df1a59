"""The benchmark driver runs end to end (``--quick``: SeaweedFS, 64 MiB, one round) and writes its raw rounds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib", reason="the benchmark's plot needs matplotlib (dev extra)")
pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_quick_benchmark_writes_tables_and_every_rounds_raw_numbers(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--quick", "--methods", "ckptcloud,naive,local",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    table = (tmp_path / "bench.md").read_text()
    assert "| ckptcloud | 64 MiB |" in table and "| naive | 64 MiB |" in table
    raw = json.loads((tmp_path / "bench.json").read_text())
    rows = {method: value for method, _, value in raw["stores"]["s3"]["rows"]}
    assert set(rows) == {"ckptcloud", "naive", "local"}
    for row in rows.values():
        assert len(row["runs"]) == 1  # --quick: one round, kept as measured
        assert row["runs"][0]["save"]["s"] > 0 and row["runs"][0]["load"]["s"] > 0
    assert (tmp_path / "bench.png").stat().st_size > 0
