"""The only module that knows about ranks, collectives and XLA (torch_xla is never imported here, only used
when the program already imported it).

Every rank calls a save handler; :func:`run_on_rank` runs the write on one rank and makes every rank return or
raise together. :func:`to_cpu` is called on every rank because moving XLA tensors is a collective step.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

from ckptcloud._tree import tree_leaves, tree_map
from ckptcloud.errors import RemoteSaveError

T = TypeVar("T")


def _xla_runtime() -> Any | None:
    if "torch_xla" not in sys.modules:
        return None
    try:
        import torch_xla.runtime as xr
    except ImportError:
        return None
    return xr


def _torch_distributed_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def get_rank() -> int:
    """This process's global rank: torch.distributed, else torch_xla (if imported), else 0."""
    if _torch_distributed_ready():
        return torch.distributed.get_rank()
    xr = _xla_runtime()
    if xr is not None:
        return int(xr.global_ordinal())
    return 0


def get_world_size() -> int:
    """Number of ranks: torch.distributed, else torch_xla (if imported), else 1."""
    if _torch_distributed_ready():
        return torch.distributed.get_world_size()
    xr = _xla_runtime()
    if xr is not None:
        return int(xr.world_size())
    return 1


def _needs_move(leaf: Any) -> bool:
    return isinstance(leaf, torch.Tensor) and leaf.device.type != "cpu"


def to_cpu(obj: Any) -> Any:
    """Return ``obj`` with every tensor that is not on the CPU (XLA, CUDA, ...) copied to the CPU.

    Call it on every rank: for XLA tensors the pending graph is executed first, which all ranks must do together.
    Returns ``obj`` itself when every tensor is already on the CPU.
    """
    leaves = tree_leaves(obj)
    if not any(_needs_move(leaf) for leaf in leaves):
        return obj
    if any(isinstance(leaf, torch.Tensor) and leaf.device.type == "xla" for leaf in leaves):
        xla = sys.modules.get("torch_xla")
        if xla is not None and hasattr(xla, "sync"):
            xla.sync()
    return tree_map(lambda leaf: leaf.cpu() if _needs_move(leaf) else leaf, obj)


_local = threading.local()


@contextlib.contextmanager
def local_only() -> Iterator[None]:
    """Within this block (on this thread), :func:`run_on_rank` runs no collective.

    Background saves use it: a collective from a worker thread could interleave with the training loop's own.
    Their outcome is agreed on later, on the main thread, with :func:`agree`.
    """
    _local.only = True
    try:
        yield
    finally:
        _local.only = False


def agree(error: BaseException | None, src: int, what: str) -> None:
    """Make every rank raise if rank ``src`` failed (and re-raise ``error`` on the rank that has it)."""
    if get_world_size() > 1 and _torch_distributed_ready() and not getattr(_local, "only", False):
        outcome = [None if error is None else f"{type(error).__name__}: {error}"]
        torch.distributed.broadcast_object_list(outcome, src=src)
        if error is None and outcome[0] is not None:
            raise RemoteSaveError(f"{what} failed on rank {src}: {outcome[0]}")
    if error is not None:
        raise error


def snapshot(obj: Any) -> Any:
    """A copy of ``obj`` with every tensor copied to the CPU, safe to serialize while training goes on.

    One copy of the state: tensors on other devices are copied straight to the CPU (XLA's pending graph is run
    first, on every rank); CPU tensors are cloned; other leaves are deep-copied.
    """
    if any(isinstance(leaf, torch.Tensor) and leaf.device.type == "xla" for leaf in tree_leaves(obj)):
        xla = sys.modules.get("torch_xla")
        if xla is not None and hasattr(xla, "sync"):
            xla.sync()

    def copy_leaf(leaf: Any) -> Any:
        if isinstance(leaf, torch.Tensor):
            return leaf.detach().to("cpu", copy=True)
        return copy.deepcopy(leaf)

    return tree_map(copy_leaf, obj)


def run_on_rank(rank: int, fn: Callable[[], T], what: str) -> T | None:
    """Run ``fn`` on ``rank`` only; every rank returns, or raises, together.

    On the writing rank ``fn``'s own exception propagates. With an initialized process group, the outcome is
    broadcast from ``rank`` so the other ranks raise :class:`RemoteSaveError` naming it instead of returning as if
    the write had succeeded. Returns ``fn()``'s result on ``rank`` and ``None`` elsewhere.
    """
    error: BaseException | None = None
    result: T | None = None
    if get_rank() == rank:
        try:
            result = fn()
        except BaseException as err:
            error = err
    agree(error, rank, what)
    return result


def broadcast_object(obj: T | None, src: int) -> T | None:
    """``obj`` from rank ``src`` on every rank of an initialized process group; ``obj`` itself otherwise."""
    if get_world_size() > 1 and _torch_distributed_ready():
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=src)
        return box[0]
    return obj
