"""A real FSDP2 model (``fully_shard`` on CPU, gloo, world 2) with Adam, checkpointed by
``Checkpoint(..., sharded=True, n_saved=2, score_name=...)`` to S3 (moto), resumed into world 1 bit-identically.

Each rank saves only its shards of the parameters and of Adam's state; exactly ``n_saved`` committed folders
remain; one process then rebuilds the kept list from S3 and loads whole tensors (DCP reshards).
"""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path

import pytest
import torch

from ckptcloud.testing.servers import free_port
from tests.spawning import spawn_ranks

from .helpers import tensors_equal

pytest.importorskip("numpy", reason="torch.distributed.checkpoint needs numpy on every rank (ckptcloud[dcp])")
pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")]
TIMEOUT_S = 180
SCORES = [(1, 0.5), (2, 0.9), (3, 0.7)]  # n_saved=2 keeps steps 2 and 3; step 1 is evicted


def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The same model on every rank (FSDP2 shards it after)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Whole tensors of the model and of Adam's state, named by parameter (collective under FSDP2)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    distributed = torch.distributed.is_initialized()
    options = StateDictOptions(full_state_dict=distributed, cpu_offload=distributed)
    return {
        "model": get_model_state_dict(model, options=options),
        "optimizer": get_optimizer_state_dict(model, optimizer, options=options),
    }


def s3_saver(endpoint: str, bucket: str):
    from ckptcloud import S3Saver
    from ckptcloud.retry import Retry

    return S3Saver(
        bucket,
        "fsdp",
        endpoint_url=endpoint,
        region_name="us-east-1",
        require_empty=False,
        retry=Retry(max_attempts=2, initial_backoff=0.01),
    )


def _rank_main(rank: int, world: int, port: int, endpoint: str, bucket: str, out: str, scenario: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import warnings
    from datetime import timedelta

    import torch.distributed as dist

    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    result: dict = {"rank": rank}
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from ckptcloud import Checkpoint

        model, _ = build()
        mesh = init_device_mesh("cpu", (world,))
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        local_rows = model[0].weight.to_local().shape[0]
        result["sharded"] = local_rows == 32 // world
        ckpt = Checkpoint(
            {"model": model, "optimizer": optimizer},
            s3_saver(endpoint, bucket),
            sharded=True,
            n_saved=2,
            score_name="acc",
            resume=scenario == "resume",
            async_save=scenario == "async",
        )
        if scenario == "resume":  # world 2 again: load the best kept checkpoint into the shards, go on training
            result["resumed"] = ckpt.state_dict()["_saved"]
            ckpt.load_objects({"model": model, "optimizer": optimizer}, ckpt.last_checkpoint)
            state = full_state(model, optimizer)
            if rank == 0:
                result["equal"] = tensors_equal(state, torch.load(Path(out, "full_2.pt"), weights_only=True))
            model(torch.ones(8, 16)).pow(2).sum().backward()
            optimizer.step()
            result["names"] = [ckpt.save(global_step=4, score=0.95)]
            result["kept"] = ckpt.state_dict()["_saved"]
            dist.barrier()
            return
        generator = torch.Generator().manual_seed(1)
        names = []
        for step, acc in SCORES:
            model(torch.randn(8, 16, generator=generator)).pow(2).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
            names.append(ckpt.save(global_step=step, score=acc))
            state = full_state(model, optimizer)
            if rank == 0:
                torch.save(state, Path(out, f"full_{step}.pt"))
        ckpt.close()  # async: the last upload is committed and its evictions done
        result["names"] = names
        result["kept"] = ckpt.state_dict()["_saved"]
        dist.barrier()
    except BaseException:
        result["crash"] = traceback.format_exc()
    finally:
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
        dist.destroy_process_group()


def run_ranks(world: int, endpoint: str, bucket: str, tmp_path: Path, scenario: str = "train") -> list[dict]:
    args = (world, free_port(), endpoint, bucket, str(tmp_path), scenario)
    return spawn_ranks(_rank_main, world, args, tmp_path, TIMEOUT_S)


@pytest.mark.parametrize("scenario", ["train", "async"])
def test_fsdp2_world_2_sharded_checkpoints_keep_n_saved_and_resume_into_world_1_bit_identically(
    s3_endpoint, s3_bucket, s3_client, tmp_path, scenario
):
    results = run_ranks(2, s3_endpoint.url, s3_bucket, tmp_path, scenario)
    assert all(r["sharded"] for r in results)  # each rank held half of every parameter
    kept = [[0.7, "checkpoint_3_acc=0.7000"], [0.9, "checkpoint_2_acc=0.9000"]]
    assert [r["kept"] for r in results] == [kept, kept]  # every rank follows the writer's decision
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=s3_bucket, Prefix="fsdp/").get("Contents", [])]
    assert {key.split("/")[1] for key in keys} == {name for _, name in kept}  # exactly n_saved folders
    data = [key for key in keys if key.startswith("fsdp/checkpoint_2_acc=0.9000/") and key.endswith(".distcp")]
    assert len(data) == 2  # one file per rank

    from ckptcloud import Checkpoint

    model, optimizer = build()  # world 1: plain modules, whole tensors
    ckpt = Checkpoint(
        {"model": model, "optimizer": optimizer},
        s3_saver(s3_endpoint.url, s3_bucket),
        sharded=True,
        n_saved=2,
        score_name="acc",
        resume=True,
    )
    assert [[p, f] for p, f in ckpt.state_dict()["_saved"]] == kept
    full = {step: torch.load(tmp_path / f"full_{step}.pt", weights_only=True) for step in (2, 3)}
    assert not tensors_equal(full[2], full[3])  # the two kept checkpoints tell apart which one was loaded
    for step, name in ((2, ckpt.last_checkpoint), (3, "checkpoint_3_acc=0.7000")):
        ckpt.load_objects({"model": model, "optimizer": optimizer}, name)
        assert tensors_equal(full_state(model, optimizer), full[step]), f"step {step} differs"


def test_fsdp2_world_2_resumes_its_own_sharded_checkpoints_bit_identically_and_retention_goes_on(
    s3_endpoint, s3_bucket, s3_client, tmp_path
):
    run_ranks(2, s3_endpoint.url, s3_bucket, tmp_path)
    results = run_ranks(2, s3_endpoint.url, s3_bucket, tmp_path, "resume")
    kept = [[0.7, "checkpoint_3_acc=0.7000"], [0.9, "checkpoint_2_acc=0.9000"]]
    assert [r["resumed"] for r in results] == [kept, kept]
    assert results[0]["equal"]  # every rank's shards of the model and of Adam's state, as saved
    after = [[0.9, "checkpoint_2_acc=0.9000"], [0.95, "checkpoint_4_acc=0.9500"]]
    assert [r["kept"] for r in results] == [after, after]
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=s3_bucket, Prefix="fsdp/").get("Contents", [])]
    assert {key.split("/")[1] for key in keys} == {name for _, name in after}
