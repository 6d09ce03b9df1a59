"""AzureBlobSaver with the least credentials that do the job, on Azurite: a container SAS with exactly the
permissions ckptcloud needs (``rwdl``), each one shown needed, and a read SAS for one blob that loads it."""

from __future__ import annotations

import contextlib
import datetime
import re

import pytest
import torch
from azure.storage.blob import generate_blob_sas, generate_container_sas

from ckptcloud import Checkpoint
from ckptcloud.retry import NO_RETRY
from ckptcloud.savers import AzureBlobSaver
from ckptcloud.testing.servers import AZURITE_ACCOUNT, AZURITE_KEY
from tests.conftest import AZURITE_API_VERSION
from tests.helpers import torch_bytes

MiB = 1024 * 1024
pytestmark = pytest.mark.integration
NEEDED = "rwdl"  # what ckptcloud needs of a container SAS (c and a are never needed: w covers creating blobs)


def expiry() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1)


@pytest.fixture
def endpoint(azurite_blob_endpoint: str) -> str:
    return azurite_blob_endpoint


@pytest.fixture
def client(azure_service, azure_container):
    return azure_service.get_container_client(azure_container)


def container_sas(container: str, permission: str) -> str:
    return generate_container_sas(AZURITE_ACCOUNT, container, account_key=AZURITE_KEY, permission=permission,
                                  expiry=expiry())  # fmt: skip


def sas_saver(endpoint: str, container: str, sas: str, how: str = "credential", **options) -> AzureBlobSaver:
    where = (
        {"account_url": endpoint, "credential": sas} if how == "credential" else {"account_url": f"{endpoint}?{sas}"}
    )
    return AzureBlobSaver(container, "run", api_version=AZURITE_API_VERSION, part_size=1 * MiB, **where, **options)


def model() -> torch.nn.Module:
    return torch.nn.Linear(768, 1024)  # 3 MiB of weights: a checkpoint of four 1 MiB blocks


@pytest.mark.parametrize("how", ["credential", "account_url"])
def test_a_container_sas_with_rwdl_saves_keeps_n_saved_resumes_and_loads(endpoint, client, azure_container, how):
    sas = container_sas(azure_container, NEEDED)
    net = model()
    ckpt = Checkpoint({"model": net}, sas_saver(endpoint, azure_container, sas, how), n_saved=1)
    ckpt.save(global_step=1)
    with torch.no_grad():
        net.weight.add_(1.0)
    ckpt.save(global_step=2)  # retention deletes model_1.pt through the SAS
    assert sorted(b.name for b in client.list_blobs()) == ["run/model_2.pt"]
    committed, _ = client.get_blob_client("run/model_2.pt").get_block_list("committed")
    assert len(committed) > 1  # a multipart save: staged blocks and one commit

    resumed = Checkpoint({"model": model()}, sas_saver(endpoint, azure_container, sas, how, require_empty=False),
                         n_saved=1, resume=True)  # fmt: skip
    assert resumed.last_checkpoint == "model_2.pt"
    loaded = resumed.save_handler.load("model_2.pt")
    assert torch_bytes(loaded) == torch_bytes(net.state_dict())  # one object: its state dict is the checkpoint


@pytest.mark.parametrize(
    "missing,fails_at,message",
    [
        ("l", "construction", r"access denied to az://[^ ]+ \(checking the container\): AuthorizationPermissionMismatch"
                              r" — a SAS needs the 'l' \(list\) permission"),
        ("w", "saving", r"access denied to az://[^ ]+/run/model_1\.pt \(staging block \d+\): "
                        r"AuthorizationPermissionMismatch — a SAS needs the 'w' \(write\) permission for saving"),
        ("d", "retention", r"access denied to az://[^ ]+/run/model_1\.pt \(deleting\): AuthorizationPermissionMismatch"
                           r" — a SAS needs the 'd' \(delete\) permission for retention"),
        ("r", "loading", r"access denied to az://[^ ]+/run/model_2\.pt \(reading the metadata\): "
                         r"AuthorizationPermissionMismatch — a SAS needs the 'r' \(read\) permission for loading"),
    ],
)  # fmt: skip
def test_each_sas_permission_is_needed_and_a_missing_one_is_named(
    endpoint, client, azure_container, missing, fails_at, message
):
    """Save, retention, load with ``rwdl`` less one letter: the step that needs it fails and names the letter.

    Retention only warns (the new checkpoint is saved; the evicted one stays), as for any failed removal.
    """
    sas = container_sas(azure_container, NEEDED.replace(missing, ""))
    net = model()
    failed: list[tuple[str, str]] = []
    step = "construction"
    try:
        saver = sas_saver(endpoint, azure_container, sas, retry=NO_RETRY)
        ckpt = Checkpoint({"model": net}, saver, n_saved=1)
        step = "saving"
        ckpt.save(global_step=1)
        step = "retention"
        with pytest.warns(RuntimeWarning) if missing == "d" else contextlib.nullcontext() as warned:
            ckpt.save(global_step=2)
        failed += [("retention", str(w.message)) for w in (warned or [])]
        step = "loading"
        saver.load("model_2.pt")
    except PermissionError as err:
        failed.append((step, str(err)))
    assert len(failed) == 1 and failed[0][0] == fails_at, failed
    assert re.search(message, failed[0][1]), failed[0][1]


def test_a_read_sas_for_one_blob_loads_it_without_the_container_check(endpoint, client, azure_container):
    writer = AzureBlobSaver(azure_container, "runs/exp1", container_client=client, part_size=1 * MiB)
    state = {"w": torch.randn(3 * MiB), "step": 3}  # 12 MiB: several ranged GETs on load
    writer(state, "model_3.pt")
    writer({"w": torch.ones(2)}, "model_4.pt")
    blob_sas = generate_blob_sas(AZURITE_ACCOUNT, azure_container, "runs/exp1/model_3.pt", account_key=AZURITE_KEY,
                                 permission="r", expiry=expiry())  # fmt: skip
    options = {"check_bucket": False, "require_empty": False, "api_version": AZURITE_API_VERSION}

    reader = AzureBlobSaver(azure_container, "runs/exp1", account_url=f"{endpoint}?{blob_sas}", **options)
    assert torch_bytes(reader.load("model_3.pt")) == torch_bytes(state)
    reader = AzureBlobSaver(azure_container, "runs/exp1", account_url=endpoint, credential=blob_sas, **options)
    assert torch_bytes(reader.load("model_3.pt")) == torch_bytes(state)
    with pytest.raises(PermissionError, match=r"az://[^ ]+/runs/exp1/model_4\.pt \(reading the metadata\)"):
        reader.load("model_4.pt")  # another blob: denied, named by its own URL
    with pytest.raises(PermissionError, match=r"checking the container.*check_bucket=False and require_empty=False"):
        AzureBlobSaver(azure_container, "runs/exp1", account_url=f"{endpoint}?{blob_sas}",
                       api_version=AZURITE_API_VERSION)  # fmt: skip
