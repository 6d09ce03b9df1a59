"""ignite parity found by running ignite v0.5.5's own Checkpoint tests against ckptcloud (each failed on 808aaac)."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint as IgniteCheckpoint

from ckptcloud import Checkpoint, DiskSaver
from ckptcloud.remote import RemoteSaver
from ckptcloud.stores.memory import MemoryStore


def trained_checkpoint(save_handler, **kwargs) -> tuple[torch.nn.Linear, Checkpoint]:
    model = torch.nn.Linear(3, 3)
    ckpt = Checkpoint({"weights": model}, save_handler, n_saved=None, **kwargs)
    trainer = Engine(lambda engine, batch: None)
    trainer.add_event_handler(Events.EPOCH_COMPLETED(every=2), ckpt)
    trainer.run(torch.randn(10, 1), 5)
    return model, ckpt


@pytest.mark.parametrize("where", ["disk", "remote"])
def test_reload_objects_loads_the_file_its_filename_components_name(tmp_path, where):
    handler = DiskSaver(tmp_path) if where == "disk" else RemoteSaver(MemoryStore("b"), "run")
    model, ckpt = trained_checkpoint(handler, filename_prefix="myprefix")
    fresh = torch.nn.Linear(3, 3)
    ckpt.reload_objects({"weights": fresh}, global_step=40)  # myprefix_weights_40.pt
    assert torch.equal(fresh.weight, model.weight) and torch.equal(fresh.bias, model.bias)
    partial = torch.nn.Sequential(torch.nn.Linear(3, 3))
    ckpt.reload_objects({"weights": partial}, load_kwargs={"strict": False}, global_step=40)


@pytest.mark.parametrize("where", ["disk", "remote"])
def test_reload_objects_reads_the_file_with_the_map_location_and_weights_only_it_is_given(tmp_path, where):
    handler = DiskSaver(tmp_path) if where == "disk" else RemoteSaver(MemoryStore("b"), "run")
    model = torch.nn.Linear(3, 3)
    ckpt = Checkpoint({"model": model, "extra": Box({"note": object.__new__(Marker)})}, handler, n_saved=2)
    ckpt.save(global_step=5)
    fresh, box = torch.nn.Linear(3, 3), Box({})
    with pytest.raises(ValueError, match="weights_only"):  # a class the safe unpickler refuses: by default, refused
        ckpt.reload_objects({"model": fresh, "extra": box}, global_step=5)
    ckpt.reload_objects({"model": fresh, "extra": box}, load_kwargs={"weights_only": False}, global_step=5)
    assert torch.equal(fresh.weight, model.weight) and isinstance(box.state["note"], Marker)
    mapped: list[str] = []

    def where(storage, location):  # torch.load calls it per storage when it is the map_location
        mapped.append(location)
        return storage

    ckpt.reload_objects({"model": fresh, "extra": box}, load_kwargs={"weights_only": False, "map_location": where},
                        global_step=5)  # fmt: skip
    assert mapped and set(mapped) == {"cpu"}
    with pytest.raises(TypeError):  # what load_state_dict does not take is still an error, as in ignite
        ckpt.reload_objects({"model": fresh}, load_kwargs={"weights_only": False, "bogus": 1}, global_step=5)


class Marker:
    """A class ``weights_only=True`` refuses (not in torch's allowlist)."""


class Box:
    """An object with ``state_dict``/``load_state_dict`` holding arbitrary state."""

    def __init__(self, state: dict) -> None:
        self.state = state

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        self.state = state


def test_reload_objects_with_a_score_names_the_file_as_saving_did(tmp_path):
    model = torch.nn.Linear(3, 3)
    ckpt = Checkpoint({"model": model}, DiskSaver(tmp_path), n_saved=2, score_name="acc")
    ckpt.save(global_step=3, score=0.7)
    fresh = torch.nn.Linear(3, 3)
    ckpt.reload_objects({"model": fresh}, global_step=3, score=0.7)  # model_3_acc=0.7000.pt
    assert torch.equal(fresh.weight, model.weight)


def test_reload_objects_names_the_save_handler_it_cannot_load_from():
    ckpt = Checkpoint({"model": torch.nn.Linear(1, 1)}, lambda checkpoint, filename: None)
    with pytest.raises(AttributeError, match="should be a saver that can load"):
        ckpt.reload_objects({"model": torch.nn.Linear(1, 1)}, global_step=1)


def test_ignite_checkpoint_treats_ckptcloud_disk_saver_as_its_own(tmp_path):
    model = torch.nn.Linear(3, 3)
    ckpt = IgniteCheckpoint({"model": model}, DiskSaver(tmp_path), n_saved=2)
    trainer = Engine(lambda engine, batch: None)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, ckpt)
    trainer.run([0, 1], max_epochs=3)
    assert ckpt.last_checkpoint == tmp_path / "model_6.pt"  # a full path, as with ignite's DiskSaver
    fresh = torch.nn.Linear(3, 3)
    ckpt.reload_objects({"model": fresh}, global_step=6)
    assert torch.equal(fresh.weight, model.weight)


def test_load_objects_errors_read_like_ignites():
    to_load = {"model": torch.nn.Linear(1, 1), "optimizer": torch.optim.SGD(torch.nn.Linear(1, 1).parameters())}
    with pytest.raises(TypeError, match="Argument checkpoint should be a string or a dictionary"):
        Checkpoint.load_objects(to_load, 42)
    with pytest.raises(ValueError, match="Key 'optimizer' from x is not found in y"):
        Checkpoint.load_objects(to_load, {"model": torch.nn.Linear(1, 1).state_dict()})
    models = [torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)]
    with pytest.raises(ValueError, match="Size of y: 1 does not match the size of x: '2'"):
        Checkpoint.load_objects({"models": models, "x": models[0]}, {"models": [models[0].state_dict()], "x": {}})


def mapped_downloads(folder) -> list[str]:
    """Temporary downloads in ``folder`` this process still maps (deleted files in ``/proc/self/maps``)."""
    with open("/proc/self/maps") as maps:
        return [line for line in maps if str(folder) in line and "(deleted)" in line]


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="needs Linux /proc")
def test_objects_restored_by_reload_objects_do_not_keep_the_download_mapped(tmp_path):
    saver = RemoteSaver(MemoryStore("b"), "run", tmp_dir=str(tmp_path))
    model = torch.nn.Linear(256, 256)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 256)).sum().backward()
    optimizer.step()
    ckpt = Checkpoint({"model": model, "optimizer": optimizer}, saver, n_saved=1)
    ckpt.save(global_step=1)
    held = saver.load("checkpoint_1.pt", mmap=True)  # the opt-in: tensors map the deleted download
    assert mapped_downloads(tmp_path)
    del held
    fresh = torch.optim.Adam(torch.nn.Linear(256, 256).parameters())
    ckpt.reload_objects({"model": torch.nn.Linear(256, 256), "optimizer": fresh}, global_step=1)
    assert mapped_downloads(tmp_path) == []  # the optimizer state lives in ordinary memory, not in a pinned temp file
