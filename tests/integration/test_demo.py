"""The README's demo runs end to end against the local S3 server it starts itself."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_demo_keeps_n_saved_and_restores_the_best():
    out = subprocess.run(
        [sys.executable, "-m", "ckptcloud", "demo", "--epochs", "5", "--n-saved", "2"],
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
    ).stdout
    kept = re.findall(r"^  (s3://\S+)  \(val_acc=(\d\.\d{4})\)$", out, flags=re.M)
    assert len(kept) == 2
    best_url, best_score = kept[-1]
    assert f"restored {best_url}: val_acc={best_score}" in out
    assert best_score == max(score for _, score in kept)
