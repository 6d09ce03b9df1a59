"""Retention policies survive a restart on every store: the step, save time and score go into each object's metadata
(S3 through moto, GCS through fake-gcs-server, Azure through Azurite), and ``resume=True`` reads them back."""

from __future__ import annotations

import pytest
import torch

from ckptcloud import Checkpoint, _retention
from ckptcloud.policies import BestN, EveryNSeconds
from ckptcloud.savers import AzureBlobSaver, GCSSaver, S3Saver

pytestmark = pytest.mark.integration
RUN = [(1, 0.5), (2, 0.4), (3, 0.6), (4, 0.7), (5, 0.2), (6, 0.3), (7, 0.1)]


@pytest.fixture(params=["s3", "gcs", "azure"])
def make_saver(request):
    if request.param == "s3":
        endpoint, bucket = request.getfixturevalue("s3_endpoint"), request.getfixturevalue("s3_bucket")
        return lambda: S3Saver(bucket, "run", endpoint_url=endpoint.url, region_name="us-east-1", require_empty=False)
    if request.param == "gcs":
        client, bucket = request.getfixturevalue("gcs_client"), request.getfixturevalue("gcs_bucket")
        return lambda: GCSSaver(bucket, "run", client=client, require_empty=False)
    service, container = request.getfixturevalue("azure_service"), request.getfixturevalue("azure_container")
    return lambda: AzureBlobSaver(
        container, "run", container_client=service.get_container_client(container), require_empty=False
    )


def test_a_resumed_run_reads_the_step_save_time_and_score_back_from_the_object_metadata(make_saver, monkeypatch):
    times = iter(range(0, 1000, 10))
    monkeypatch.setattr(_retention, "save_time", lambda: 1.7e9 + next(times) + 0.25)
    policy = BestN(1) | EveryNSeconds(25)
    ckpt = Checkpoint({"model": torch.nn.Linear(4, 2)}, make_saver(), score_name="acc", keep=policy)
    for step, acc in RUN[:4]:
        ckpt.save(global_step=step, score=acc)
    resumed = Checkpoint({"model": torch.nn.Linear(4, 2)}, make_saver(), score_name="acc", keep=policy, resume=True)
    assert resumed.state_dict() == ckpt.state_dict()
    assert resumed.state_dict()["_records"]["model_4_acc=0.7000.pt"] == {"step": 4, "time": 1.7e9 + 30.25, "score": 0.7}
    # saved at 40, 50, 60 s: only step 7 is 25 s after model_4 (30 s), which the records say, not S3's own clock
    assert [resumed.save(global_step=step, score=acc) for step, acc in RUN[4:]] == [None, None, "model_7_acc=0.1000.pt"]
    assert [f for _, f in resumed.state_dict()["_saved"]] == [
        "model_7_acc=0.1000.pt",
        "model_1_acc=0.5000.pt",
        "model_4_acc=0.7000.pt",
    ]
    assert sorted(make_saver().list()) == sorted(f for _, f in resumed.state_dict()["_saved"])
