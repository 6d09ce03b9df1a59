"""Make ckptcloud's save handlers count as ignite's without importing ignite eagerly.

Ignite's own ``Checkpoint`` only prunes save handlers that pass ``isinstance(h, ignite...BaseSaveHandler)``, and
it gives ``last_checkpoint`` as a full path and supports ``reload_objects`` only for its ``DiskSaver``. Both
classes are ABCs, so registering ours as virtual subclasses is enough. Importing ignite costs about a second, so
we register as soon as ``ignite.handlers.checkpoint`` is imported (now, if it already is).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

_IGNITE_MODULE = "ignite.handlers.checkpoint"
_waiting: list[tuple[type, str]] = []  # (our class, the name of ignite's class) to register when ignite loads


def register_with_ignite(cls: type, ignite_class: str = "BaseSaveHandler") -> None:
    """Register ``cls`` as a virtual subclass of ignite's ``ignite_class``, now or when ignite loads."""
    module = sys.modules.get(_IGNITE_MODULE)
    if module is not None:
        getattr(module, ignite_class).register(cls)
        return
    if not _waiting:
        sys.meta_path.insert(0, _RegisterOnImport())
    _waiting.append((cls, ignite_class))


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the real loader of ignite's checkpoint module to register afterwards."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != _IGNITE_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        original_exec = loader.exec_module

        def exec_module(module: ModuleType) -> Any:
            original_exec(module)
            for cls, ignite_class in _waiting:
                getattr(module, ignite_class).register(cls)
            _waiting.clear()

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


class SavedCheckpointEvent:
    """``Checkpoint.SAVED_CHECKPOINT``: ignite's event, looked up on first use so ignite is not imported early."""

    def __get__(self, instance: object, owner: type) -> Any:
        from ignite.handlers.checkpoint import CheckpointEvents

        return CheckpointEvents.SAVED_CHECKPOINT


def fire_saved_event(engine: Any) -> None:
    try:
        from ignite.handlers.checkpoint import CheckpointEvents
    except ImportError:
        return
    if not engine.has_registered_events(CheckpointEvents.SAVED_CHECKPOINT):
        engine.register_events(*CheckpointEvents)
    engine.fire_event(CheckpointEvents.SAVED_CHECKPOINT)
