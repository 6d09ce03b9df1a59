"""Real multi-rank sharded saves: spawned gloo ranks with DTensor shards, against moto through a counting proxy.

World 2 saves; world 2 loads back (each rank reads only its own bytes; rank 0 alone reads ``.metadata``), and this
process loads the same checkpoint into whole tensors (world 1: DCP reshards). When one rank's upload fails, the
other rank's upload in flight is cancelled, both raise, and nothing is left in the folder.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path

import pytest
import torch

from ckptcloud.testing.servers import free_port
from tests.spawning import spawn_ranks_through_proxy

pytest.importorskip("numpy", reason="torch.distributed.checkpoint needs numpy on every rank (ckptcloud[dcp])")
pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")]
TIMEOUT_S = 180
MiB = 1024 * 1024
ROWS, COLS = 1024, 2048  # 8 MiB of float32: 4 MiB per rank at world 2
SLOW_PART_S = 0.4


def full_state() -> dict[str, torch.Tensor]:
    """The whole tensors every rank shards (the same on every rank)."""
    generator = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(ROWS, COLS, generator=generator),
        "b": torch.randn(ROWS, generator=generator),
        "e": torch.arange(6 * 5, dtype=torch.int64).reshape(6, 5),
    }


def _rank_main(rank: int, world: int, port: int, endpoint: str, bucket: str, scenario: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import warnings
    from datetime import timedelta

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    result: dict = {"rank": rank}
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        from ckptcloud.dcp import CloudStorageReader, CloudStorageWriter
        from ckptcloud.retry import Retry
        from ckptcloud.stores.s3 import S3Store

        mesh = init_device_mesh("cpu", (world,))
        state = {name: distribute_tensor(t, mesh, [Shard(0)]) for name, t in full_state().items()}
        state["step"] = 42
        options = {"endpoint_url": endpoint, "region_name": "us-east-1", "part_size": 5 * MiB, "max_concurrency": 2}
        options["retry"] = Retry(max_attempts=2, initial_backoff=0.01)
        url = f"s3://{bucket}/ranks/step-42"
        reads: list[list] = []
        read = S3Store.read

        def counted_read(self, key, start=0, end=None, *, version=None):
            reads.append([key, start, end])
            return read(self, key, start, end, version=version)

        S3Store.read = counted_read  # type: ignore[method-assign]
        put_part = S3Store.put_part
        parts_sent: list[int] = []
        if scenario == "rank1_fails":
            options["max_concurrency"] = 1

            def failing_or_slow(self, upload, number, data):
                if rank == 1:
                    time.sleep(0.3)  # rank 0 is uploading by now
                    raise PermissionError("AccessDenied: rank 1's credentials expired")
                time.sleep(SLOW_PART_S)
                parts_sent.append(number)
                return put_part(self, upload, number, data)

            S3Store.put_part = failing_or_slow  # type: ignore[method-assign]
            state["w2"] = distribute_tensor(torch.randn(4 * ROWS, COLS), mesh, [Shard(0)])  # 16 MiB per rank
        if scenario == "load_only":  # a checkpoint another world size saved: DCP reshards it into this one
            fresh = {name: distribute_tensor(torch.zeros_like(t), mesh, [Shard(0)]) for name, t in full_state().items()}
            fresh["step"] = 0
            dcp.load(fresh, storage_reader=CloudStorageReader(url, **options))
            expected = {name: distribute_tensor(t, mesh, [Shard(0)]) for name, t in full_state().items()}
            result["loaded_step"] = fresh["step"]
            result["shards_equal"] = all(torch.equal(fresh[n].to_local(), expected[n].to_local()) for n in expected)
            result["reads"] = reads
            dist.barrier()
            return
        start = time.perf_counter()
        try:
            dcp.save(state, storage_writer=CloudStorageWriter(url, **options))
        except BaseException as err:
            result["save_error"] = f"{type(err).__name__}: {err}"
            result["seconds_to_raise"] = time.perf_counter() - start
            result["parts_sent"] = len(parts_sent)
            dist.barrier()
            return
        dist.barrier()
        if scenario == "save_only":
            return
        reads.clear()
        fresh = {name: distribute_tensor(torch.zeros_like(t), mesh, [Shard(0)]) for name, t in full_state().items()}
        fresh["step"] = 0
        dcp.load(fresh, storage_reader=CloudStorageReader(url, **options))
        result["loaded_step"] = fresh["step"]
        result["shards_equal"] = all(
            torch.equal(fresh[name].to_local(), state[name].to_local()) for name in ("w", "b", "e")
        )
        result["reads"] = reads
        dist.barrier()
    except BaseException:
        result["crash"] = traceback.format_exc()
    finally:
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
        dist.destroy_process_group()


def run_ranks(world: int, scenario: str, endpoint: str, bucket: str, tmp_path: Path) -> tuple[list[dict], list[str]]:
    return spawn_ranks_through_proxy(
        _rank_main, world, endpoint, lambda proxy: (world, free_port(), proxy, bucket, scenario, str(tmp_path)),
        tmp_path, TIMEOUT_S,
    )  # fmt: skip


def _objects(client, bucket: str, prefix: str) -> list[dict]:
    return client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])


def test_world_2_save_loads_back_in_world_2_reading_each_byte_once_and_in_world_1_resharded(
    s3_endpoint, s3_bucket, s3_client, tmp_path
):
    results, requests = run_ranks(2, "save_and_load", s3_endpoint.url, s3_bucket, tmp_path)
    assert [r["loaded_step"] for r in results] == [42, 42] and all(r["shards_equal"] for r in results)
    objects = {o["Key"]: o["Size"] for o in _objects(s3_client, s3_bucket, "ranks/step-42/")}
    data = {key: size for key, size in objects.items() if key.endswith(".distcp")}
    assert len(data) == 2 and "ranks/step-42/.metadata" in objects
    # each rank read all of its own file once, and of the other file only the replicated `step` value that DCP's
    # dedup stored there (a few hundred bytes), never the other rank's 4 MiB of shards
    for rank, result in enumerate(results):
        own = next(k for k in data if f"/__{rank}_" in k)
        ranges = [(key, start, end) for key, start, end in result["reads"] if key.endswith(".distcp")]
        assert sum(end - start for key, start, end in ranges if key == own) == data[own]
        assert sum(end - start for key, start, end in ranges if key != own) < 4096
    # .metadata: one HEAD to refuse a committed id at save, one HEAD + one GET by rank 0 at load
    metadata_gets = [r for r in requests if r.startswith("GET ") and r.split("?")[0].endswith("/.metadata")]
    assert len(metadata_gets) == 1
    assert sum(1 for r in results for key, _, _ in r["reads"] if key.endswith("/.metadata")) == 1

    import torch.distributed.checkpoint as dcp

    from ckptcloud.dcp import CloudStorageReader

    whole = {name: torch.zeros_like(t) for name, t in full_state().items()}
    whole["step"] = 0
    reader = CloudStorageReader(
        f"s3://{s3_bucket}/ranks/step-42", endpoint_url=s3_endpoint.url, region_name="us-east-1"
    )
    dcp.load(whole, storage_reader=reader, no_dist=True)  # world 1: both ranks' shards into whole tensors
    expected = full_state()
    assert whole["step"] == 42 and all(torch.equal(whole[name], expected[name]) for name in expected)


def test_one_rank_failing_cancels_the_other_ranks_upload_and_every_rank_raises(
    s3_endpoint, s3_bucket, s3_client, tmp_path
):
    results, _ = run_ranks(2, "rank1_fails", s3_endpoint.url, s3_bucket, tmp_path)
    assert "PermissionError" in results[1]["save_error"] and "credentials expired" in results[1]["save_error"]
    assert "RemoteSaveError" in results[0]["save_error"] and "rank 1: PermissionError" in results[0]["save_error"]
    # rank 0 had 4 parts (20 MiB at 5 MiB) at SLOW_PART_S each: it stopped after the one in flight
    assert results[0]["parts_sent"] <= 2
    assert _objects(s3_client, s3_bucket, "ranks/") == []
    assert s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


def test_world_4_save_loads_into_world_2_and_world_1(s3_endpoint, s3_bucket, s3_client, tmp_path):
    run_ranks(4, "save_only", s3_endpoint.url, s3_bucket, tmp_path)
    data = [o for o in _objects(s3_client, s3_bucket, "ranks/step-42/") if o["Key"].endswith(".distcp")]
    assert len(data) == 4
    results, _ = run_ranks(2, "load_only", s3_endpoint.url, s3_bucket, tmp_path)
    assert [r["loaded_step"] for r in results] == [42, 42] and all(r["shards_equal"] for r in results)
    for rank, result in enumerate(results):  # rank r of 2 holds the rows ranks 2r and 2r+1 of 4 saved
        files = {key.rsplit("/", 1)[1].split("_")[2] for key, _, _ in result["reads"] if key.endswith(".distcp")}
        assert {f"{2 * rank}", f"{2 * rank + 1}"} <= files

    import torch.distributed.checkpoint as dcp

    from ckptcloud.dcp import CloudStorageReader

    whole = {name: torch.zeros_like(t) for name, t in full_state().items()}
    whole["step"] = 0
    reader = CloudStorageReader(
        f"s3://{s3_bucket}/ranks/step-42", endpoint_url=s3_endpoint.url, region_name="us-east-1"
    )
    dcp.load(whole, storage_reader=reader, no_dist=True)
    expected = full_state()
    assert whole["step"] == 42 and all(torch.equal(whole[name], expected[name]) for name in expected)
