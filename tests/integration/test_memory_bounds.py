"""Peak memory of a save and a load, each measured in a fresh process against the real S3 server.

Save: extra peak RSS stays under ``(max_concurrency + 2) * part_size + 64 MiB`` whatever the checkpoint size
(the naive BytesIO approach needs the whole checkpoint again). Load: the peak, loaded tensors included, stays
under 1.1x the checkpoint (a download buffer plus tensors would be 2x), plus about 1.5 MiB per ranged GET in flight
(each reading thread's buffers, kept by the allocator after the load: ~45 MiB at the default 32).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration
MiB = 1024 * 1024

PROBE = r"""
import json, os, sys, torch
from ckptcloud.savers import S3Saver

def kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

mode, endpoint, bucket, size_mib, part_mib, conc, load_conc = sys.argv[1:8]
options = {"load_concurrency": int(load_conc)} if load_conc != "default" else {}
saver = S3Saver(bucket, "mem", endpoint_url=endpoint, region_name="us-east-1", part_size=int(part_mib) << 20,
                max_concurrency=int(conc), require_empty=False, **options)
if mode == "save":
    n = int(size_mib) // 64
    state = {f"t{i}": torch.randn(64 << 18) for i in range(n)}
    before = kib("VmHWM")
    saver(state, "probe.pt")
    print(json.dumps({"extra": kib("VmHWM") - before}))
else:
    before = kib("VmRSS")
    state = saver.load("probe.pt")
    nbytes = sum(t.nbytes for t in state.values())
    print(json.dumps({"extra": kib("VmHWM") - before, "nbytes": nbytes, "load_concurrency": saver.load_concurrency}))
"""


def probe(
    mode: str, endpoint: str, bucket: str, size_mib: int, part_mib: int, conc: int, load_conc: str = "default"
) -> dict:
    env = {**os.environ, "AWS_ENDPOINT_URL_S3": endpoint}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode, endpoint, bucket, str(size_mib), str(part_mib), str(conc), load_conc],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_save_and_load_peak_memory_are_bounded(s3_endpoint, s3_bucket):
    size_mib, part_mib, conc = 256, 8, 4
    saved = probe("save", s3_endpoint.url, s3_bucket, size_mib, part_mib, conc)
    bound = ((conc + 2) * part_mib + 64) * MiB
    assert saved["extra"] < bound, f"save used {saved['extra'] / MiB:.0f} MiB extra, bound {bound / MiB:.0f} MiB"
    loaded = probe("load", s3_endpoint.url, s3_bucket, size_mib, part_mib, conc, load_conc=str(conc))
    assert loaded["nbytes"] == size_mib * MiB
    assert loaded["extra"] <= 1.1 * loaded["nbytes"], f"load peaked at {loaded['extra'] / MiB:.0f} MiB"
    loaded = probe("load", s3_endpoint.url, s3_bucket, size_mib, part_mib, conc, load_conc="32")  # a far default
    assert loaded["load_concurrency"] == 32 and loaded["nbytes"] == size_mib * MiB
    bound = 1.1 * loaded["nbytes"] + 2 * MiB * loaded["load_concurrency"]
    assert loaded["extra"] <= bound, f"load peaked at {loaded['extra'] / MiB:.0f} MiB, bound {bound / MiB:.0f} MiB"
