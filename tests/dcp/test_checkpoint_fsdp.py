"""A real FSDP2 model (``fully_shard`` on CPU, gloo, world 2) with Adam, checkpointed by
``Checkpoint(..., sharded=True, n_saved=2, score_name=...)`` to S3 (moto) with async saves, resumed into world 1
bit-identically; and resumed into world 2 again, where training and retention go on.

Each rank saves only its shards of the parameters and of Adam's state; exactly ``n_saved`` committed folders
remain; one process then rebuilds the kept list from S3 and loads whole tensors (DCP reshards). The ranks, the
:class:`StoreSpec` they build their saver from, and the checks are shared with ``test_checkpoint_fsdp_clouds.py``
(blocking saves at world 2 and 4 on SeaweedFS, fake-gcs-server and Azurite).
"""

from __future__ import annotations

import json
import os
import traceback
from dataclasses import dataclass
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


@dataclass(frozen=True)
class StoreSpec:
    """Where the ranks save, picklable into spawned ranks (each builds its own client from it).

    ``kind``: ``"s3"``, ``"gcs"`` or ``"azure"``; ``endpoint``: the S3 or GCS endpoint URL, or Azure's connection
    string; ``bucket``: the bucket or container; ``api_version``: Azure's storage REST version (Azurite's).
    """

    kind: str
    endpoint: str
    bucket: str
    api_version: str = ""

    def saver(self):
        """A saver of the prefix ``fsdp/`` on this store (GCS: an anonymous client on the emulator)."""
        from ckptcloud.retry import Retry
        from ckptcloud.savers import AzureBlobSaver, GCSSaver, S3Saver

        retry = Retry(max_attempts=2, initial_backoff=0.01)
        if self.kind == "s3":
            return S3Saver(
                self.bucket,
                "fsdp",
                endpoint_url=self.endpoint,
                region_name="us-east-1",
                require_empty=False,
                retry=retry,
            )
        if self.kind == "gcs":
            from google.auth.credentials import AnonymousCredentials
            from google.cloud import storage

            options = {"api_endpoint": self.endpoint}
            client = storage.Client(project="test", credentials=AnonymousCredentials(), client_options=options)
            return GCSSaver(self.bucket, "fsdp", client=client, require_empty=False, retry=retry)
        assert self.kind == "azure", self.kind
        return AzureBlobSaver(
            self.bucket,
            "fsdp",
            connection_string=self.endpoint,
            api_version=self.api_version,
            require_empty=False,
            retry=retry,
        )


def shard(model: torch.nn.Module, world: int) -> None:
    """FSDP2 over every rank of the group: each linear layer, then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _rank_main(rank: int, world: int, port: int, spec: StoreSpec, out: str, scenario: str) -> None:
    """One FSDP2 rank. ``train``/``async``: 3 steps, each saved with its score, full state recorded after each;
    ``resume``: load the best kept checkpoint, compare, train one more step and save it; ``load``: load each kept
    checkpoint in turn (resharded when the saving world differed) and compare with the full state recorded."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import warnings
    from datetime import timedelta

    import torch.distributed as dist

    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    result: dict = {"rank": rank}
    try:
        from ckptcloud import Checkpoint

        model, _ = build()
        shard(model, world)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        local_rows = model[0].weight.to_local().shape[0]
        result["sharded"] = local_rows == 32 // world
        ckpt = Checkpoint(
            {"model": model, "optimizer": optimizer},
            spec.saver(),
            sharded=True,
            n_saved=2,
            score_name="acc",
            resume=scenario in ("resume", "load"),
            async_save=scenario == "async",
        )
        if scenario == "load":
            result["resumed"] = ckpt.state_dict()["_saved"]
            result["equal"] = {}
            for step, name in ((2, "checkpoint_2_acc=0.9000"), (3, "checkpoint_3_acc=0.7000")):
                ckpt.load_objects({"model": model, "optimizer": optimizer}, name)
                state = full_state(model, optimizer)  # collective: every rank gathers
                if rank == 0:
                    result["equal"][step] = tensors_equal(
                        state, torch.load(Path(out, f"full_{step}.pt"), weights_only=True)
                    )
            dist.barrier()
            return
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


def run_ranks(world: int, spec: StoreSpec, tmp_path: Path, scenario: str = "train") -> list[dict]:
    """Spawn ``world`` FSDP2 ranks running ``scenario`` against ``spec``; their results (``tmp_path``: shared)."""
    for old in tmp_path.glob("rank*.json"):
        old.unlink()  # a crashed rank must not pass for one of an earlier run
    args = (world, free_port(), spec, str(tmp_path), scenario)
    return spawn_ranks(_rank_main, world, args, tmp_path, TIMEOUT_S * max(1, world // 2))


KEPT = [[0.7, "checkpoint_3_acc=0.7000"], [0.9, "checkpoint_2_acc=0.9000"]]  # the best two of SCORES, by score


def check_trained(results: list[dict], world: int, folders: dict[str, list[str]]) -> None:
    """What a ``train`` run must leave: every rank held 1/world of each parameter and follows the writer's kept
    list; the store holds exactly those ``n_saved`` folders (``folders``: :func:`folder_census`), each committed
    and holding one data file per rank and nothing else (no leftover parts)."""
    assert all(r["sharded"] for r in results)  # each rank held 1/world of every parameter
    assert [r["kept"] for r in results] == [KEPT] * world  # every rank follows the writer's decision
    assert set(folders) == {name for _, name in KEPT}  # exactly n_saved folders: step 1's is gone whole
    for name, files in folders.items():
        data = sorted(file.split("_")[2] for file in files if file.endswith(".distcp"))
        assert data == [str(rank) for rank in range(world)], f"{name}: {files}"  # one data file per rank
        assert len(files) == world + 1 and ".metadata" in files, f"{name}: {files}"  # committed, nothing else


def check_resumes_into_world_1(spec: StoreSpec, tmp_path: Path) -> None:
    """One process, plain modules and whole tensors: resume rebuilds the kept list from the store, and both kept
    checkpoints load bit-identically to the full state recorded at their save (DCP reshards)."""
    from ckptcloud import Checkpoint

    model, optimizer = build()
    objects = {"model": model, "optimizer": optimizer}
    ckpt = Checkpoint(objects, spec.saver(), sharded=True, n_saved=2, score_name="acc", resume=True)
    assert [[p, f] for p, f in ckpt.state_dict()["_saved"]] == KEPT
    full = {step: torch.load(tmp_path / f"full_{step}.pt", weights_only=True) for step in (2, 3)}
    assert not tensors_equal(full[2], full[3])  # the two kept checkpoints tell apart which one was loaded
    for step, name in ((2, ckpt.last_checkpoint), (3, "checkpoint_3_acc=0.7000")):
        ckpt.load_objects(objects, name)
        assert tensors_equal(full_state(model, optimizer), full[step]), f"step {step} differs"


def s3_folders(client: object, bucket: str) -> dict[str, list[str]]:
    """:func:`folder_census` of an S3 bucket, listed with ``client``."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="fsdp/")  # type: ignore[attr-defined]
    return folder_census([o["Key"] for page in pages for o in page.get("Contents", [])])


def folder_census(keys: list[str]) -> dict[str, list[str]]:
    """``{folder directly under fsdp/: the names of its files}`` among ``keys`` (a listing of the store)."""
    folders: dict[str, list[str]] = {}
    for key in keys:
        _, folder, file = key.split("/", 2)
        folders.setdefault(folder, []).append(file)
    return folders


def test_fsdp2_world_2_async_sharded_checkpoints_keep_n_saved_and_resume_into_world_1_bit_identically(
    s3_endpoint, s3_bucket, s3_client, tmp_path
):
    """``async_save=True``; the same with blocking saves, at world 2 and 4 on each store, is in
    ``test_checkpoint_fsdp_clouds.py``."""
    spec = StoreSpec("s3", s3_endpoint.url, s3_bucket)
    results = run_ranks(2, spec, tmp_path, "async")
    check_trained(results, 2, s3_folders(s3_client, s3_bucket))
    check_resumes_into_world_1(spec, tmp_path)


def test_fsdp2_world_2_resumes_its_own_sharded_checkpoints_bit_identically_and_retention_goes_on(
    s3_endpoint, s3_bucket, s3_client, tmp_path
):
    spec = StoreSpec("s3", s3_endpoint.url, s3_bucket)
    run_ranks(2, spec, tmp_path)
    results = run_ranks(2, spec, tmp_path, "resume")
    assert [r["resumed"] for r in results] == [KEPT, KEPT]
    assert results[0]["equal"]  # every rank's shards of the model and of Adam's state, as saved
    after = [[0.9, "checkpoint_2_acc=0.9000"], [0.95, "checkpoint_4_acc=0.9500"]]
    assert [r["kept"] for r in results] == [after, after]
    assert set(s3_folders(s3_client, s3_bucket)) == {name for _, name in after}
