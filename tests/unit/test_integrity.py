"""The integrity trailer: written with every checkpoint, checked before anything is unpickled."""

from __future__ import annotations

import argparse
import io
import pickle

import pytest
import torch

from ckptcloud import DiskSaver, serialization
from ckptcloud.errors import IntegrityError
from ckptcloud.remote import RemoteSaver
from ckptcloud.serialization import TRAILER_MAGIC, TRAILER_SIZE
from ckptcloud.stores.base import MiB
from ckptcloud.stores.memory import MemoryStore


def saved(obj) -> bytes:
    buf = io.BytesIO()
    serialization.save(obj, buf)
    return buf.getvalue()


def _plain_save(obj, *, zip_crc32: bool) -> bytes:
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(zip_crc32)
    try:
        plain = io.BytesIO()
        torch.save(obj, plain)
        return plain.getvalue()
    finally:
        torch.serialization.set_crc32_options(before)


def test_trailer_records_length_and_crc32c_of_the_torch_bytes():
    obj = {"w": torch.arange(1000.0)}
    data = saved(obj)
    plain = io.BytesIO(_plain_save(obj, zip_crc32=False))  # ckptcloud's saves skip torch's zip CRC32s (the trailer)
    assert data[:-TRAILER_SIZE] == plain.getvalue()
    assert data[-TRAILER_SIZE:].startswith(TRAILER_MAGIC)
    assert int.from_bytes(data[-12:-4], "big") == len(plain.getvalue())
    assert serialization.crc32c(memoryview(plain.getvalue())) == int.from_bytes(data[-4:], "big")


def test_zip_crc32_is_off_only_during_ckptcloud_saves_and_can_be_kept(monkeypatch):
    obj = {"w": torch.arange(1000.0)}
    assert torch.serialization.get_crc32_options() is True
    saved(obj)
    assert torch.serialization.get_crc32_options() is True  # the user's setting is back after the save
    with pytest.raises((AttributeError, TypeError, pickle.PicklingError)):
        serialization.save({"f": lambda: 0}, io.BytesIO())  # torch.save fails before its first write
    assert torch.serialization.get_crc32_options() is True
    monkeypatch.setattr(serialization, "TORCH_ZIP_CRC32", True)
    assert saved(obj)[:-TRAILER_SIZE] == _plain_save(obj, zip_crc32=True)  # byte for byte torch.save's output


def test_files_with_a_trailer_still_load_with_plain_torch_load(tmp_path):
    path = tmp_path / "x.pt"
    path.write_bytes(saved({"w": torch.ones(3)}))
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))
    assert torch.equal(torch.load(path, weights_only=True, mmap=True)["w"], torch.ones(3))


@pytest.mark.parametrize("where", ["start", "middle", "last-data-byte", "trailer-crc"])
def test_a_flipped_byte_is_refused_before_unpickling(tmp_path, monkeypatch, where):
    data = bytearray(saved({"w": torch.randn(100_000)}))
    index = {"start": 10, "middle": len(data) // 2, "last-data-byte": len(data) - TRAILER_SIZE - 1}.get(
        where, len(data) - 1
    )
    data[index] ^= 0x01
    (tmp_path / "bad.pt").write_bytes(bytes(data))

    def never(*args, **kwargs):
        raise AssertionError("torch.load ran on damaged bytes")

    monkeypatch.setattr(serialization.torch, "load", never)
    with pytest.raises(IntegrityError, match=r"bad\.pt is damaged: CRC32C .* it was not loaded"):
        serialization.load(tmp_path / "bad.pt")


def test_a_length_mismatch_is_refused(tmp_path):
    data = saved({"w": torch.randn(1000)})
    (tmp_path / "cut.pt").write_bytes(data[:100] + data[-TRAILER_SIZE:])
    with pytest.raises(IntegrityError, match="recorded"):
        serialization.load(tmp_path / "cut.pt")


def test_a_truncated_file_is_never_loaded(tmp_path):
    data = saved({"w": torch.randn(1000)})
    (tmp_path / "short.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a torch checkpoint"):
        serialization.load(tmp_path / "short.pt")


def test_checkpoints_saved_by_plain_torch_load_unverified(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "foreign.pt")
    assert torch.equal(serialization.load(tmp_path / "foreign.pt")["w"], torch.ones(2))


def test_disk_and_remote_savers_refuse_a_corrupted_checkpoint(tmp_path):
    disk = DiskSaver(tmp_path)
    disk({"w": torch.randn(10_000)}, "a.pt")
    raw = bytearray((tmp_path / "a.pt").read_bytes())
    raw[len(raw) // 3] ^= 0xFF
    (tmp_path / "a.pt").write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match=r"a\.pt is damaged"):
        disk.load("a.pt")

    store = MemoryStore("bucket")
    remote = RemoteSaver(store, "p", part_size=5 * MiB)
    remote({"w": torch.randn(3 * MiB)}, "b.pt")  # 12 MiB: multipart
    body, meta, mtime = store.objects["p/b.pt"]
    damaged = bytearray(body)
    damaged[7 * MiB] ^= 0x10
    store.objects["p/b.pt"] = (bytes(damaged), meta, mtime)
    with pytest.raises(IntegrityError, match=r"mem://bucket/p/b\.pt is damaged"):
        remote.load("b.pt")


def test_a_pickle_that_weights_only_refuses_says_how_to_opt_out(tmp_path):
    torch.save({"args": argparse.Namespace(lr=0.1)}, tmp_path / "custom.pt")
    with pytest.raises(ValueError, match="If you trust its source, pass weights_only=False"):
        serialization.load(tmp_path / "custom.pt")
    assert serialization.load(tmp_path / "custom.pt", weights_only=False)["args"].lr == 0.1


def test_something_that_is_not_a_checkpoint_is_named(tmp_path):
    (tmp_path / "notes.pt").write_bytes(b"these are not the weights you are looking for" * 10)
    with pytest.raises(ValueError, match=r"notes\.pt is not a torch checkpoint"):
        serialization.load(tmp_path / "notes.pt")
    (tmp_path / "pickle.pt").write_bytes(b"\x80\x04garbage that looks like a pickle")
    with pytest.raises(ValueError, match=r"pickle\.pt is not a torch checkpoint"):
        serialization.load(tmp_path / "pickle.pt")


@pytest.mark.parametrize("mmap", [True, False])
def test_remote_load_maps_or_copies_the_tensors_and_both_are_writable(mmap):
    saver = RemoteSaver(MemoryStore(), "run")
    state = {"w": torch.randn(256 * 1024), "step": 3}
    saver(state, "ckpt.pt")
    back = saver.load("ckpt.pt", mmap=mmap)
    assert torch.equal(back["w"], state["w"]) and back["step"] == 3
    back["w"].add_(1.0)  # an in-place update (optimizer state) works on mapped pages too: copy on write
    assert torch.equal(back["w"], state["w"] + 1.0)
    assert torch.equal(saver.load("ckpt.pt", mmap=mmap)["w"], state["w"])  # the stored bytes are untouched


def test_disk_load_with_mmap_verifies_the_trailer_first(tmp_path):
    path = tmp_path / "c.pt"
    DiskSaver(tmp_path, require_empty=False)({"w": torch.arange(1000.0)}, "c.pt")
    assert torch.equal(serialization.load(path, mmap=True)["w"], torch.arange(1000.0))
    assert torch.equal(DiskSaver(tmp_path, require_empty=False).load("c.pt", mmap=True)["w"], torch.arange(1000.0))
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        serialization.load(path, mmap=True)
