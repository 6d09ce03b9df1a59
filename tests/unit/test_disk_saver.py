"""DiskSaver: atomic local files, folder checks, rank gating and filename safety."""

from __future__ import annotations

import os
import stat
import zipfile
from pathlib import Path

import pytest
import torch

from ckptcloud import BaseSaveHandler, DiskSaver


class Unpicklable:
    """Raises while ``torch.save`` pickles it, after part of the file may already have been written."""

    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


def listing(folder: Path) -> list[str]:
    """Every entry in ``folder``, hidden temp files included."""
    return sorted(os.listdir(folder))


def test_disk_saver_is_a_save_handler(tmp_path):
    assert isinstance(DiskSaver(tmp_path), BaseSaveHandler)


def test_saved_file_loads_back_equal(tmp_path):
    saver = DiskSaver(tmp_path)
    state = {"weight": torch.arange(6.0).reshape(2, 3), "step": 7, "nested": {"names": ["a", "b"]}}
    saver(state, "model_7.pt", {"basename": "model", "score_name": None, "priority": 7})

    loaded = saver.load("model_7.pt")
    assert torch.equal(loaded["weight"], state["weight"])
    assert loaded["step"] == 7
    assert loaded["nested"] == {"names": ["a", "b"]}
    assert torch.load(tmp_path / "model_7.pt", weights_only=True)["step"] == 7  # a plain torch file
    assert saver.list() == ["model_7.pt"]


def test_atomic_save_leaves_no_temp_files(tmp_path):
    saver = DiskSaver(tmp_path)
    saver({"w": torch.ones(3)}, "model_1.pt")
    saver({"w": torch.zeros(3)}, "model_1.pt")
    saver({"w": torch.ones(1)}, "model_2.pt")
    assert listing(tmp_path) == ["model_1.pt", "model_2.pt"]


def test_failed_save_keeps_the_previous_file_and_leaves_no_temp_files(tmp_path):
    saver = DiskSaver(tmp_path)
    saver({"w": torch.ones(3)}, "model.pt")
    before = (tmp_path / "model.pt").read_bytes()

    with pytest.raises(RuntimeError, match="cannot pickle this"):
        saver({"w": torch.zeros(1000), "bad": Unpicklable()}, "model.pt")

    assert listing(tmp_path) == ["model.pt"]
    assert (tmp_path / "model.pt").read_bytes() == before
    assert torch.equal(saver.load("model.pt")["w"], torch.ones(3))


def test_failed_first_save_creates_no_file(tmp_path):
    saver = DiskSaver(tmp_path)
    with pytest.raises(RuntimeError, match="cannot pickle this"):
        saver({"bad": Unpicklable()}, "model.pt")
    assert listing(tmp_path) == []


def test_overwrite_replaces_the_file_instead_of_rewriting_it(tmp_path):
    saver = DiskSaver(tmp_path)
    saver({"w": torch.ones(3)}, "model.pt")
    with open(tmp_path / "model.pt", "rb") as old:  # a reader that opened the old file keeps reading it whole
        saver({"w": torch.zeros(3)}, "model.pt")
        assert torch.equal(torch.load(old, weights_only=True)["w"], torch.ones(3))
    assert torch.equal(saver.load("model.pt")["w"], torch.zeros(3))


def test_saved_file_is_readable_by_group_and_others(tmp_path):
    DiskSaver(tmp_path)({"w": torch.ones(1)}, "model.pt")
    mode = (tmp_path / "model.pt").stat().st_mode
    assert mode & stat.S_IRUSR
    assert mode & stat.S_IRGRP
    assert mode & stat.S_IROTH


def test_saved_files_follow_the_umask_so_private_checkpoints_stay_private(tmp_path):
    previous = os.umask(0o077)  # a shared machine where the user keeps files private
    try:
        DiskSaver(tmp_path)({"w": torch.ones(1)}, "model.pt")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "model.pt").stat().st_mode) == 0o600


def test_non_atomic_save_writes_the_file_directly(tmp_path):
    saver = DiskSaver(tmp_path, atomic=False)
    saver({"w": torch.ones(2)}, "model.pt")
    assert listing(tmp_path) == ["model.pt"]
    assert torch.equal(saver.load("model.pt")["w"], torch.ones(2))


def test_create_dir_makes_missing_parents(tmp_path):
    folder = tmp_path / "a" / "b"
    saver = DiskSaver(folder)
    assert folder.is_dir()
    assert saver.dirname == folder
    saver({"w": torch.ones(1)}, "model.pt")
    assert (folder / "model.pt").is_file()


def test_missing_dir_without_create_dir_raises_value_error(tmp_path):
    folder = tmp_path / "missing"
    with pytest.raises(ValueError, match="is not found"):
        DiskSaver(folder, create_dir=False)
    assert not folder.exists()
    DiskSaver(tmp_path, create_dir=False)  # an existing folder is fine


def test_dirname_must_be_a_str_or_path():
    with pytest.raises(TypeError, match="Argument `dirname` should be a str or Path, but given <class 'int'>"):
        DiskSaver(3)


def test_require_empty_refuses_a_folder_with_pt_files(tmp_path):
    (tmp_path / "old_1.pt").write_bytes(b"x")
    (tmp_path / "old_2.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match="pass `require_empty=False`") as info:
        DiskSaver(tmp_path)
    assert "['old_1.pt', 'old_2.pt']" in str(info.value)

    saver = DiskSaver(tmp_path, require_empty=False)
    saver({"w": torch.ones(1)}, "new.pt")
    assert listing(tmp_path) == ["new.pt", "old_1.pt", "old_2.pt"]


def test_require_empty_counts_only_pt_files(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "model.pth").write_bytes(b"x")
    (tmp_path / "model.pt.bak").write_bytes(b"x")
    DiskSaver(tmp_path)  # nothing that ends in .pt: accepted


def test_other_rank_writes_and_removes_nothing_in_a_single_process(tmp_path):
    folder = tmp_path / "not-created"
    saver = DiskSaver(folder, save_on_rank=1)
    assert not folder.exists()  # rank 0 does not set the folder up either
    saver({"w": torch.ones(1)}, "model.pt")
    assert not folder.exists()

    (tmp_path / "keep.pt").write_bytes(b"x")
    DiskSaver(tmp_path, save_on_rank=1).remove("keep.pt")
    assert (tmp_path / "keep.pt").exists()


def test_torch_save_kwargs_are_forwarded(tmp_path):
    DiskSaver(tmp_path)({"w": torch.ones(2)}, "zip.pt")
    legacy = DiskSaver(tmp_path, require_empty=False, _use_new_zipfile_serialization=False, pickle_protocol=3)
    legacy({"w": torch.ones(2)}, "legacy.pt")

    assert zipfile.is_zipfile(tmp_path / "zip.pt")
    assert not zipfile.is_zipfile(tmp_path / "legacy.pt")
    assert (tmp_path / "legacy.pt").read_bytes()[:2] == b"\x80\x03"  # pickle protocol 3 header
    assert torch.equal(legacy.load("legacy.pt", weights_only=False)["w"], torch.ones(2))


def test_remove_deletes_the_file(tmp_path):
    saver = DiskSaver(tmp_path)
    saver({"w": torch.ones(1)}, "a.pt")
    saver({"w": torch.ones(1)}, "b.pt")
    saver.remove("a.pt")
    assert listing(tmp_path) == ["b.pt"]


def test_remove_of_a_missing_file_is_not_an_error(tmp_path):
    saver = DiskSaver(tmp_path)
    saver.remove("never_saved.pt")
    saver({"w": torch.ones(1)}, "a.pt")
    saver.remove("a.pt")
    saver.remove("a.pt")  # a replayed removal after a restart
    assert listing(tmp_path) == []


@pytest.mark.parametrize(
    "filename", ["../x.pt", "/abs.pt", "a/../b.pt", "./x.pt", "a//b.pt", "", "a\\..\\b.pt", "a\nb.pt", "../"]
)
def test_filenames_that_escape_the_folder_are_refused(tmp_path, filename):
    folder = tmp_path / "ckpt"
    saver = DiskSaver(folder)
    for call in (lambda: saver({"w": 1}, filename), lambda: saver.remove(filename), lambda: saver.load(filename)):
        with pytest.raises(ValueError, match="`filename`"):
            call()
    assert listing(tmp_path) == ["ckpt"]
    assert listing(folder) == []


def test_filename_must_be_a_string(tmp_path):
    with pytest.raises(TypeError, match="`filename` should be a str"):
        DiskSaver(tmp_path)({"w": 1}, Path("model.pt"))


def test_filename_may_name_a_subfolder(tmp_path):
    saver = DiskSaver(tmp_path)
    saver({"w": torch.ones(1)}, "run1/model_1.pt")
    assert (tmp_path / "run1" / "model_1.pt").is_file()
    assert listing(tmp_path / "run1") == ["model_1.pt"]
    assert torch.equal(saver.load("run1/model_1.pt")["w"], torch.ones(1))


def test_url_is_a_file_uri_of_the_saved_file(tmp_path):
    saver = DiskSaver(tmp_path)
    assert saver.url("model.pt") == (tmp_path / "model.pt").resolve().as_uri()


def test_mmap_loads_are_refused_where_files_are_rewritten_in_place(tmp_path):
    saver = DiskSaver(tmp_path, atomic=False)
    saver({"w": torch.zeros(4)}, "model.pt")
    with pytest.raises(ValueError, match=r"mmap=True.*atomic=False"):
        saver.load("model.pt", mmap=True)
    assert torch.equal(saver.load("model.pt")["w"], torch.zeros(4))
