"""Retention policies in real process groups (gloo, spawned ranks, moto behind a counting proxy).

The writer's policy decides, with the writer's save times: every rank keeps the same list, and all ranks together
make one upload per kept save and one delete per eviction, even when the other ranks' clocks would decide otherwise.
"""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path

import pytest
import torch.distributed as dist

from ckptcloud.testing.servers import free_port
from tests.distributed.test_process_groups import TIMEOUT_S, _saver, deletes, uploads
from tests.spawning import spawn_ranks_through_proxy

pytestmark = pytest.mark.integration
SCORES = [0.5, 0.4, 0.6, 0.7, 0.2]


def _rank_main(rank: int, world: int, port: int, endpoint: str, bucket: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import warnings
    from datetime import timedelta

    import torch

    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    result: dict = {"rank": rank}
    try:
        from ckptcloud import Checkpoint, _retention
        from ckptcloud.policies import BestN, EveryNSeconds
        from ckptcloud.retry import NO_RETRY

        saves = iter(range(100))
        spacing = 100.0 if rank == 0 else 300.0  # the writer's clock and another one
        _retention.save_time = lambda: 1e9 + spacing * next(saves)  # type: ignore[assignment]
        policy = BestN(1) | EveryNSeconds(250)

        def checkpoint(resume: bool) -> Checkpoint:
            saver = _saver("s3", bucket, endpoint, retry=NO_RETRY, require_empty=False)
            return Checkpoint({"model": torch.nn.Linear(4, 2)}, saver, score_name="acc", keep=policy, resume=resume)

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ckpt = checkpoint(False)
            result["saved"] = [ckpt.save(global_step=step, score=acc) for step, acc in enumerate(SCORES, start=1)]
            resumed = checkpoint(True)
        result["warnings"] = [str(w.message) for w in caught]
        result["state"] = ckpt.state_dict()
        result["resumed_state"] = resumed.state_dict()
        result["guarded"] = sorted(resumed.guarded)
        dist.barrier()
    except BaseException:
        result["crash"] = traceback.format_exc()
    finally:
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
        dist.destroy_process_group()


def test_the_writers_policy_and_clock_decide_for_every_rank(s3_endpoint, s3_bucket, tmp_path):
    world = 2
    results, requests = spawn_ranks_through_proxy(
        _rank_main, world, s3_endpoint.url, lambda proxy: (world, free_port(), proxy, s3_bucket, str(tmp_path)),
        tmp_path, TIMEOUT_S,
    )  # fmt: skip
    writer, other = results
    # the writer's times are 0, 100, 200, 300, 400 s: step 2 is skipped (not best, within 250 s of step 1), step 3
    # is kept as the best, then evicted once step 4 is both the best and 300 s after step 1; step 5 is skipped
    names = ["model_1_acc=0.5000.pt", "model_3_acc=0.6000.pt", "model_4_acc=0.7000.pt"]
    assert writer["saved"] == other["saved"] == [names[0], None, names[1], names[2], None]
    assert writer["state"] == other["state"]
    assert [f for _, f in writer["state"]["_saved"]] == [names[0], names[2]]
    assert writer["state"]["_records"][names[2]] == {"step": 4, "time": 1e9 + 300.0, "score": 0.7}
    assert writer["resumed_state"] == other["resumed_state"] == writer["state"]  # times from the objects' metadata
    assert writer["guarded"] == other["guarded"] == [names[2]]
    assert writer["warnings"] == other["warnings"] == []  # only the clocks differed, not the ranks' inputs
    assert len(uploads(requests)) == 3 and len(deletes(requests)) == 1
