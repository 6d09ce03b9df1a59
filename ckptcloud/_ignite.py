"""Make ckptcloud's save handlers count as ignite ``BaseSaveHandler``s without importing ignite eagerly.

Ignite's own ``Checkpoint`` only prunes save handlers that pass ``isinstance(h, ignite...BaseSaveHandler)``.
That class is an ABC, so registering our base class as a virtual subclass is enough. Importing ignite costs
about a second, so we register as soon as ``ignite.handlers.checkpoint`` is imported (now, if it already is).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

_IGNITE_MODULE = "ignite.handlers.checkpoint"


def register_with_ignite(cls: type) -> None:
    """Register ``cls`` as a virtual subclass of ignite's ``BaseSaveHandler``, now or when ignite loads."""
    module = sys.modules.get(_IGNITE_MODULE)
    if module is not None:
        module.BaseSaveHandler.register(cls)
        return
    sys.meta_path.insert(0, _RegisterOnImport(cls))


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the real loader of ignite's checkpoint module to register afterwards."""

    def __init__(self, cls: type) -> None:
        self._cls = cls

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
        cls = self._cls
        original_exec = loader.exec_module

        def exec_module(module: ModuleType) -> Any:
            original_exec(module)
            module.BaseSaveHandler.register(cls)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec
