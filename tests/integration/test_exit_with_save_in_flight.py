"""A script that ends while an async save is still uploading: the save is finished before Python exits.

CPython stops ``concurrent.futures`` thread pools before ``atexit`` hooks run; an upload with parts left to send
used to fail there ("cannot schedule new futures after interpreter shutdown") and the process still exited 0.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from ckptcloud import S3Saver
from ckptcloud.stores.base import MiB

pytestmark = pytest.mark.integration

SCRIPT = textwrap.dedent(
    """
    import sys, time, torch
    from ckptcloud import Checkpoint, S3Saver
    from ckptcloud.stores.s3 import S3Store

    endpoint, bucket, mode = sys.argv[1:4]
    sent = []
    put_part = S3Store.put_part

    def slow_put_part(self, upload, number, data):
        time.sleep(0.3)
        if mode == "fail" and number == 4:
            raise PermissionError("bucket policy changed")
        sent.append(number)
        return put_part(self, upload, number, data)

    S3Store.put_part = slow_put_part
    torch.manual_seed(0)
    model = torch.nn.Linear(1024, 8 * 1024)  # 32 MiB: 7 parts of 5 MiB, one at a time
    saver = S3Saver(bucket, "exit", endpoint_url=endpoint, region_name="us-east-1", part_size=5 * 1024 * 1024,
                    max_concurrency=1)
    ckpt = Checkpoint({"model": model}, saver, async_save=True)
    ckpt.save(global_step=1)
    print(f"parts sent when the script ended: {len(sent)}", flush=True)
    """
)


def run(endpoint: str, bucket: str, mode: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, endpoint, bucket, mode], capture_output=True, text=True, timeout=120
    )


def test_a_script_that_ends_mid_upload_leaves_a_complete_checkpoint(s3_endpoint, s3_bucket):
    out = run(s3_endpoint.url, s3_bucket, "ok")
    assert out.returncode == 0, out.stderr
    sent = int(out.stdout.split(":")[1])
    assert sent <= 7 - 3, out.stdout  # at least 3 parts were still to send when the interpreter began to exit
    assert "FAILED" not in out.stderr, out.stderr
    torch.manual_seed(0)
    model = torch.nn.Linear(1024, 8 * 1024)
    saver = S3Saver(s3_bucket, "exit", endpoint_url=s3_endpoint.url, region_name="us-east-1", require_empty=False)
    stored = saver.load("model_1.pt")
    assert torch.equal(stored["weight"], model.weight.detach()) and torch.equal(stored["bias"], model.bias.detach())
    assert saver.store.list_incomplete("exit/") == []
    assert saver.describe()["model_1.pt"].size > 32 * MiB


def test_a_save_that_fails_at_exit_says_so_on_stderr_and_publishes_nothing(s3_endpoint, s3_bucket):
    out = run(s3_endpoint.url, s3_bucket, "fail")
    assert "ckptcloud: saving model_1.pt FAILED at interpreter exit: bucket policy changed" in out.stderr
    assert "not stored" in out.stderr
    saver = S3Saver(s3_bucket, "exit", endpoint_url=s3_endpoint.url, region_name="us-east-1", require_empty=False)
    assert saver.list() == [] and saver.store.list_incomplete("exit/") == []
