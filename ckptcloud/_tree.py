"""Walking the nested mappings/sequences of ``to_save`` and ``to_load`` (private helpers)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any


def tree_map(func: Callable[[Any], Any], x: Any) -> Any:
    """Apply ``func`` to every leaf of nested mappings, lists and tuples, keeping the containers' types.

    Mutable mappings and lists (subclasses such as ``defaultdict`` and ``OrderedDict`` included) are copied with
    ``copy.copy`` and refilled, so constructors with other signatures are never called; plain tuples and
    namedtuples are rebuilt; read-only mappings become dicts. Anything else (``torch.Size``, other tuple
    subclasses) is a leaf.
    """
    if isinstance(x, MutableMapping):
        out = copy.copy(x)
        for key, value in x.items():
            out[key] = tree_map(func, value)
        return out
    if isinstance(x, Mapping):  # read-only mappings come back as plain dicts
        return {key: tree_map(func, value) for key, value in x.items()}
    if isinstance(x, list):
        out_list = copy.copy(x)
        out_list[:] = [tree_map(func, v) for v in x]
        return out_list
    if type(x) is tuple:
        return tuple(tree_map(func, v) for v in x)
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return type(x)(*(tree_map(func, v) for v in x))
    return func(x)


def tree_leaves(x: Any) -> list[Any]:
    """Every leaf of nested mappings, lists and tuples, in order (the containers :func:`tree_map` walks)."""
    leaves: list[Any] = []
    stack = [x]
    while stack:
        node = stack.pop()
        if isinstance(node, Mapping):
            stack.extend(reversed(list(node.values())))
        elif isinstance(node, list) or type(node) is tuple or (isinstance(node, tuple) and hasattr(node, "_fields")):
            stack.extend(reversed(node))
        else:
            leaves.append(node)
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
                have = states.keys() if isinstance(states, Mapping) else type(states).__name__
                raise ValueError(
                    f"Key '{key}' from x is not found in y: {have} (object '{where}' of `to_load` is not in the "
                    "checkpoint)"
                )
            tree_apply2(func, obj, states[key], where)
    elif isinstance(objects, Sequence) and not isinstance(objects, (str, bytes)):
        if not isinstance(states, Sequence) or len(states) != len(objects):
            size = len(states) if isinstance(states, Sequence) else type(states).__name__
            raise ValueError(
                f"Size of y: {size} does not match the size of x: '{len(objects)}' (object '{path}' of `to_load` "
                "does not match the checkpoint)"
            )
        for i, (obj, state) in enumerate(zip(objects, states, strict=True)):
            tree_apply2(func, obj, state, f"{path}[{i}]")
    else:
        func(objects, states)
