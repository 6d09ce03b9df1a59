"""Walking the nested mappings/sequences of ``to_save`` and ``to_load`` (private helpers)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any


def tree_map(func: Callable[[Any], Any], x: Any) -> Any:
    """Apply ``func`` to every leaf of nested mappings, lists and tuples, keeping the containers' types."""
    if isinstance(x, Mapping):
        return type(x)({k: tree_map(func, v) for k, v in x.items()})  # type: ignore[call-arg]
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return type(x)(*(tree_map(func, v) for v in x))
    if isinstance(x, (list, tuple)):
        return type(x)(tree_map(func, v) for v in x)
    return func(x)


def tree_leaves(x: Any) -> list[Any]:
    """Every leaf of nested mappings, lists and tuples, in order."""
    leaves: list[Any] = []
    tree_map(leaves.append, x)
    return leaves


def tree_apply2(func: Callable[[Any, Any], None], objects: Any, states: Any, path: str = "") -> None:
    """Call ``func(obj, state)`` for every leaf of ``objects`` and the matching entry of ``states``.

    Raises:
        ValueError: ``states`` lacks a key or index that ``objects`` has.
    """
    if isinstance(objects, Mapping):
        for key, obj in objects.items():
            where = f"{path}.{key}" if path else str(key)
            if not isinstance(states, Mapping) or key not in states:
                have = sorted(map(str, states.keys())) if isinstance(states, Mapping) else type(states).__name__
                raise ValueError(f"Object '{where}' of `to_load` is not found in the checkpoint (it has {have})")
            tree_apply2(func, obj, states[key], where)
    elif isinstance(objects, Sequence) and not isinstance(objects, (str, bytes)):
        if not isinstance(states, Sequence) or len(states) != len(objects):
            raise ValueError(
                f"Object '{path}' of `to_load` has {len(objects)} entries, the checkpoint does not match it"
            )
        for i, (obj, state) in enumerate(zip(objects, states, strict=True)):
            tree_apply2(func, obj, state, f"{path}[{i}]")
    else:
        func(objects, states)
