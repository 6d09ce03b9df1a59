"""The sharded path against real emulators: S3 (moto), GCS (fake-gcs-server) and Azure (Azurite).

Each store's own conditional create (S3 ``If-None-Match: *``, GCS ``ifGenerationMatch=0``, Azure
``If-None-Match: *``) is what stops a second save from committing a folder another save committed meanwhile.
"""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from ckptcloud.dcp import CheckpointExistsError, CloudStorageReader, CloudStorageWriter, is_committed, list_folder
from ckptcloud.errors import IntegrityError
from ckptcloud.retry import Retry

from .helpers import rank_failure, tensors_equal

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")]
MiB = 1024 * 1024
RETRY = Retry(max_attempts=3, initial_backoff=0.01, max_backoff=0.1)


def big_state(seed: int = 0) -> dict:
    """About 12 MiB: several parts per file at the stores' smallest part sizes."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(1024, 1024)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 1024)).sum().backward()
    optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": seed}


def blank() -> dict:
    state = big_state(seed=99)
    state["epoch"] = -1
    return state


def _save(url: str, options: dict, state: dict, **kwargs) -> None:
    dcp.save(state, storage_writer=CloudStorageWriter(url, retry=RETRY, max_concurrency=4, **options), no_dist=True)


def _load(url: str, options: dict) -> dict:
    loaded = blank()
    dcp.load(loaded, storage_reader=CloudStorageReader(url, retry=RETRY, max_concurrency=4, **options), no_dist=True)
    return loaded


def test_save_and_load_round_trip_in_parts(place):
    base, options = place
    state = big_state()
    _save(f"{base}/step-1", options, state)
    assert tensors_equal(_load(f"{base}/step-1", options), state)
    writer = CloudStorageWriter(f"{base}/step-1", **options)
    names = [info.key.rsplit("/", 1)[1] for info in list_folder(writer._target.store, writer._target.prefix)]
    assert names[0] == ".metadata" and len(names) == 2 and names[1].endswith(".distcp")


def test_a_save_that_loses_the_race_for_an_id_fails_and_leaves_the_winner_intact(place):
    base, options = place
    url = f"{base}/step-2"
    winner, loser = big_state(seed=3), big_state(seed=4)

    class CommitsAnotherSaveMeanwhile(CloudStorageWriter):
        def write_data(self, plan, planner):
            result = super().write_data(plan, planner)
            _save(url, options, winner)  # another job commits the same id while this one is still writing
            return result

    with pytest.raises(CheckpointException) as caught:
        dcp.save(loser, storage_writer=CommitsAnotherSaveMeanwhile(url, retry=RETRY, **options), no_dist=True)
    assert isinstance(rank_failure(caught.value), CheckpointExistsError)
    target = CloudStorageWriter(url, **options)._target
    assert len([i for i in list_folder(target.store, target.prefix) if i.key.endswith(".distcp")]) == 1
    assert tensors_equal(_load(url, options), winner)


def test_a_failed_save_commits_nothing_and_keeps_the_older_checkpoint(place, monkeypatch):
    base, options = place
    old = big_state(seed=5)
    _save(f"{base}/step-1", options, old)
    store_type = type(CloudStorageWriter(f"{base}/x", **options)._target.store)

    def denied(self, upload, number, data):
        raise PermissionError("AccessDenied: the bucket policy changed")

    monkeypatch.setattr(store_type, "put_part", denied)
    with pytest.raises(CheckpointException) as caught:
        _save(f"{base}/step-2", options, big_state(seed=6))
    assert isinstance(rank_failure(caught.value), PermissionError)
    monkeypatch.undo()
    target = CloudStorageWriter(f"{base}/step-2", **options)._target
    assert not is_committed(target.store, target.prefix) and list_folder(target.store, target.prefix) == []
    assert tensors_equal(_load(f"{base}/step-1", options), old)


def test_a_pickled_writer_rebuilds_its_client_and_saves(s3_endpoint, s3_bucket):
    url = f"s3://{s3_bucket}/pickled"
    writer = CloudStorageWriter(url, endpoint_url=s3_endpoint.url, region_name="us-east-1")
    state = big_state()
    dcp.save(state, storage_writer=pickle.loads(pickle.dumps(writer)), no_dist=True)
    assert tensors_equal(_load(url, {"endpoint_url": s3_endpoint.url, "region_name": "us-east-1"}), state)


def test_async_save_in_thread_mode_on_s3(s3_endpoint, s3_bucket):
    url = f"s3://{s3_bucket}/async"
    options = {"endpoint_url": s3_endpoint.url, "region_name": "us-east-1"}
    state = big_state()
    future = dcp.async_save(state, storage_writer=CloudStorageWriter(url, **options), no_dist=True)
    future.result(timeout=120)
    assert tensors_equal(_load(url, options), state)


def test_a_corrupted_data_file_on_s3_fails_the_load_naming_it(s3_endpoint, s3_bucket, s3_client):
    url = f"s3://{s3_bucket}/damaged"
    options = {"endpoint_url": s3_endpoint.url, "region_name": "us-east-1"}
    _save(url, options, big_state())
    (key,) = [o["Key"] for o in s3_client.list_objects_v2(Bucket=s3_bucket)["Contents"] if o["Key"].endswith("distcp")]
    body = bytearray(s3_client.get_object(Bucket=s3_bucket, Key=key)["Body"].read())
    body[len(body) // 2] ^= 0xFF
    s3_client.put_object(Bucket=s3_bucket, Key=key, Body=bytes(body))  # same size, one byte changed
    with pytest.raises(CheckpointException) as caught:
        _load(url, options)
    error = rank_failure(caught.value)
    assert isinstance(error, IntegrityError) and f"s3://{s3_bucket}/{key} is damaged" in str(error)
