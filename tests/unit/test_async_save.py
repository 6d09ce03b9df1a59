"""Asynchronous saves: return after a CPU snapshot, upload in the background, never lose a failure."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from ignite.engine import Engine, Events

from ckptcloud import Checkpoint, distributed
from ckptcloud.remote import RemoteSaver
from ckptcloud.retry import NO_RETRY
from ckptcloud.stores.base import MiB
from ckptcloud.stores.memory import MemoryStore


class GatedStore(MemoryStore):
    """Puts block until the test opens the gate; can be told to fail."""

    def __init__(self) -> None:
        super().__init__("bucket")
        self.gate = threading.Event()
        self.started = threading.Event()
        self.fail_next = False

    def put(self, key, data, metadata, when=None):
        self.started.set()
        assert self.gate.wait(10), "test forgot to open the gate"
        if self.fail_next:
            self.fail_next = False
            raise PermissionError("bucket policy changed")
        super().put(key, data, metadata, when)


@pytest.fixture
def store():
    s = GatedStore()
    yield s
    s.gate.set()


def make(store, **kwargs) -> tuple[torch.nn.Linear, Checkpoint]:
    model = torch.nn.Linear(4, 4)
    saver = RemoteSaver(store, "run", part_size=5 * MiB, retry=NO_RETRY)
    return model, Checkpoint({"model": model}, saver, async_save=True, **kwargs)


def test_save_returns_before_the_upload_and_stores_the_state_as_it_was(store):
    model, ckpt = make(store)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert ckpt.save(global_step=1) == "model_1.pt"
    assert store.started.wait(5) and "run/model_1.pt" not in store.objects  # still uploading
    with torch.no_grad():
        model.weight.add_(100.0)  # training goes on while the upload runs
    store.gate.set()
    ckpt.wait()
    stored = ckpt.save_handler.load("model_1.pt")
    assert torch.equal(stored["weight"], before["weight"]) and torch.equal(stored["bias"], before["bias"])
    assert ckpt.last_checkpoint == "model_1.pt"


def test_the_next_save_waits_for_the_one_in_flight(store):
    _, ckpt = make(store, n_saved=3)
    ckpt.save(global_step=1)
    second_returned = threading.Event()
    thread = threading.Thread(target=lambda: (ckpt.save(global_step=2), second_returned.set()))
    thread.start()
    assert not second_returned.wait(0.3)  # blocked behind the first upload
    store.gate.set()
    assert second_returned.wait(5)
    thread.join(5)
    ckpt.wait()
    assert ckpt.save_handler.list() == ["model_1.pt", "model_2.pt"]


def test_evictions_wait_until_the_new_checkpoint_is_stored(store):
    _, ckpt = make(store, n_saved=1)
    store.gate.set()
    ckpt.save(global_step=1)
    ckpt.wait()
    store.gate.clear()
    store.started.clear()
    ckpt.save(global_step=2)
    assert store.started.wait(5)
    assert sorted(store.objects) == ["run/model_1.pt"]  # the old one stays while the new one uploads
    store.gate.set()
    ckpt.wait()
    assert sorted(store.objects) == ["run/model_2.pt"]
    assert ckpt.state_dict() == {"_saved": [(2, "model_2.pt")]}


def test_a_background_failure_surfaces_at_the_next_call_and_loses_nothing(store, caplog):
    _, ckpt = make(store, n_saved=1)
    store.gate.set()
    ckpt.save(global_step=1)
    ckpt.wait()
    store.fail_next = True
    with caplog.at_level(logging.ERROR, logger="ckptcloud"):
        ckpt.save(global_step=2)  # returns: the failure happens in the background
        with pytest.raises(PermissionError, match="bucket policy changed"):
            ckpt.wait()
    assert "background saving model_2.pt failed" in caplog.text
    assert ckpt.state_dict() == {"_saved": [(1, "model_1.pt")]}
    assert sorted(store.objects) == ["run/model_1.pt"]
    ckpt.wait()  # reported once, then cleared
    assert ckpt.save(global_step=3) == "model_3.pt"
    ckpt.close()
    assert sorted(store.objects) == ["run/model_3.pt"]


def test_a_failure_is_raised_by_the_next_save_too(store):
    _, ckpt = make(store)
    store.fail_next = True
    store.gate.set()
    ckpt.save(global_step=1)
    with pytest.raises(PermissionError):
        ckpt.save(global_step=2)
    assert ckpt.state_dict() == {"_saved": []}


def test_context_manager_flushes_and_close_refuses_more_saves(store):
    store.gate.set()
    _, ckpt = make(store)
    with ckpt:
        ckpt.save(global_step=5)
    assert sorted(store.objects) == ["run/model_5.pt"]
    with pytest.raises(RuntimeError, match="closed"):
        ckpt.save(global_step=6)


def test_async_checkpoint_as_an_ignite_handler(store):
    store.gate.set()
    _, ckpt = make(store, n_saved=2)
    trainer = Engine(lambda engine, batch: None)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, ckpt)
    trainer.add_event_handler(Events.COMPLETED, lambda engine: ckpt.wait())
    trainer.run([0, 1], max_epochs=4)
    assert sorted(store.objects) == ["run/model_6.pt", "run/model_8.pt"]


def test_only_the_writing_rank_uploads_in_the_background(store, monkeypatch):
    store.gate.set()
    monkeypatch.setattr(distributed, "get_rank", lambda: 0)
    model = torch.nn.Linear(2, 2)
    saver = RemoteSaver(store, "run", part_size=5 * MiB, save_on_rank=1)
    ckpt = Checkpoint({"model": model}, saver, async_save=True, save_on_rank=1)
    ckpt.save(global_step=1)
    ckpt.wait()
    assert store.objects == {}
    assert ckpt.state_dict() == {"_saved": [(1, "model_1.pt")]}  # every rank keeps the same list


EXIT_SCRIPT = textwrap.dedent(
    """
    import sys, time, torch
    from ckptcloud import Checkpoint

    class Slow:
        def __call__(self, checkpoint, filename, metadata=None):
            time.sleep(0.5)
            if sys.argv[1] == "fail":
                raise ConnectionError("network gone")
            open(sys.argv[2], "w").write(filename)

    ckpt = Checkpoint({"m": torch.nn.Linear(1, 1)}, Slow(), async_save=True)
    ckpt.save(global_step=7)
    """
)


@pytest.mark.parametrize("mode", ["ok", "fail"])
def test_interpreter_exit_finishes_a_pending_save_or_says_loudly_it_failed(tmp_path, mode):
    marker = tmp_path / "done.txt"
    out = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT, mode, str(marker)], capture_output=True, text=True, timeout=120
    )
    if mode == "ok":
        assert marker.read_text() == "m_7.pt"
    else:
        assert not marker.exists()
        assert "ckptcloud: saving m_7.pt FAILED at interpreter exit: network gone" in out.stderr


def test_the_exit_hook_waits_on_no_other_rank(monkeypatch, capsys):
    """At exit other ranks may be gone: a follower finishes its pending save on its own, reading no record."""
    import torch.distributed as dist

    from ckptcloud import background
    from ckptcloud.coordination import Board

    store = dist.HashStore()
    writer, follower = Board(store, 0, 2, timeout=0.2), Board(store, 1, 2, timeout=0.2)

    def board(*, local_only_applies: bool = True):
        return None if local_only_applies and getattr(distributed._local, "only", False) else follower

    monkeypatch.setattr(distributed, "_board", board)
    monkeypatch.setattr(distributed, "get_rank", lambda: 1)
    memory = MemoryStore("bucket")
    ckpt = Checkpoint(
        {"model": torch.nn.Linear(2, 2)}, RemoteSaver(memory, "run", save_on_rank=0), n_saved=1, async_save=True
    )
    # What the writer published before it exited: save 1's decision and outcome, then save 2's decision.
    writer.publish(writer.next_step(), "deciding", value={"filename": "model_1.pt", "priority": 1})
    writer.publish(writer.next_step(), "saving")
    writer.publish(writer.next_step(), "deciding", value={"filename": "model_2.pt", "priority": 2})
    ckpt.save(global_step=1)
    ckpt.save(global_step=2)
    background._finish_all_at_exit()  # what the interpreter runs at exit
    assert "FAILED" not in capsys.readouterr().err  # it did not wait for the writer's outcome or evictions
    assert ckpt.state_dict() == {"_saved": [(2, "model_2.pt")]}
    assert memory.objects == {}


def test_a_ctrl_c_while_waiting_keeps_the_save_pending_so_its_bookkeeping_is_not_lost(store, monkeypatch):
    _, ckpt = make(store, n_saved=1)
    store.gate.set()
    ckpt.save(global_step=1)
    ckpt.wait()
    store.gate.clear()
    ckpt.save(global_step=2)
    future = ckpt._background._pending[0]
    real_exception = future.exception
    monkeypatch.setattr(future, "exception", lambda: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        ckpt.wait()  # the user pressed Ctrl-C while the upload was still running
    monkeypatch.setattr(future, "exception", real_exception)
    store.gate.set()
    ckpt.wait()  # the upload finished meanwhile: its bookkeeping and eviction still happen
    assert ckpt.state_dict() == {"_saved": [(2, "model_2.pt")]}
    assert sorted(store.objects) == ["run/model_2.pt"]
