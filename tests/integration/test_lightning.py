"""ckptcloud under a real ``lightning.Trainer`` (CPU, a tiny model, a few steps) against the suite's S3 server.

Runs in CI's main stage, which installs ``.[dev]`` (and with it ``ckptcloud[lightning]``): no import guard, so a
missing Lightning fails here instead of skipping. The minimal and floors stages do not collect this file.
"""

from __future__ import annotations

import importlib.util
import json
import pickle
import subprocess
import sys
import threading

import fsspec
import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO
from torch.utils.data import DataLoader, TensorDataset

from ckptcloud import load_checkpoint
from ckptcloud.lightning import CloudCheckpointIO, ObjectStoreFileSystem
from tests.conftest import incomplete_uploads

pytestmark = pytest.mark.integration

# val_loss logged at the end of each epoch (index = epoch): the best two of epochs 0-4 are epochs 3 and 1.
VAL_LOSS = [0.5, 0.3, 0.4, 0.2, 0.6, 0.05, 0.01]
STEPS_PER_EPOCH = 2
MiB = 1024 * 1024


class TinyModel(L.LightningModule):
    def __init__(self, hidden: int = 4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(hidden, 1)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.layer(x).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", VAL_LOSS[self.current_epoch])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)  # momentum: optimizer state to restore

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=8 // STEPS_PER_EPOCH)

    def val_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(4, 4)), batch_size=4)


class RecordStart(Callback):
    """What the trainer holds when training starts: the global step and the weights."""

    def on_train_start(self, trainer, pl_module):
        self.step = trainer.global_step
        self.weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def make_trainer(tmp_path, dirpath, io, max_epochs, *extra):
    checkpoint = ModelCheckpoint(dirpath=dirpath, monitor="val_loss", mode="min", save_top_k=2)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        callbacks=[checkpoint, *extra],
        plugins=[io],
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    return trainer, checkpoint


def keys(client, bucket, prefix=""):
    response = client.list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(obj["Key"] for obj in response.get("Contents", []))


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_fit_keeps_exactly_the_two_best_in_the_bucket_and_resumes_from_the_best(
    tmp_path, s3_endpoint, s3_client, s3_bucket, monkeypatch, async_save
):
    dirpath = f"s3://{s3_bucket}/run"
    io = CloudCheckpointIO(endpoint_url=s3_endpoint.url, part_size=5 * 1024**2, async_save=async_save)
    trainer, checkpoint = make_trainer(tmp_path, dirpath, io, 5)
    trainer.fit(TinyModel())

    # ModelCheckpoint's directory calls went through ckptcloud's filesystem (there is no s3fs here)
    if importlib.util.find_spec("s3fs") is None:
        assert isinstance(checkpoint._fs, ObjectStoreFileSystem)
    assert keys(s3_client, s3_bucket) == ["run/epoch=1-step=4.ckpt", "run/epoch=3-step=8.ckpt"]
    assert incomplete_uploads(s3_client, s3_bucket) == []
    best = checkpoint.best_model_path
    assert best == f"{dirpath}/epoch=3-step=8.ckpt"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint.url)
    saved = load_checkpoint(best)  # an ordinary Lightning checkpoint, verified by its CRC32C
    assert saved["global_step"] == 8 and saved["epoch"] == 3

    # resume from the bucket into the same folder, with a new plugin (a new process would do the same)
    io2 = CloudCheckpointIO(endpoint_url=s3_endpoint.url, part_size=5 * 1024**2, async_save=async_save)
    start = RecordStart()
    trainer2, checkpoint2 = make_trainer(tmp_path, dirpath, io2, 7, start)
    with pytest.warns(UserWarning, match="exists and is not empty"):  # isdir + ls answered through ckptcloud
        trainer2.fit(TinyModel(), ckpt_path=best)

    assert start.step == 8  # the global step continues from the checkpoint
    assert trainer2.global_step == 8 + 3 * STEPS_PER_EPOCH
    for name, tensor in saved["state_dict"].items():
        assert torch.equal(start.weights[name], tensor)
    # epochs 5 and 6 beat both kept ones: Lightning removed epoch 1's and then asked to remove epoch 3's, the
    # checkpoint this run resumed from, which the plugin keeps (Lightning's local-file rule; Lightning#21813)
    assert keys(s3_client, s3_bucket) == [
        "run/epoch=3-step=8.ckpt",
        "run/epoch=5-step=12.ckpt",
        "run/epoch=6-step=14.ckpt",
    ]
    assert sorted(checkpoint2.best_k_models) == [f"{dirpath}/epoch=5-step=12.ckpt", f"{dirpath}/epoch=6-step=14.ckpt"]


def test_model_checkpoint_directory_calls_and_load_from_checkpoint_work_without_s3fs(
    tmp_path, s3_endpoint, s3_client, s3_bucket
):
    io = CloudCheckpointIO(endpoint_url=s3_endpoint.url)
    url = f"s3://{s3_bucket}/run/sub/model.ckpt"
    model = TinyModel(hidden=3)
    io.save_checkpoint(
        {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams), "pytorch-lightning_version": "2"},
        url,
    )
    fs = fsspec.filesystem("s3")
    if importlib.util.find_spec("s3fs") is None:
        assert isinstance(fs, ObjectStoreFileSystem)
    assert fs.exists(url) and fs.isfile(url) and not fs.isdir(url)
    assert fs.isdir(f"s3://{s3_bucket}/run") and fs.exists(f"s3://{s3_bucket}/run/sub")
    assert not fs.exists(f"s3://{s3_bucket}/run/other.ckpt") and not fs.isdir(f"s3://{s3_bucket}/nothing")
    assert fs.ls(f"s3://{s3_bucket}/run", detail=False) == [f"{s3_bucket}/run/sub"]
    assert fs.ls(f"s3://{s3_bucket}/run/sub", detail=False) == [f"{s3_bucket}/run/sub/model.ckpt"]
    assert fs.info(url)["size"] > 0 and fs.modified(url).tzinfo is not None

    # Lightning's own fsspec paths: load_from_checkpoint reads through fs.open, to_yaml writes through it
    restored = TinyModel.load_from_checkpoint(url)
    assert restored.hparams.hidden == 3
    assert torch.equal(restored.layer.weight, model.layer.weight)
    callback = ModelCheckpoint(dirpath=f"s3://{s3_bucket}/run")
    callback.best_k_models = {url: torch.tensor(0.25)}
    callback.to_yaml()
    with fs.open(f"s3://{s3_bucket}/run/best_k_models.yaml", "r") as file:
        assert file.read().strip() == f"{url}: 0.25"

    with pytest.raises(ValueError), fs.open(f"s3://{s3_bucket}/run/aborted.yaml", "wb") as file:
        file.write(b"half")
        raise ValueError("the writer failed")
    assert not fs.exists(f"s3://{s3_bucket}/run/aborted.yaml")  # nothing published when the block failed
    with pytest.raises(NotImplementedError, match="install s3fs"):
        fs.open(url, "ab")

    fs.rm(f"s3://{s3_bucket}/run", recursive=True)
    assert keys(s3_client, s3_bucket) == []
    io.remove_checkpoint(url)  # already gone: not an error


class Gate:
    """Holds an S3 saver's publishing requests (single put, multipart complete) until released, or fails them."""

    def __init__(self, saver, fail=False):
        self.entered, self.release, self.fail = threading.Event(), threading.Event(), fail
        store = saver.store
        self._put, self._complete = store.put, store.complete
        store.put = lambda *a, **k: self._hold(self._put, *a, **k)
        store.complete = lambda *a, **k: self._hold(self._complete, *a, **k)
        self.store = store

    def _hold(self, publish, *args, **kwargs):
        self.entered.set()
        assert self.release.wait(30)
        if self.fail:
            raise PermissionError("denied by the test")
        return publish(*args, **kwargs)

    def undo(self):
        del self.store.put, self.store.complete


def small_checkpoint(value: float) -> dict:
    return {"state_dict": {"w": torch.full((1024,), value)}, "global_step": int(value)}


def test_async_save_removes_the_old_checkpoint_only_after_the_new_one_is_stored(s3_endpoint, s3_client, s3_bucket):
    io = CloudCheckpointIO(endpoint_url=s3_endpoint.url, async_save=True)
    old, new = f"s3://{s3_bucket}/run/old.ckpt", f"s3://{s3_bucket}/run/new.ckpt"
    io.save_checkpoint(small_checkpoint(1), old)
    io.teardown()
    gate = Gate(io.saver_for(new))
    try:
        state = small_checkpoint(2)
        io.save_checkpoint(state, new)  # returns at once: the upload waits at the gate
        state["state_dict"]["w"].fill_(99)  # training goes on: the save holds its own copy
        assert gate.entered.wait(30)
        io.remove_checkpoint(old)  # what ModelCheckpoint does right after save_checkpoint returns
        assert keys(s3_client, s3_bucket) == ["run/old.ckpt"]  # the new one is not stored yet: the old one stays
        gate.release.set()
        io.teardown()  # end of fit: waits for the save, then runs the removal it held back
    finally:
        gate.release.set()
        gate.undo()
    assert keys(s3_client, s3_bucket) == ["run/new.ckpt"]
    assert torch.equal(io.load_checkpoint(new)["state_dict"]["w"], torch.full((1024,), 2.0))


def test_async_save_that_fails_keeps_the_old_checkpoint_and_raises(s3_endpoint, s3_client, s3_bucket):
    io = CloudCheckpointIO(endpoint_url=s3_endpoint.url, async_save=True)
    old, new = f"s3://{s3_bucket}/run/old.ckpt", f"s3://{s3_bucket}/run/new.ckpt"
    io.save_checkpoint(small_checkpoint(1), old)
    io.teardown()
    gate = Gate(io.saver_for(new), fail=True)
    try:
        io.save_checkpoint(small_checkpoint(2), new)
        assert gate.entered.wait(30)
        io.remove_checkpoint(old)
        gate.release.set()
        with pytest.raises(PermissionError, match="denied by the test"):
            io.teardown()
    finally:
        gate.release.set()
        gate.undo()
    assert keys(s3_client, s3_bucket) == ["run/old.ckpt"]
    io.teardown()  # the failure was raised once; the plugin is usable again
    io.save_checkpoint(small_checkpoint(3), new)
    io.teardown()
    assert keys(s3_client, s3_bucket) == ["run/new.ckpt", "run/old.ckpt"]


def test_lightning_async_checkpoint_io_removes_the_old_checkpoint_before_the_new_one_is_stored(
    s3_endpoint, s3_client, s3_bucket
):
    """Why ``async_save=True`` exists: Lightning's ``AsyncCheckpointIO`` (2.6) passes ``remove_checkpoint`` straight
    to the wrapped plugin, so the old checkpoint goes while the new one is still uploading (or about to fail)."""
    inner = CloudCheckpointIO(endpoint_url=s3_endpoint.url)
    wrapped = AsyncCheckpointIO(inner)
    old, new = f"s3://{s3_bucket}/run/old.ckpt", f"s3://{s3_bucket}/run/new.ckpt"
    inner.save_checkpoint(small_checkpoint(1), old)
    gate = Gate(inner.saver_for(new))
    try:
        wrapped.save_checkpoint(small_checkpoint(2), new)
        assert gate.entered.wait(30)
        wrapped.remove_checkpoint(old)
        assert keys(s3_client, s3_bucket) == []  # neither checkpoint is stored at this moment
        gate.release.set()
        wrapped.teardown()
    finally:
        gate.release.set()
        gate.undo()
    assert keys(s3_client, s3_bucket) == ["run/new.ckpt"]


def test_local_paths_go_to_lightnings_torch_checkpoint_io(tmp_path):
    io = CloudCheckpointIO()
    path = str(tmp_path / "sub" / "last.ckpt")
    io.save_checkpoint(small_checkpoint(4), path)
    assert torch.load(path, weights_only=True)["global_step"] == 4  # no ckptcloud trailer or naming involved
    assert io.load_checkpoint(path)["global_step"] == 4
    io.remove_checkpoint(path)
    assert not (tmp_path / "sub" / "last.ckpt").exists()
    with pytest.raises(TypeError, match="storage_options"):
        io.save_checkpoint(small_checkpoint(4), path, storage_options={"x": 1})


def test_loads_resolve_weights_only_as_torch_load_does(s3_endpoint, s3_bucket, monkeypatch):
    import argparse

    io = CloudCheckpointIO(endpoint_url=s3_endpoint.url)
    url = f"s3://{s3_bucket}/run/hparams.ckpt"
    io.save_checkpoint({"hyper_parameters": argparse.Namespace(lr=0.1), "global_step": 1}, url)
    with pytest.raises(ValueError, match=r"argparse\.Namespace.*add_safe_globals"):
        io.load_checkpoint(url)  # None -> True on torch >= 2.6, like Lightning's own loads
    assert io.load_checkpoint(url, weights_only=False)["hyper_parameters"].lr == 0.1
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    assert io.load_checkpoint(url)["global_step"] == 1
    with pytest.raises(FileNotFoundError, match=f"s3://{s3_bucket}/run/missing.ckpt"):
        io.load_checkpoint(f"s3://{s3_bucket}/run/missing.ckpt")


def test_one_saver_per_bucket_is_reused_and_the_plugin_pickles_without_clients(s3_endpoint, s3_bucket):
    io = CloudCheckpointIO(endpoint_url=s3_endpoint.url)
    first = io.saver_for(f"s3://{s3_bucket}/a/x.ckpt")
    assert io.saver_for(f"s3://{s3_bucket}/b/y.ckpt") is first
    io.save_checkpoint(small_checkpoint(5), f"s3://{s3_bucket}/a/x.ckpt")
    clone = pickle.loads(pickle.dumps(io))  # what ddp_spawn does to the Trainer's plugins
    assert clone.load_checkpoint(f"s3://{s3_bucket}/a/x.ckpt")["global_step"] == 5
    assert clone.saver_for(f"s3://{s3_bucket}/a/x.ckpt") is not first
    with pytest.raises(ValueError, match="sets `require_empty` itself"):
        CloudCheckpointIO(require_empty=True)


MEMORY_PROBE = r"""
import json, sys, torch
from ckptcloud.lightning import CloudCheckpointIO

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

endpoint, url, size_mib, part_mib, conc = sys.argv[1:6]
io = CloudCheckpointIO(endpoint_url=endpoint, part_size=int(part_mib) << 20, max_concurrency=int(conc))
io.save_checkpoint({"warm-up": torch.ones(1)}, url)  # the client and its connections exist before measuring
checkpoint = {"state_dict": {f"layer{i}.weight": torch.randn(64 << 18) for i in range(int(size_mib) // 64)},
              "epoch": 3, "global_step": 8, "hyper_parameters": {"lr": 0.1}}
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) starts again from here
before = status("VmRSS")
io.save_checkpoint(checkpoint, url)
print(json.dumps({"extra": status("VmHWM") - before}))
"""


def test_a_lightning_save_holds_no_serialized_copy_of_the_checkpoint(s3_endpoint, s3_client, s3_bucket):
    """Peak extra memory of ``save_checkpoint`` stays within the pipeline's bound, in a fresh process: Lightning's
    fsspec path (``torch.save`` into a ``BytesIO``, then ``getvalue()``) needs twice the checkpoint instead."""
    size_mib, part_mib, conc = 256, 8, 4
    url = f"s3://{s3_bucket}/run/big.ckpt"
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, s3_endpoint.url, url, str(size_mib), str(part_mib), str(conc)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    extra = json.loads(out.stdout.strip().splitlines()[-1])["extra"]
    bound = ((conc + 2) * part_mib + 64) * MiB
    assert extra < bound, f"save used {extra / MiB:.0f} MiB extra for a {size_mib} MiB checkpoint"
    size = s3_client.head_object(Bucket=s3_bucket, Key="run/big.ckpt")["ContentLength"]
    assert size > size_mib * MiB


@pytest.mark.parametrize("scheme", ["gs", "az"])
def test_gcs_and_azure_urls_save_load_remove_and_list_through_their_savers(request, scheme):
    from tests.conftest import AZURITE_API_VERSION

    if scheme == "gs":
        bucket = request.getfixturevalue("gcs_bucket")
        options = {"client": request.getfixturevalue("gcs_client")}
    else:
        bucket = request.getfixturevalue("azure_container")
        connection = request.getfixturevalue("azure_endpoint").url
        options = {"connection_string": connection, "api_version": AZURITE_API_VERSION}
    io = CloudCheckpointIO(scheme_options={scheme: options})
    first, second = (f"{scheme}://{bucket}/run/epoch={i}-step={2 * i}.ckpt" for i in (0, 1))
    io.save_checkpoint(small_checkpoint(2), first)
    io.save_checkpoint(small_checkpoint(3), second)
    fs = fsspec.filesystem(scheme)
    assert fs.ls(f"{scheme}://{bucket}/run", detail=False) == [
        f"{bucket}/run/epoch=0-step=0.ckpt",
        f"{bucket}/run/epoch=1-step=2.ckpt",
    ]
    assert torch.equal(io.load_checkpoint(first)["state_dict"]["w"], torch.full((1024,), 2.0))
    io.remove_checkpoint(first)  # loaded by this plugin: kept
    io.remove_checkpoint(second)
    assert fs.exists(first) and not fs.exists(second)


def test_another_clouds_options_are_refused_when_the_saver_is_made(s3_endpoint, gcs_client):
    io = CloudCheckpointIO(endpoint_url=s3_endpoint.url, scheme_options={"gs": {"client": gcs_client}})
    with pytest.raises(TypeError, match=r"\['endpoint_url'\] are not options of GCSSaver.*scheme_options"):
        io.saver_for("gs://bucket/run/x.ckpt")


def test_lightnings_default_checkpoint_io_also_works_through_the_filesystem(s3_endpoint, s3_client, s3_bucket):
    """Without the plugin (ckptcloud.lightning merely imported, no s3fs), Lightning's ``TorchCheckpointIO`` saves
    inside ``fs.transaction`` through ckptcloud's filesystem: the object appears only when the transaction ends."""
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    CloudCheckpointIO(endpoint_url=s3_endpoint.url)  # the filesystem's savers (endpoint, credentials)
    fs = fsspec.filesystem("s3")
    if not isinstance(fs, ObjectStoreFileSystem):
        pytest.skip("s3fs is installed: fsspec uses it")
    url = f"s3://{s3_bucket}/run/plain.ckpt"
    with fs.transaction:
        with fs.open(url, "wb") as file:
            file.write(b"not yet")
        assert not fs.exists(url)  # closed, but the transaction has not ended
    assert fs.cat_file(url) == b"not yet"
    with pytest.raises(RuntimeError), fs.transaction:
        with fs.open(f"s3://{s3_bucket}/run/discarded.ckpt", "wb") as file:
            file.write(b"x")
        raise RuntimeError("the transaction fails")
    assert not fs.exists(f"s3://{s3_bucket}/run/discarded.ckpt")
    assert incomplete_uploads(s3_client, s3_bucket) == []

    plain = TorchCheckpointIO()
    plain.save_checkpoint(small_checkpoint(6), url)
    assert plain.load_checkpoint(url)["global_step"] == 6
    plain.remove_checkpoint(url)
    assert keys(s3_client, s3_bucket) == []
