"""Real torch.distributed process groups (gloo on CPU, spawned processes): one rank writes, every rank agrees.

Every rank calls the checkpoint; requests reach moto through a counting proxy, so the test sees exactly how many
uploads and deletes all ranks made together.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from ckptcloud.testing.servers import free_port
from tests.spawning import spawn_ranks_through_proxy

pytestmark = pytest.mark.integration
TIMEOUT_S = 120


def _saver(store: str, bucket: str, endpoint: str, **options):
    """The saver for ``store``, pointed at ``endpoint`` (the counting proxy in front of the emulator)."""
    from ckptcloud.savers import AzureBlobSaver, GCSSaver, S3Saver

    if store == "s3":
        return S3Saver(bucket, "dist", endpoint_url=endpoint, region_name="us-east-1", **options)
    if store == "gcs":
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        client = storage.Client(
            project="test", credentials=AnonymousCredentials(), client_options={"api_endpoint": endpoint}
        )
        return GCSSaver(bucket, "dist", client=client, **options)
    from ckptcloud.testing.servers import AZURITE_ACCOUNT, AZURITE_KEY

    conn = (
        f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
        f"BlobEndpoint={endpoint}/{AZURITE_ACCOUNT};"
    )
    return AzureBlobSaver(bucket, "dist", connection_string=conn, api_version="2025-11-05", **options)


# Scores each rank passes in the "divergent_scores" scenario: the writer's rank 0 decides, the others follow.
WRITER_SCORES = [0.5, 0.7, 0.6, 0.9]
OTHER_SCORES = [0.9, 0.1, 0.95, 0.2]
SHORT_GROUP_TIMEOUT_S = 4
SLOW_UPLOAD_S = 9


def _rank_main(
    rank: int, world: int, port: int, store: str, endpoint: str, bucket: str, scenario: str, out: str
) -> None:
    """One rank: join the group, run the scenario, write what it saw to ``out/rank{N}.json``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import warnings
    from datetime import timedelta

    slow = scenario in ("slow_upload", "slow_upload_async")
    timeout = SHORT_GROUP_TIMEOUT_S if slow else 60
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=timeout))
    result: dict = {"rank": rank}
    try:
        from ckptcloud import Checkpoint, RemoteSaveError
        from ckptcloud.retry import NO_RETRY
        from ckptcloud.stores.s3 import S3Store

        writer = 1 if scenario == "save_on_rank_1" else 0
        torch.manual_seed(0)
        model: torch.nn.Module = torch.nn.Linear(8, 4)
        to_save: dict = {"model": model}
        if scenario == "ddp_zero":
            from torch.distributed.optim import ZeroRedundancyOptimizer

            model = torch.nn.parallel.DistributedDataParallel(model)
            optimizer = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.Adam, lr=0.01)
            model(torch.randn(4, 8)).sum().backward()
            optimizer.step()
            to_save = {"model": model, "optimizer": optimizer}
        saver = _saver(store, bucket, endpoint, save_on_rank=writer, retry=NO_RETRY, require_empty=False)
        if scenario == "writer_fails" and rank == writer:
            S3Store.put = lambda *a, **k: (_ for _ in ()).throw(PermissionError("bucket policy says no"))  # type: ignore[method-assign]
        if slow and rank == writer:
            put = S3Store.put

            def slow_put(*args, **kwargs):
                time.sleep(SLOW_UPLOAD_S)  # longer than the process group's timeout
                return put(*args, **kwargs)

            S3Store.put = slow_put  # type: ignore[method-assign]
        if scenario == "resume_listing_fails":
            if rank == writer:
                S3Store.list = lambda *a, **k: (_ for _ in ()).throw(PermissionError("listing denied"))  # type: ignore[method-assign]
            start = time.perf_counter()
            try:
                Checkpoint(to_save, saver, n_saved=2, resume=True)
            except (PermissionError, RemoteSaveError) as err:
                result["errors"] = [f"{type(err).__name__}: {err}"]
                result["seconds_to_raise"] = [time.perf_counter() - start]
            dist.barrier()  # the group still works: no rank is stuck in a collective
            return
        score_name = "acc" if scenario == "divergent_scores" else None
        async_save = scenario == "slow_upload_async"
        ckpt = Checkpoint(to_save, saver, n_saved=2, save_on_rank=writer, score_name=score_name, async_save=async_save)
        steps = 1 if slow else 2 if scenario == "ddp_zero" else 4
        scores = WRITER_SCORES if rank == writer else OTHER_SCORES
        for step in range(1, steps + 1):
            start = time.perf_counter()
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    score = scores[step - 1] if score_name else None
                    ckpt.save(global_step=step, score=score)
                    if async_save:
                        result["seconds_to_return"] = time.perf_counter() - start
                        ckpt.close()  # the other ranks wait here while the writer uploads in the background
                result.setdefault("warnings", []).extend(str(w.message) for w in caught)
            except (PermissionError, RemoteSaveError, ImportError) as err:
                result.setdefault("errors", []).append(f"{type(err).__name__}: {err}")
                result.setdefault("seconds_to_raise", []).append(time.perf_counter() - start)
            result.setdefault("seconds_per_save", []).append(time.perf_counter() - start)
        result["kept"] = ckpt.state_dict()["_saved"]
        if scenario == "ddp_zero" and rank == writer and "errors" not in result:
            stored = saver.load(ckpt.last_checkpoint)
            result["model_keys"] = sorted(stored["model"])
            result["optimizer_state_entries"] = len(stored["optimizer"]["state"])
        dist.barrier()
    except BaseException:
        result["crash"] = traceback.format_exc()
    finally:
        result["numpy_importable"] = _numpy_importable()
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
        dist.destroy_process_group()


def _numpy_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("numpy") is not None


def run_ranks(
    world: int, scenario: str, endpoint: str, bucket: str, tmp_path: Path, store: str = "s3"
) -> tuple[list[dict], list[str]]:
    """Spawn ``world`` ranks through a counting proxy; returns each rank's result and the requests made."""
    results, requests = spawn_ranks_through_proxy(
        _rank_main, world, endpoint, lambda proxy: (world, free_port(), store, proxy, bucket, scenario, str(tmp_path)),
        tmp_path, TIMEOUT_S,
    )  # fmt: skip
    if os.environ.get("CKPTCLOUD_MINIMAL_INSTALL"):  # the minimal-install stage proves it ran without numpy
        assert not any(r["numpy_importable"] for r in results), "numpy is installed in the minimal-install stage"
    return results, requests


def uploads(requests: list[str]) -> list[str]:
    """Requests that write an object (S3/Azure: PUT to the key; GCS: POST to the upload endpoint)."""
    return [r for r in requests if (r.startswith("PUT ") and "/dist/" in r) or r.startswith("POST /upload/")]


def deletes(requests: list[str]) -> list[str]:
    return [r for r in requests if r.startswith("DELETE ") and ("/dist/" in r or "dist%2F" in r)]


@pytest.mark.parametrize("world", [2, 4])
def test_exactly_one_upload_per_save_and_one_delete_per_eviction_across_ranks(world, s3_endpoint, s3_bucket, tmp_path):
    results, requests = run_ranks(world, "plain", s3_endpoint.url, s3_bucket, tmp_path)
    assert len(uploads(requests)) == 4  # 4 saves, each small enough for one PutObject
    assert len(deletes(requests)) == 2  # n_saved=2: steps 1 and 2 evicted once each
    kept = [[3, "model_3.pt"], [4, "model_4.pt"]]
    assert [r["kept"] for r in results] == [kept] * world
    print(f"\n[distributed] world {world}: {len(uploads(requests))} uploads, {len(deletes(requests))} deletes")


def test_save_on_rank_1_writes_from_rank_1(s3_endpoint, s3_bucket, tmp_path, s3_client):
    results, requests = run_ranks(2, "save_on_rank_1", s3_endpoint.url, s3_bucket, tmp_path)
    assert len(uploads(requests)) == 4 and len(deletes(requests)) == 2
    keys = sorted(o["Key"] for o in s3_client.list_objects_v2(Bucket=s3_bucket).get("Contents", []))
    assert keys == ["dist/model_3.pt", "dist/model_4.pt"]
    assert results[0]["kept"] == results[1]["kept"]


def test_a_failed_upload_raises_on_every_rank_and_loses_nothing(s3_endpoint, s3_bucket, tmp_path, s3_client):
    results, _ = run_ranks(2, "writer_fails", s3_endpoint.url, s3_bucket, tmp_path)
    for result in results:
        assert len(result["errors"]) == 4, result  # every save failed, on every rank, nobody hung
        assert result["kept"] == []
    assert all(e.startswith("PermissionError") for e in results[0]["errors"])
    assert all(e.startswith("RemoteSaveError") and "bucket policy says no" in e for e in results[1]["errors"])
    assert s3_client.list_objects_v2(Bucket=s3_bucket).get("KeyCount", 0) == 0
    slowest = max(max(r["seconds_to_raise"]) for r in results)
    print(f"\n[distributed] all ranks raised within {slowest:.3f} s of calling save()")
    assert slowest < 30


def test_ddp_is_unwrapped_and_zero_optimizer_state_is_consolidated(s3_endpoint, s3_bucket, tmp_path):
    results, _ = run_ranks(2, "ddp_zero", s3_endpoint.url, s3_bucket, tmp_path)
    if os.environ.get("CKPTCLOUD_MINIMAL_INSTALL"):  # torch's ZeRO consolidation itself calls .numpy()
        for result in results:
            assert len(result["errors"]) == 2 and all("needs numpy" in e for e in result["errors"]), result
        return
    writer = results[0]
    assert writer["model_keys"] == ["bias", "weight"]  # no "module." prefix
    assert writer["optimizer_state_entries"] == 2  # both parameters' Adam state, gathered from both ranks
    assert results[0]["kept"] == results[1]["kept"] == [[1, "checkpoint_1.pt"], [2, "checkpoint_2.pt"]]


def test_gcs_saver_in_a_process_group(gcs_endpoint, gcs_bucket, tmp_path):
    results, requests = run_ranks(2, "plain", gcs_endpoint.url, gcs_bucket, tmp_path, store="gcs")
    assert len(uploads(requests)) == 4 and len(deletes(requests)) == 2
    assert results[0]["kept"] == results[1]["kept"] == [[3, "model_3.pt"], [4, "model_4.pt"]]


def test_azure_saver_in_a_process_group(azure_endpoint, azure_container, tmp_path):
    endpoint = azure_endpoint.url.split("BlobEndpoint=")[1].split(";")[0].rsplit("/", 1)[0]
    results, requests = run_ranks(2, "plain", endpoint, azure_container, tmp_path, store="azure")
    assert len(uploads(requests)) == 4 and len(deletes(requests)) == 2
    assert results[0]["kept"] == results[1]["kept"] == [[3, "model_3.pt"], [4, "model_4.pt"]]


@pytest.mark.parametrize("scenario", ["slow_upload", "slow_upload_async"])
def test_a_save_longer_than_the_process_group_timeout_succeeds_on_every_rank(
    scenario, s3_endpoint, s3_bucket, tmp_path
):
    results, requests = run_ranks(2, scenario, s3_endpoint.url, s3_bucket, tmp_path)
    assert len(uploads(requests)) == 1
    for result in results:
        assert "errors" not in result, result
        assert result["kept"] == [[1, "model_1.pt"]]
        assert result["seconds_per_save"][0] > SHORT_GROUP_TIMEOUT_S  # and the barrier after it still worked
    if scenario == "slow_upload_async":
        assert results[0]["seconds_to_return"] < SHORT_GROUP_TIMEOUT_S  # save() returned before the upload ended
    took = results[1]["seconds_per_save"][0]
    print(f"\n[distributed] {scenario}: a {took:.1f} s save under a {SHORT_GROUP_TIMEOUT_S} s group timeout")


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_with_different_scores_follow_the_writer_with_a_warning(world, s3_endpoint, s3_bucket, tmp_path):
    results, requests = run_ranks(world, "divergent_scores", s3_endpoint.url, s3_bucket, tmp_path)
    kept = [[0.7, "model_2_acc=0.7000.pt"], [0.9, "model_4_acc=0.9000.pt"]]  # what the writer's scores keep
    assert [r["kept"] for r in results] == [kept] * world
    assert len(uploads(requests)) == 4 and len(deletes(requests)) == 2
    assert results[0].get("warnings", []) == []
    for follower in results[1:]:
        assert "errors" not in follower
        assert follower["warnings"] and all("follows rank 0" in w for w in follower["warnings"])


@pytest.mark.parametrize("world", [2, 4])
def test_a_failed_listing_in_resume_raises_on_every_rank(world, s3_endpoint, s3_bucket, tmp_path):
    results, _ = run_ranks(world, "resume_listing_fails", s3_endpoint.url, s3_bucket, tmp_path)
    assert results[0]["errors"] == ["PermissionError: listing denied"]
    for follower in results[1:]:
        assert len(follower["errors"]) == 1 and follower["errors"][0].startswith("RemoteSaveError")
        assert "listing denied" in follower["errors"][0] and "rank 0" in follower["errors"][0]
    assert max(r["seconds_to_raise"][0] for r in results) < 10
