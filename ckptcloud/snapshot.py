"""The host copy an async save serializes while training goes on (made on the writing rank only).

One copy per storage, not per tensor: tensors that share a storage (tied weights, views) share it in the copy
too, exactly as ``torch.save`` would have stored them, so the file is the same size as a synchronous save's and
tied weights come back tied.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from ckptcloud._tree import tree_map

# Devices whose tensors have a real storage that can be copied whole (XLA, meta, ... are copied per tensor).
_STORAGE_DEVICES = ("cpu", "cuda")


def snapshot(obj: Any) -> Any:
    """A copy of ``obj`` with every tensor copied to the CPU, safe to serialize while training goes on.

    Each storage is copied once (``torch.save`` deduplicates storages the same way); tensors become views of the
    copies with their offsets, sizes and strides. Tensors without a plain storage (sparse, quantized, XLA,
    subclasses) are copied one by one; other leaves are deep-copied.

    Example:
        >>> import torch
        >>> weight = torch.ones(4, 2)
        >>> state = {"embedding": weight, "head": weight, "first_row": weight[0]}
        >>> copied = snapshot(state)
        >>> copied["embedding"] is weight, copied["head"].data_ptr() == copied["embedding"].data_ptr()
        (False, True)
        >>> copied["first_row"].untyped_storage().data_ptr() == copied["embedding"].data_ptr()
        True
    """
    copies: dict[int, tuple[torch.UntypedStorage, torch.UntypedStorage]] = {}

    def copy_storage(storage: torch.UntypedStorage) -> torch.UntypedStorage:
        key = storage._cdata  # the storage's identity, as torch.save uses it
        if key not in copies:
            copied = storage.cpu() if storage.device.type != "cpu" else storage.clone()
            copies[key] = (storage, copied)  # the original is kept alive so its identity stays unique
        return copies[key][1]

    def copy_leaf(leaf: Any) -> Any:
        if not isinstance(leaf, torch.Tensor):
            return copy.deepcopy(leaf)
        plain = type(leaf) in (torch.Tensor, torch.nn.Parameter) and leaf.layout == torch.strided
        if not (plain and not leaf.is_quantized and leaf.device.type in _STORAGE_DEVICES):
            return leaf.detach().to("cpu", copy=True)
        storage = copy_storage(leaf.untyped_storage())
        out = torch.empty(0, dtype=leaf.dtype).set_(storage, leaf.storage_offset(), leaf.size(), leaf.stride())
        if isinstance(leaf, torch.nn.Parameter):
            return torch.nn.Parameter(out, requires_grad=leaf.requires_grad)
        return out

    return tree_map(copy_leaf, obj)
