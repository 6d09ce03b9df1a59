"""A full local disk, or a file-size limit, is reported with the path, the size and what to do, and leaves no file.

The small disk is simulated with RLIMIT_FSIZE (8 MiB) in a subprocess: writes past it fail with EFBIG (27), as
they would on a file system that is too small. A full disk (ENOSPC) is simulated by failing the write.
"""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ckptcloud import RemoteSaver, serialization
from ckptcloud.stores.memory import MemoryStore

MiB = 1024 * 1024

LIMITED = textwrap.dedent(
    """
    import json, os, resource, sys
    import torch
    from ckptcloud import DiskSaver, RemoteSaver
    from ckptcloud.stores.memory import MemoryStore

    which, folder, concurrency = sys.argv[1], sys.argv[2], int(sys.argv[3])
    state = {"w": torch.randn(6 << 20)}  # 24 MiB of tensors
    if which == "remote load":
        saver = RemoteSaver(MemoryStore("b"), "run", part_size=8 << 20, max_concurrency=concurrency, tmp_dir=folder)
        saver(state, "model_1.pt")  # in memory: no file yet
    resource.setrlimit(resource.RLIMIT_FSIZE, (8 << 20, 8 << 20))
    try:
        if which == "remote load":
            saver.load("model_1.pt")
        else:
            DiskSaver(folder, require_empty=False)(state, "model_1.pt")
        print(json.dumps({"raised": None}))
    except Exception as err:
        print(json.dumps({"raised": type(err).__name__, "oserror": isinstance(err, OSError),
                          "errno": getattr(err, "errno", None), "message": str(err)}))
    """
)


def _run_limited(which: str, folder, concurrency: int = 1) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", LIMITED, which, str(folder), str(concurrency)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("concurrency", [1, 4])  # one streaming GET, or ranged GETs written in parallel
def test_a_remote_load_into_a_too_small_tmp_dir_names_object_size_folder_and_tmp_dir(tmp_path, concurrency):
    result = _run_limited("remote load", tmp_path, concurrency)
    assert result["raised"] == "LocalWriteError" and result["oserror"] and result["errno"] == errno.EFBIG
    message = result["message"]
    assert message.startswith("could not write the 25167425-byte download of mem://b/run/model_1.pt into ")
    assert f"into {tmp_path} (File too large" in message
    assert "pass tmp_dir= (or set TMPDIR) to a folder with room" in message
    assert os.listdir(tmp_path) == []  # the temporary file is gone


def test_disk_saver_over_a_size_limit_raises_the_os_error_with_the_path_and_size_needed(tmp_path):
    result = _run_limited("disk save", tmp_path)
    assert result["raised"] == "LocalWriteError" and result["oserror"] and result["errno"] == errno.EFBIG
    message = result["message"]
    assert message.startswith(f"could not write model_1.pt into {tmp_path} (File too large")
    assert "needs about 25165824 bytes" in message and "unexpected pos" not in message
    assert os.listdir(tmp_path) == []  # no temporary file, no partial checkpoint


@pytest.mark.parametrize("concurrency", [1, 4])
def test_a_full_disk_during_a_download_says_no_space_and_where(tmp_path, monkeypatch, concurrency):
    store = MemoryStore("b", min_part_size=4096)
    saver = RemoteSaver(store, "run", part_size=64 * 1024, max_concurrency=concurrency, tmp_dir=str(tmp_path))
    saver({"w": torch.ones(256 * 1024)}, "model_1.pt")  # 1 MiB: four ranges at once with concurrency 4

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(OSError) as caught:
        saver.load("model_1.pt")
    assert caught.value.errno == errno.ENOSPC
    assert str(caught.value).startswith("could not write the ")
    assert f"-byte download of mem://b/run/model_1.pt into {tmp_path} (No space left on device)" in str(caught.value)
    assert os.listdir(tmp_path) == []


class _FullAfter(io.RawIOBase):
    """A stream whose disk fills up after ``room`` bytes."""

    def __init__(self, room: int) -> None:
        super().__init__()
        self.room = room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return len(data)


def test_a_failing_write_surfaces_as_itself_not_as_torchs_unexpected_pos(tmp_path):
    with pytest.raises(OSError) as caught:
        serialization.save({"w": torch.ones(MiB)}, _FullAfter(1000))
    assert caught.value.errno == errno.ENOSPC
    assert "unexpected pos" not in str(caught.value)
