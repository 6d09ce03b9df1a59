"""What a checkpoint stores: the state dicts of ``to_save``, with distributed wrappers taken care of."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Mapping
from typing import Any

from torch import nn

from ckptcloud import distributed
from ckptcloud._tree import tree_map


def state_dicts(to_save: Mapping, save_on_rank: int) -> dict[str, Any]:
    """``{key: obj.state_dict()}`` for every object of ``to_save`` (nested containers kept).

    ``DistributedDataParallel``/``DataParallel`` models are unwrapped (no ``module.`` prefix), and a
    ``ZeroRedundancyOptimizer`` is consolidated onto ``save_on_rank``, a collective every rank must join; the other
    ranks then store ``{}`` for it.

    Example:
        >>> import torch
        >>> sorted(state_dicts({"model": torch.nn.Linear(2, 1)}, save_on_rank=0)["model"])
        ['bias', 'weight']
    """
    zero = _zero_optimizer_class()
    rank = distributed.get_rank()

    def state_of(obj: Any) -> Any:
        if isinstance(obj, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            obj = obj.module
        elif zero is not None and isinstance(obj, zero):
            if importlib.util.find_spec("numpy") is None:  # the same answer on every rank of one install
                raise ImportError(
                    "ZeroRedundancyOptimizer.consolidate_state_dict needs numpy (torch's own code converts "
                    "the gathered state with .numpy()), and numpy is not installed: pip install numpy"
                )
            obj.consolidate_state_dict(to=save_on_rank)
            if rank != save_on_rank:
                return {}
        return obj.state_dict()

    return dict(tree_map(state_of, to_save))


def _zero_optimizer_class() -> type | None:
    """``ZeroRedundancyOptimizer`` if the program imported it (a ZeRO optimizer in ``to_save`` implies it)."""
    module = sys.modules.get("torch.distributed.optim.zero_redundancy_optimizer")
    return getattr(module, "ZeroRedundancyOptimizer", None)
