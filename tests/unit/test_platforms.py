"""Platforms: Linux and macOS work (macOS's code paths forced here on Linux), Windows is refused at once, clearly."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from ckptcloud import Checkpoint, DiskSaver, RemoteSaver, handlers
from ckptcloud.stores.memory import MemoryStore


def test_windows_is_refused_at_import_with_what_to_use_instead():
    code = "import sys; sys.platform = 'win32'; import ckptcloud"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: ckptcloud supports Linux and macOS; on Windows use WSL2"), done.stderr


def test_downloads_work_where_os_pwrite_is_missing(monkeypatch):
    store = MemoryStore("bucket", min_part_size=4096)
    saver = RemoteSaver(store, "run", part_size=64 * 1024, max_concurrency=4)
    state = {"w": torch.randn(256 * 1024)}  # 1 MiB: four ranges written in parallel
    saver(state, "model_1.pt")
    monkeypatch.delattr(os, "pwrite")
    assert torch.equal(saver.load("model_1.pt")["w"], state["w"])
    assert torch.equal(saver.load("model_1.pt", mmap=True)["w"], state["w"])


@pytest.fixture
def macos_fd_paths(monkeypatch):
    """Act like macOS: no /proc/self/fd, and opening /dev/fd/N is dup(N), sharing the file offset.

    (On Linux /dev/fd/N is /proc/self/fd/N, a new open file with its own offset, so the sharing is made explicit.)
    Returns the /dev/fd paths torch opened.
    """
    is_dir = os.path.isdir
    monkeypatch.setattr(os.path, "isdir", lambda path: path != "/proc/self/fd" and is_dir(path))
    opened: list[str] = []

    def open_like_macos(name, mode="r", *args, **kwargs):
        if isinstance(name, str) and name.startswith("/dev/fd/"):
            opened.append(name)
            return os.fdopen(os.dup(int(name.rsplit("/", 1)[1])), mode)
        return open(name, mode, *args, **kwargs)

    monkeypatch.setattr(torch.serialization, "open", open_like_macos, raising=False)
    return opened


def test_mmap_loads_work_where_the_fd_path_shares_the_file_offset(tmp_path, macos_fd_paths):
    state = {"w": torch.arange(100_000.0), "step": 7}
    saver = RemoteSaver(MemoryStore("bucket"), "run")
    saver(state, "model_1.pt")
    back = saver.load("model_1.pt", mmap=True)  # an unnamed temporary file: only reachable through its fd
    assert torch.equal(back["w"], state["w"]) and back["step"] == 7
    disk = DiskSaver(tmp_path)
    disk(state, "model_1.pt")
    assert torch.equal(disk.load("model_1.pt", mmap=True)["w"], state["w"])
    assert len(macos_fd_paths) == 2 and all(path.startswith("/dev/fd/") for path in macos_fd_paths)


def test_colons_stay_valid_in_checkpoint_names_on_linux_and_macos(tmp_path):
    # ignite does not restrict filename_prefix or score_name: timestamps put ':' in names, and object stores take it
    checkpoint = Checkpoint({"model": torch.nn.Linear(2, 2)}, DiskSaver(tmp_path), filename_prefix="2026-12-01T10:00")
    checkpoint.save(global_step=1)
    assert os.path.basename(checkpoint.last_checkpoint) == "2026-12-01T10:00_model_1.pt"
    assert (tmp_path / "2026-12-01T10:00_model_1.pt").exists()


@pytest.mark.parametrize("name", ["C:evil.pt", "model_1.pt:stream", "2026-12-01T10:00_model_1.pt"])
def test_disk_saver_on_windows_refuses_drive_and_stream_names(tmp_path, monkeypatch, name):
    monkeypatch.setattr(handlers, "_WINDOWS", True)  # ckptcloud does not import on Windows; this guards the saver
    saver = DiskSaver(tmp_path)
    with pytest.raises(ValueError, match="should not contain ':' for a DiskSaver on Windows"):
        saver({"w": torch.ones(1)}, name)
    with pytest.raises(ValueError, match="should not contain ':'"):
        saver.load(name)
    assert list(tmp_path.iterdir()) == []
