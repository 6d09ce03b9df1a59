"""``dcp.async_save`` in process mode: DCP pickles the writer into its checkpoint process, which rebuilds the client.

Run in a fresh interpreter: process mode needs an initialized process group and leaves a daemon process behind.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("numpy", reason="torch.distributed.checkpoint needs numpy on every rank (ckptcloud[dcp])")
pytestmark = pytest.mark.integration

SCRIPT = textwrap.dedent(
    """
    import json, os, sys, warnings
    import torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
    from ckptcloud.dcp import CloudStorageReader, CloudStorageWriter
    from ckptcloud.testing.servers import free_port

    warnings.simplefilter("ignore")
    endpoint, url = sys.argv[1], sys.argv[2]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    options = {"endpoint_url": endpoint, "region_name": "us-east-1"}
    state = {"w": torch.arange(1000.0), "step": 5}
    future = dcp.async_save(state, storage_writer=CloudStorageWriter(url, **options),
                            async_checkpointer_type=AsyncCheckpointerType.PROCESS)
    future.result(timeout=240)
    loaded = {"w": torch.zeros(1000), "step": 0}
    dcp.load(loaded, storage_reader=CloudStorageReader(url, **options))
    print("RESULT " + json.dumps({"equal": torch.equal(loaded["w"], state["w"]), "step": loaded["step"]}))
    """
)


def test_async_save_in_process_mode_commits_through_a_pickled_writer(s3_endpoint, s3_bucket, s3_client):
    url = f"s3://{s3_bucket}/process/step-5"
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, s3_endpoint.url, url], capture_output=True, text=True, timeout=300, check=False
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    result = json.loads(lines[0][len("RESULT ") :])
    assert result == {"equal": True, "step": 5}
    keys = sorted(o["Key"] for o in s3_client.list_objects_v2(Bucket=s3_bucket)["Contents"])
    assert keys[0] == "process/step-5/.metadata" and len(keys) == 2
