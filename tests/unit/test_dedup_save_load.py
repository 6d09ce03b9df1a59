"""Deduplicated saves on the in-memory store: the rebuilt file is exactly a plain save's, and errors name things."""

from __future__ import annotations

import io
import sys
import tempfile
import time

import pytest
import torch

from ckptcloud import Checkpoint
from ckptcloud.dedup import manifest
from ckptcloud.dedup.load import MissingBlobError, rebuild_if_manifest
from ckptcloud.errors import IntegrityError, RemoteSaveError
from ckptcloud.remote import RemoteSaver
from ckptcloud.stores.memory import MemoryStore
from tests.helpers import MiB, assert_same, dtype_zoo, stored_bytes, training_state

PART = 5 * MiB


def saver(store: MemoryStore | None = None, **options) -> RemoteSaver:
    return RemoteSaver(store or MemoryStore(), "run", dedup=True, part_size=PART, require_empty=False, **options)


def big_state() -> dict:
    torch.manual_seed(0)
    w = torch.randn(3000, 1000)  # 12 MB: three chunks of 5 MiB
    return {
        "model": {"w": w, "tied": w, "t": w.t(), "col": w[:, 5], "small": torch.ones(10)},
        "zoo": dtype_zoo(),
        "train": training_state(),
        "step": 7,
        "note": "text",
        "nothing": None,
    }


def rebuilt(s: RemoteSaver, name: str) -> bytes:
    with tempfile.TemporaryFile() as file:
        file.write(s.store.objects[s.key(name)][0])  # type: ignore[attr-defined]
        file.flush()
        rebuild_if_manifest(s, name, file)
        file.seek(0)
        return file.read()


def test_rebuilt_file_is_byte_for_byte_the_plain_save():
    s, state = saver(), big_state()
    s(state, "model_1.pt")
    assert rebuilt(s, "model_1.pt") == stored_bytes(state)


def test_manifest_is_small_marked_and_loads_weights_only():
    s, state = saver(), big_state()
    s(state, "model_1.pt")
    body, meta, _ = s.store.objects["run/model_1.pt"]
    assert len(body) < 1 * MiB and meta[manifest.METADATA_KEY] == manifest.METADATA_VALUE
    assert manifest.is_manifest_head(body[: manifest.SNIFF_BYTES])
    assert torch.load(io.BytesIO(body), weights_only=True)["format"] == manifest.FORMAT


def test_load_keeps_shared_storages_views_and_non_tensor_leaves():
    s, state = saver(), big_state()
    s(state, "model_1.pt")
    out = s.load("model_1.pt", weights_only=True)
    assert_same(state, out)
    m = out["model"]
    assert m["w"].untyped_storage().data_ptr() == m["t"].untyped_storage().data_ptr() == m["col"].data_ptr() - 20
    assert m["t"].stride() == (1, 1000) and m["col"].stride() == (1000,)
    assert out["nothing"] is None and out["note"] == "text"


def test_unchanged_storages_are_never_uploaded_again():
    s = saver()
    torch.manual_seed(0)
    base = {f"layer{i}": torch.randn(1024, 1024) for i in range(4)}  # 16 MiB frozen
    adapter = torch.randn(64, 1024)  # 256 KiB trainable
    s({"base": base, "adapter": adapter}, "model_1.pt")
    assert s.dedup.last.uploaded_bytes == 4 * 4 * MiB + adapter.nbytes
    requests = len(s.store.requests)
    adapter.add_(1)
    s({"base": base, "adapter": adapter}, "model_2.pt")
    assert s.dedup.last.uploaded_bytes == adapter.nbytes and s.dedup.last.reused_bytes == 16 * MiB
    assert s.store.requests[requests:].count("put") == 2  # the adapter's blob and the manifest
    assert_same(s.load("model_2.pt")["adapter"], adapter)


def test_blob_another_writer_stored_is_reused_not_uploaded():
    store = MemoryStore()
    first, second = saver(store), saver(store)
    state = {"w": torch.randn(256, 1024)}
    first(state, "model_1.pt")
    second(state, "model_2.pt")  # its index was listed at its first save: the blob is known
    assert second.dedup.last.uploaded_bytes == 0
    third = saver(store)
    third.dedup.index.listed = True  # it never listed: the conditional create finds the blob
    third(state, "model_3.pt")
    assert third.dedup.last.uploaded_bytes == 0
    assert [k for k in store.objects if ".blobs/" in k] == [k for k in store.objects if ".blobs/" in k][:1]


def test_blob_older_than_half_the_grace_is_stored_again_under_a_new_name():
    store = MemoryStore()
    s = saver(store, dedup_grace=100.0)
    state = {"w": torch.randn(256, 1024)}
    s(state, "model_1.pt")
    (key,) = [k for k in store.objects if ".blobs/" in k]
    body, meta, _ = store.objects[key]
    store.objects[key] = (body, meta, time.time() - 60)  # 60 s > grace / 2
    late = saver(store, dedup_grace=100.0)
    late(state, "model_2.pt")
    assert late.dedup.last.uploaded_bytes == state["w"].nbytes
    blobs = sorted(k for k in store.objects if ".blobs/" in k)
    assert len(blobs) == 2 and blobs[1].startswith(key + ".")
    assert_same(late.load("model_2.pt"), state)


def test_commit_is_refused_when_a_referenced_blob_may_be_collected(monkeypatch):
    import types

    from ckptcloud.dedup import save as dedup_save

    s = saver(dedup_grace=100.0)
    state = {"w": torch.randn(256, 1024)}
    s(state, "model_1.pt")
    later = types.SimpleNamespace(time=lambda: time.time() + 76)  # the commit comes after 3/4 of the grace
    monkeypatch.setattr(dedup_save, "time", later)
    with pytest.raises(RemoteSaveError, match="dedup_grace"):
        s(state, "model_2.pt")
    assert "run/model_2.pt" not in s.store.objects and not s.store.uploads


def test_missing_blob_error_names_the_checkpoint_and_the_tensor():
    s = saver()
    s({"model": {"encoder.weight": torch.randn(256, 1024)}}, "model_1.pt")
    (key,) = [k for k in s.store.objects if ".blobs/" in k]
    del s.store.objects[key]
    with pytest.raises(MissingBlobError, match=r"model_1\.pt.*model\.encoder\.weight.*missing"):
        s.load("model_1.pt")


def test_damaged_blob_is_refused_naming_the_tensor():
    s = saver()
    s({"model": {"head": torch.randn(256, 1024)}}, "model_1.pt")
    (key,) = [k for k in s.store.objects if ".blobs/" in k]
    body, meta, mtime = s.store.objects[key]
    s.store.objects[key] = (b"\x01" + body[1:], meta, mtime)
    with pytest.raises(IntegrityError, match=r"model_1\.pt.*'model\.head'.*damaged"):
        s.load("model_1.pt")


def test_plain_saver_loads_a_dedup_checkpoint():
    store = MemoryStore()
    state = {"w": torch.randn(256, 1024), "k": 1}
    saver(store)(state, "model_1.pt")
    assert_same(RemoteSaver(store, "run", require_empty=False).load("model_1.pt"), state)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="dedup_grace"):
        saver(dedup_grace=0)
    with pytest.raises(ValueError, match="dedup_grace"):
        RemoteSaver(MemoryStore(), dedup_grace=10.0)
    with pytest.raises(TypeError, match="dedup"):
        RemoteSaver(MemoryStore(), dedup="yes")


def test_without_blake3_dedup_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "blake3", None)
    with pytest.raises(ImportError, match=r"ckptcloud\[dedup\]"):
        saver()


def test_sharded_with_dedup_is_refused_clearly():
    with pytest.raises(NotImplementedError, match=r"dedup=True.*sharded"):
        Checkpoint({"model": torch.nn.Linear(2, 2)}, saver(), sharded=True)


def test_progress_counts_every_blob_byte_stored_or_found():
    seen: list[tuple[int, int | None]] = []
    s = saver(progress=lambda done, total: seen.append((done, total)))
    state = {"w": torch.randn(256, 1024), "v": torch.randn(256, 1024)}
    s(state, "model_1.pt")
    s(state, "model_2.pt")
    assert seen[-1] == (2 * MiB, 2 * MiB)


class CountingStore(MemoryStore):
    """Keeps only the sizes of blobs: what the save itself holds in memory is all that tracemalloc sees."""

    def put(self, key, data, metadata, when=None):
        if "/.blobs/" in key:
            self._log("put")
            with self._lock:
                self._check_condition(key, when)
                self.objects[key] = (b"", dict(metadata), time.time())
            return
        super().put(key, data, metadata, when)


def test_save_memory_stays_within_the_chunk_buffer_pool():
    import tracemalloc

    s = saver(CountingStore(), max_concurrency=2)
    data = {"w": torch.randn(16 * MiB)}  # 64 MiB: 13 chunks of 5 MiB
    tracemalloc.start()
    try:
        s(data, "model_1.pt")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert s.dedup.last.uploaded_bytes == 64 * MiB
    assert peak < (2 + 1) * PART + 4 * MiB, peak / MiB


def test_equal_chunks_within_one_save_are_uploaded_once():
    s = saver()
    zeros = {f"m{i}": torch.zeros(256, 1024) for i in range(6)}  # 6 equal 1 MiB storages
    s(zeros, "model_1.pt")
    assert s.dedup.last.uploaded_bytes == 1 * MiB and s.dedup.last.reused_bytes == 5 * MiB
    assert s.store.requests.count("put") == 2  # one blob, the manifest
    assert_same(s.load("model_1.pt"), zeros)


@pytest.mark.parametrize(
    "tamper",
    [
        lambda segments: segments[1].__setitem__(3, "../model_1.pt"),  # a key outside .blobs/
        lambda segments: segments[1].__setitem__(1, 1 << 40),  # a write far past the end
        lambda segments: segments.pop(),  # segments no longer cover the file
    ],
    ids=["blob-name", "offset", "coverage"],
)
def test_a_tampered_manifest_is_refused_before_any_blob_is_read(tamper):
    s = saver()
    s({"w": torch.randn(256, 1024)}, "model_1.pt")
    body = s.store.objects["run/model_1.pt"][0]
    parsed = torch.load(io.BytesIO(body), weights_only=True)
    tamper(parsed["segments"])
    from tests.helpers import stored_bytes as encode

    s.store.objects["run/model_1.pt"] = (encode(parsed), {}, time.time())
    reads = s.store.requests.count("read")
    with pytest.raises(ValueError, match="damaged ckptcloud-dedup/1 manifest"):
        s.load("model_1.pt")
    assert s.store.requests.count("read") == reads + 1  # the manifest only
