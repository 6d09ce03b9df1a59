"""Test doubles shared by the unit tests: an in-memory save handler and fake engines (no storage, no ignite)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import torch

from ckptcloud import BaseSaveHandler


class MemorySaver(BaseSaveHandler):
    """Stores payloads in ``files`` and records every call.

    ``calls`` holds ``(filename, metadata)`` for each ``__call__``; ``removed`` the filenames passed to ``remove``;
    ``events`` both, in order, as ``("save", filename)`` / ``("remove", filename)``; ``history`` a copy of every
    payload stored, as ``(filename, payload)``, including ones later removed or overwritten. Set ``fail_with`` to an
    exception to make the next saves raise it (after recording the call, before storing anything).
    """

    def __init__(self) -> None:
        self.files: dict[str, Any] = {}
        self.calls: list[tuple[str, Any]] = []
        self.removed: list[str] = []
        self.events: list[tuple[str, str]] = []
        self.history: list[tuple[str, Any]] = []
        self.fail_with: BaseException | None = None

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        self.calls.append((filename, None if metadata is None else dict(metadata)))
        self.events.append(("save", filename))
        if self.fail_with is not None:
            raise self.fail_with
        self.files[filename] = copy.deepcopy(checkpoint)
        self.history.append((filename, copy.deepcopy(checkpoint)))

    def remove(self, filename: str) -> None:
        self.removed.append(filename)
        self.events.append(("remove", filename))
        self.files.pop(filename, None)

    @property
    def saved_names(self) -> list[str]:
        return [filename for filename, _ in self.calls]


class Stateful:
    """A leaf of ``to_save``/``to_load`` that is not a module: a tiny counter with ``state_dict``."""

    def __init__(self, value: int = 0) -> None:
        self.value = value

    def state_dict(self) -> dict[str, int]:
        return {"value": self.value}

    def load_state_dict(self, state: Mapping) -> None:
        self.value = state["value"]


def make_engine(iteration: int = 0, epoch: int = 0, metrics: dict | None = None) -> SimpleNamespace:
    """An object shaped like an ignite engine, as far as ``Checkpoint.__call__`` looks at one."""
    return SimpleNamespace(
        state=SimpleNamespace(iteration=iteration, epoch=epoch, metrics=dict(metrics or {})),
        last_event_name=None,
    )


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2)


def kept(checkpoint: Any) -> list[tuple[Any, str]]:
    """The kept list of ``checkpoint`` as plain ``(priority, filename)`` tuples."""
    return [tuple(item) for item in checkpoint.state_dict()["_saved"]]
