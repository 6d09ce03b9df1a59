"""Deduplicated checkpoints on moto S3, fake-gcs-server and Azurite: round trips, upload savings, GC, faults."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ckptcloud import Checkpoint
from ckptcloud.cli import main
from ckptcloud.dedup import collect_garbage
from ckptcloud.urls import saver_from_url
from tests.conftest import AZURITE_API_VERSION
from tests.helpers import assert_same, dtype_zoo, stored_bytes, training_state

MiB = 1024 * 1024
ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


@pytest.fixture(params=["s3", "gcs", "azure"])
def root(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """``scheme://bucket`` of a fresh bucket or container; URL savers (also in child processes) reach its emulator."""
    if request.param == "s3":
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", request.getfixturevalue("s3_endpoint").url)
        return f"s3://{request.getfixturevalue('s3_bucket')}"
    if request.param == "gcs":
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", request.getfixturevalue("gcs_endpoint").url)
        monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "test")
        return f"gs://{request.getfixturevalue('gcs_bucket')}"
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", request.getfixturevalue("azure_endpoint").url)
    monkeypatch.setenv("AZURE_STORAGE_API_VERSION", AZURITE_API_VERSION)
    return f"az://{request.getfixturevalue('azure_container')}"


def dedup_saver(root: str, prefix: str = "run", **options):
    options.setdefault("part_size", 5 * MiB)
    return saver_from_url(f"{root}/{prefix}", dedup=True, require_empty=False, **options)


def blob_names(saver) -> list[str]:
    folder = saver._base + ".blobs/"
    return sorted(info.key[len(folder) :] for info in saver.store.list(folder))


def state() -> dict:
    torch.manual_seed(0)
    w = torch.randn(1500, 1000)  # 6 MB: two chunks
    return {"model": {"w": w, "tied": w, "t": w.t(), "col": w[:, 3]}, "zoo": dtype_zoo(), "train": training_state()}


def test_round_trip_and_cli_get_are_bit_identical(root, tmp_path):
    saver, data = dedup_saver(root), state()
    saver(data, "model_1.pt")
    out = saver.load("model_1.pt", weights_only=True)
    assert_same(data, out)
    assert out["model"]["t"].untyped_storage().data_ptr() == out["model"]["w"].untyped_storage().data_ptr()
    assert main(["get", f"{root}/run/model_1.pt", str(tmp_path / "got.pt"), "-q"]) == 0
    assert (tmp_path / "got.pt").read_bytes() == stored_bytes(data)
    assert main(["ls", f"{root}/run"]) == 0
    assert main(["verify", f"{root}/run/model_1.pt", "-q"]) == 0


def test_second_save_of_a_frozen_base_uploads_only_the_changed_adapter(root):
    saver = dedup_saver(root)
    torch.manual_seed(0)
    base = {f"layer{i}": torch.randn(1024, 1024) for i in range(3)}  # 12 MiB frozen
    adapter = torch.randn(32, 1024)  # 128 KiB trained
    saver({"base": base, "adapter": adapter}, "model_1.pt")
    sent: list[tuple[str, int]] = []
    put = saver.store.put

    def counting_put(key, data, metadata, when=None):
        sent.append((key, len(data)))
        return put(key, data, metadata, when)

    saver.store.put = counting_put
    adapter.mul_(0.5)
    saver({"base": base, "adapter": adapter}, "model_2.pt")
    blobs = [size for key, size in sent if "/.blobs/" in key]
    assert blobs == [adapter.nbytes]  # one request, the adapter's bytes: the base was not sent again
    assert [key for key, _ in sent if "/.blobs/" not in key] == [saver.key("model_2.pt")]
    assert sum(size for _, size in sent) < adapter.nbytes + 64 * 1024
    assert_same(saver.load("model_2.pt")["adapter"], adapter)


def test_blob_stored_by_another_writer_is_found_by_conditional_create_and_reused(root):
    first, second = dedup_saver(root), dedup_saver(root)
    second.dedup.index.listed = True  # as if it listed before the first saver stored anything
    data = {"w": torch.randn(512, 1024)}
    first(data, "model_1.pt")
    sent: list[str] = []
    put = second.store.put
    second.store.put = lambda key, d, m, when=None: (sent.append(key), put(key, d, m, when))[1]
    second(data, "model_2.pt")
    assert second.dedup.last.uploaded_bytes == 0 and second.dedup.last.reused_bytes == data["w"].nbytes
    assert len(blob_names(second)) == 1 and len(sent) == 2  # the refused create, the manifest
    assert_same(second.load("model_2.pt"), data)


def test_eviction_and_gc_command_leave_exactly_the_kept_checkpoints_blobs(root, capsys):
    saver = dedup_saver(root, dedup_grace=2.0)
    model = torch.nn.Linear(256, 256)  # 256 KiB weight: one blob, changes every save
    ckpt = Checkpoint({"model": model}, saver, n_saved=1)
    ckpt.save(global_step=1)
    time.sleep(2.2)  # model_1's blob is now older than the grace
    with torch.no_grad():
        model.weight.add_(1)
    ckpt.save(global_step=2)  # evicts model_1: GC deletes its old blob, keeps model_2's
    assert saver.list() == ["model_2.pt"] and len(blob_names(saver)) == 1
    saver.store.put(saver._base + ".blobs/orphan", memoryview(b"x"), {})
    time.sleep(2.2)
    assert main(["gc", f"{root}/run", "--dry-run", "--grace", "2"]) == 0
    assert "would delete" in capsys.readouterr().out and len(blob_names(saver)) == 2
    assert main(["gc", f"{root}/run", "--grace", "2"]) == 0
    assert blob_names(saver) == [n for n in blob_names(saver) if n != "orphan"] and len(blob_names(saver)) == 1
    restored = torch.nn.Linear(256, 256)
    Checkpoint.load_objects({"model": restored}, saver.load("model_2.pt"))
    assert torch.equal(restored.weight, model.weight)


def test_killed_save_leaves_only_unreferenced_blobs_that_the_next_gc_removes(root):
    url = f"{root}/run"
    done = subprocess.run(
        [sys.executable, "-m", "tests.integration.dedup_worker", "kill", url, "1.0"], cwd=ROOT, env=os.environ
    )
    assert done.returncode == 17
    saver = dedup_saver(root, dedup_grace=1.0)
    assert saver.list() == [] and len(blob_names(saver)) == 2  # no manifest: the checkpoint does not exist
    time.sleep(1.2)
    report = collect_garbage(saver.store, saver._base, 1.0)
    assert len(report.deleted) == 2 and blob_names(saver) == []


def test_gc_in_another_process_during_saves_loses_nothing(root, tmp_path):
    grace = 10.0  # a save has grace / 4 (2.5 s) between its reuse checks and its commit: room on a loaded machine
    url, out = f"{root}/run", tmp_path / "deleted.json"
    gc = subprocess.Popen(
        [sys.executable, "-m", "tests.integration.dedup_worker", "gc", url, str(grace), "20", str(out)],
        cwd=ROOT,
        env=os.environ,
    )
    saver = dedup_saver(root, dedup_grace=grace)
    torch.manual_seed(0)
    frozen = torch.randn(256, 1024)
    saved = {}
    start = time.time()
    step = 0
    while time.time() - start < 17:
        step += 1
        moving = torch.full((128, 1024), float(step))
        saver({"frozen": frozen, "moving": moving}, f"model_{step}.pt")
        saved[f"model_{step}.pt"] = moving
        if step > 2:
            saver.store.delete(saver.key(f"model_{step - 2}.pt"))  # evicted; only the other process collects
            del saved[f"model_{step - 2}.pt"]
        time.sleep(0.3)
    try:
        assert gc.wait(timeout=120) == 0
    finally:
        gc.kill()
    assert json.loads(out.read_text())  # it did collect the blobs of evicted checkpoints meanwhile
    for name, moving in saved.items():
        loaded = saver.load(name)
        assert torch.equal(loaded["frozen"], frozen) and torch.equal(loaded["moving"], moving)
