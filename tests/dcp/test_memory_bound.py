"""Per-rank peak memory of a sharded save stays within the single-file bound, whatever the shard size.

Each probe is a fresh process that saves its state with ``dcp.save`` through :class:`CloudStorageWriter` to the
real S3 server (moto) and reports its peak RSS on top of the state: the writer streams every file through the same
part pipeline as single-file saves, ``(max_concurrency + 2) * part_size + 64 MiB`` at most, and a larger shard (or
one tensor larger than that bound) does not raise it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("numpy", reason="torch.distributed.checkpoint needs numpy (ckptcloud[dcp])")
pytestmark = pytest.mark.integration
MiB = 1024 * 1024
PART_MIB, CONCURRENCY = 8, 4

PROBE = r"""
import json, sys, warnings
import torch
import torch.distributed.checkpoint as dcp
from ckptcloud.dcp import CloudStorageWriter

warnings.simplefilter("ignore")

def kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

url, endpoint, tensor_mib, count, part_mib, conc = sys.argv[1:7]
state = {f"layer{i}": torch.randn(int(tensor_mib) << 18) for i in range(int(count))}
writer = CloudStorageWriter(url, endpoint_url=endpoint, region_name="us-east-1", part_size=int(part_mib) << 20,
                            max_concurrency=int(conc))
before = kib("VmHWM")
dcp.save(state, storage_writer=writer, no_dist=True)
print(json.dumps({"extra": kib("VmHWM") - before, "nbytes": sum(t.nbytes for t in state.values())}))
"""


def probe(url: str, endpoint: str, tensor_mib: int, count: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, url, endpoint, str(tensor_mib), str(count), str(PART_MIB), str(CONCURRENCY)],
        capture_output=True, text=True, timeout=300, env=dict(os.environ), check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(("tensor_mib", "count"), [(32, 4), (64, 6), (256, 1)], ids=["128MiB", "384MiB", "one-256MiB"])
def test_a_ranks_peak_extra_memory_while_saving_stays_within_the_single_file_bound(
    s3_endpoint, s3_bucket, tensor_mib, count
):
    url = f"s3://{s3_bucket}/mem-{tensor_mib}x{count}"
    saved = probe(url, s3_endpoint.url, tensor_mib, count)
    assert saved["nbytes"] == tensor_mib * count * MiB
    bound = ((CONCURRENCY + 2) * PART_MIB + 64) * MiB  # 112 MiB: less than the shard in every case
    assert saved["extra"] < bound, f"saving {tensor_mib * count} MiB took {saved['extra'] / MiB:.0f} MiB extra"
