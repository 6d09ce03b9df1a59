"""FSDP2 (``fully_shard`` on CPU, gloo) with Adam at world 2 and world 4, checkpointed by
``Checkpoint(..., sharded=True, n_saved=2, score_name=...)`` to S3 (SeaweedFS), GCS (fake-gcs-server) and Azure
(Azurite): exactly ``n_saved`` committed folders remain, and the checkpoints resume bit-identically (model and
Adam state) into world 1 (plain modules) and, from world 4, into world 2 (FSDP2 again, resharded by DCP).

The ranks and the checks are those of :mod:`tests.dcp.test_checkpoint_fsdp` (moto: async saves, resuming into
the saving world and retention going on); each rank builds its own client from a :class:`StoreSpec`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import AZURITE_API_VERSION

from .test_checkpoint_fsdp import KEPT, StoreSpec, check_resumes_into_world_1, check_trained, folder_census, run_ranks

pytest.importorskip("numpy", reason="torch.distributed.checkpoint needs numpy on every rank (ckptcloud[dcp])")
pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")]


@pytest.fixture(params=["seaweedfs", "gcs", "azure"])
def cloud_store(request: pytest.FixtureRequest) -> tuple[StoreSpec, Callable[[], list[str]]]:
    """``(spec for the ranks, list every key under fsdp/ with the store's own client)`` on a fresh bucket or
    container of each emulator."""
    if request.param == "seaweedfs":
        endpoint = request.getfixturevalue("large_s3_endpoint")
        bucket, client = request.getfixturevalue("large_s3_bucket")

        def s3_keys() -> list[str]:
            pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="fsdp/")
            return [o["Key"] for page in pages for o in page.get("Contents", [])]

        return StoreSpec("s3", endpoint.url, bucket), s3_keys
    if request.param == "gcs":
        endpoint, client = request.getfixturevalue("gcs_endpoint"), request.getfixturevalue("gcs_client")
        bucket = request.getfixturevalue("gcs_bucket")
        return StoreSpec("gcs", endpoint.url, bucket), lambda: [
            b.name for b in client.list_blobs(bucket, prefix="fsdp/")
        ]
    conn, container = request.getfixturevalue("azure_endpoint").url, request.getfixturevalue("azure_container")
    blobs = request.getfixturevalue("azure_service").get_container_client(container)
    return StoreSpec("azure", conn, container, AZURITE_API_VERSION), lambda: list(
        blobs.list_blob_names(name_starts_with="fsdp/")
    )


def test_fsdp2_world_2_checkpoints_on_each_cloud_keep_n_saved_and_resume_into_world_1_bit_identically(
    cloud_store, tmp_path: Path
):
    spec, keys = cloud_store
    check_trained(run_ranks(2, spec, tmp_path), 2, folder_census(keys()))
    check_resumes_into_world_1(spec, tmp_path)


def test_fsdp2_world_4_checkpoints_on_each_cloud_keep_n_saved_and_reshard_into_worlds_2_and_1_bit_identically(
    cloud_store, tmp_path: Path
):
    spec, keys = cloud_store
    results = run_ranks(4, spec, tmp_path)
    saved = folder_census(keys())
    check_trained(results, 4, saved)
    resumed = run_ranks(2, spec, tmp_path, "load")  # FSDP2 over 2 ranks: each reads half of what 4 wrote
    assert [r["resumed"] for r in resumed] == [KEPT, KEPT]
    assert resumed[0]["equal"] == {"2": True, "3": True}  # model and Adam state of both kept checkpoints
    check_resumes_into_world_1(spec, tmp_path)
    assert folder_census(keys()) == saved  # loading deleted or added nothing
