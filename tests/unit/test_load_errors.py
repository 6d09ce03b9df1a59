"""What a refused or damaged checkpoint is called: refused files are never "damaged", damaged ones never "refused".

Nothing in these files may run: each malicious pickle would create a file if it did.
"""

from __future__ import annotations

import argparse
import builtins
import io
import os
import pickle
import re

import pytest
import torch

from ckptcloud import DiskSaver, RemoteSaver, serialization
from ckptcloud.stores.memory import MemoryStore


class CallsSystem:
    """A pickle that would run ``os.system`` when loaded (what a malicious checkpoint does)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class CallsEval:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.eval, (f"open({self.marker!r}, 'w')",))


def test_a_class_weights_only_refuses_is_named_with_torchs_safe_fix_before_weights_only_false(tmp_path):
    path = tmp_path / "a.pt"
    torch.save({"model": torch.nn.Linear(2, 2).state_dict(), "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(ValueError) as caught:
        serialization.load(path)
    message = str(caught.value)
    assert str(path) in message
    assert "Unsupported global: GLOBAL argparse.Namespace" in message  # torch's line that names the class
    assert "torch.serialization.add_safe_globals([argparse.Namespace])" in message  # and its safe fix
    assert "damaged" not in message and "malicious" not in message
    # the unsafe remedy comes last, and only for a trusted source
    assert message.rindex("weights_only=False") > message.index("add_safe_globals")
    assert "If you trust its source, pass weights_only=False" in message
    with torch.serialization.safe_globals([argparse.Namespace]):  # the safe fix works
        assert serialization.load(path)["args"].lr == 0.1


def _malicious_files(folder, marker: str) -> dict[str, bytes]:
    zipped, legacy = io.BytesIO(), io.BytesIO()
    torch.save({"model": CallsSystem(marker)}, zipped)
    torch.save({"model": CallsSystem(marker)}, legacy, _use_new_zipfile_serialization=False)
    return {
        "zip.pt": zipped.getvalue(),
        "legacy.pt": legacy.getvalue(),
        "raw-pickle.pt": pickle.dumps({"model": CallsSystem(marker)}, protocol=2),
    }


@pytest.mark.parametrize("kind", ["zip.pt", "legacy.pt", "raw-pickle.pt"])
def test_a_pickle_that_calls_os_system_is_refused_as_possibly_malicious_and_never_run(tmp_path, kind):
    marker = tmp_path / "PWNED"
    (tmp_path / kind).write_bytes(_malicious_files(tmp_path, str(marker))[kind])
    with pytest.raises(ValueError) as caught:
        serialization.load(tmp_path / kind)
    message = str(caught.value)
    assert re.search(r"refused to load .*: it references (posix|nt)\.system, which weights_only=True blocks", message)
    assert "the file may be malicious" in message
    assert "damaged" not in message and "not a torch checkpoint" not in message
    assert "add_safe_globals" not in message  # never advise allowlisting it
    assert not marker.exists()


def test_a_remote_malicious_checkpoint_is_refused_under_its_url(tmp_path):
    marker = tmp_path / "PWNED"
    store = MemoryStore("bucket")
    saver = RemoteSaver(store, "run")
    saver({"model": CallsSystem(str(marker))}, "model_1.pt")  # saved through the pipeline, trailer and all
    with pytest.raises(ValueError, match=r"refused to load mem://bucket/run/model_1\.pt: .*may be malicious"):
        saver.load("model_1.pt")
    with pytest.raises(ValueError, match=r"may be malicious"):
        saver.load("model_1.pt", mmap=True)
    assert not marker.exists()


def test_a_pickle_that_calls_eval_is_refused_without_advice_to_allowlist_eval(tmp_path):
    marker = tmp_path / "PWNED"
    DiskSaver(tmp_path)({"model": CallsEval(str(marker))}, "model_1.pt")
    with pytest.raises(ValueError) as caught:
        DiskSaver(tmp_path, require_empty=False).load("model_1.pt")
    message = str(caught.value)
    assert "it references eval, a function that can run arbitrary code" in message
    assert "the file may be malicious" in message
    assert "add_safe_globals" not in message and "damaged" not in message
    assert not marker.exists()


def _damaged_files() -> dict[str, bytes]:
    zipped = io.BytesIO()
    torch.save({"w": torch.ones(3), "n": 3}, zipped)  # no ckptcloud trailer: nothing checks it before torch
    data = bytearray(zipped.getvalue())
    pickled = data.index(b"\x80\x02", data.index(b"data.pkl"))
    opcode_garbage = bytearray(data)
    opcode_garbage[pickled + 2 : pickled + 12] = b"\xff" * 10
    legacy = io.BytesIO()
    torch.save({"w": torch.ones(3)}, legacy, _use_new_zipfile_serialization=False)
    legacy_garbage = bytearray(legacy.getvalue())
    legacy_garbage[30:40] = b"\xfe" * 10
    return {
        "zip-pickle-garbage.pt": bytes(opcode_garbage),
        "zip-truncated.pt": bytes(data[: len(data) // 2]),
        "legacy-truncated.pt": legacy.getvalue()[: len(legacy.getvalue()) // 2],
        "legacy-garbage.pt": bytes(legacy_garbage),
    }


@pytest.mark.parametrize("kind", sorted(_damaged_files()))
def test_a_damaged_checkpoint_is_still_reported_as_damaged_and_named(tmp_path, kind):
    (tmp_path / kind).write_bytes(_damaged_files()[kind])
    with pytest.raises(ValueError) as caught:
        serialization.load(tmp_path / kind)
    message = str(caught.value)
    assert f"{tmp_path / kind} is not a torch checkpoint" in message
    assert "refused" not in message and "malicious" not in message and "add_safe_globals" not in message
