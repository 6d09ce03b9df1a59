"""The only module that knows about ranks, process groups and XLA (torch_xla is never imported here, only used
when the program already imported it).

Every rank calls a save handler. :func:`run_on_rank` runs the write on the writing rank only, and every rank
returns or raises together; :func:`share` hands the writer's answer (a decision, a listing) to every rank. Both go
through :class:`~ckptcloud.coordination.Board`, JSON records in the process group's store: no collective, no
pickle, no numpy, and the writer never waits for the others (see that module for the timeouts).

Without an initialized process group (one process, or XLA ranks without one) there is nothing to agree through:
each rank acts on its own.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any, TypeVar

import torch

from ckptcloud._tree import tree_leaves, tree_map
from ckptcloud.coordination import Board
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
    return _rank_and_world()[0]


def get_world_size() -> int:
    """Number of ranks: torch.distributed, else torch_xla (if imported), else 1."""
    return _rank_and_world()[1]


def _rank_and_world() -> tuple[int, int]:
    if _torch_distributed_ready():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    xr = _xla_runtime()
    if xr is not None:
        return int(xr.global_ordinal()), int(xr.world_size())
    return 0, 1


# ------------------------------------------------------------------------------------------------------- XLA
def _is_xla(leaf: Any) -> bool:
    return isinstance(leaf, torch.Tensor) and leaf.device.type == "xla"


def sync_xla(obj: Any) -> bool:
    """Run XLA's pending graph if ``obj`` holds XLA tensors; returns whether it does.

    Call it on every rank: the graph may hold collectives, which all ranks must run together. CUDA and other
    devices need nothing here: ``torch.save`` copies their storages to the host one at a time, on the writer only.
    """
    if not any(_is_xla(leaf) for leaf in tree_leaves(obj)):
        return False
    xla = sys.modules.get("torch_xla")
    if xla is not None and hasattr(xla, "sync"):
        xla.sync()
    return True


def xla_to_cpu(obj: Any) -> Any:
    """``obj`` with its XLA tensors copied to the CPU (``torch.save`` cannot write them); ``obj`` itself if none.

    Call it on the writing rank only, after :func:`sync_xla` ran on every rank.
    """
    if not any(_is_xla(leaf) for leaf in tree_leaves(obj)):
        return obj
    return tree_map(lambda leaf: leaf.cpu() if _is_xla(leaf) else leaf, obj)


# -------------------------------------------------------------------------------------------- coordination
_local = threading.local()
_cached_board: tuple[Any, Board | None] | None = None  # (the default process group, its board)


@contextlib.contextmanager
def local_only() -> Iterator[None]:
    """Within this block (on this thread) nothing is published or awaited: each rank acts on its own.

    Background saves use it (their outcome is agreed on later, on the main thread, with :func:`agree`), and so does
    the exit hook, when other ranks may be gone.
    """
    _local.only = True
    try:
        yield
    finally:
        _local.only = False


def _board(*, local_only_applies: bool = True) -> Board | None:
    """The coordination board of the default process group; ``None`` with one rank, no group, or :func:`local_only`."""
    if (local_only_applies and getattr(_local, "only", False)) or not _torch_distributed_ready():
        return None
    dist = torch.distributed
    world = dist.get_world_size()
    if world < 2:
        return None
    group = dist.distributed_c10d._get_default_group()
    global _cached_board
    if _cached_board is not None and _cached_board[0] is group:  # held, so a new group cannot reuse its identity
        return _cached_board[1]
    try:
        store = dist.distributed_c10d._get_default_store()
    except Exception:  # no store (the MPI backend): nothing to agree through
        store = None
    if store is None:
        warnings.warn(
            "ckptcloud: this process group has no key-value store (MPI backend?), so ranks cannot agree on "
            "checkpoint decisions: each rank acts on its own and a failed upload raises on the writing rank only",
            RuntimeWarning,
            stacklevel=3,
        )
        _cached_board = (group, None)
        return None
    timeout = getattr(store, "timeout", None)
    seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else 1800.0
    board = Board(dist.PrefixStore("ckptcloud", store), dist.get_rank(), world, seconds)
    _cached_board = (group, board)  # a new process group starts a new board: new store, steps from 1
    return board


@contextlib.contextmanager
def busy() -> Iterator[None]:
    """Mark this process as working on something the other ranks wait for (a background upload, say).

    Followers keep waiting for as long as a busy writer beats its heartbeat. Works from any thread.
    """
    board = _board(local_only_applies=False)
    with board.busy() if board is not None else contextlib.nullcontext():
        yield


def run_on_rank(rank: int, fn: Callable[[], T], what: str) -> T | None:
    """Run ``fn`` on ``rank`` only; every rank returns, or raises, together.

    On the writing rank ``fn``'s own exception propagates; the other ranks raise :class:`RemoteSaveError` naming
    it, as soon as it is published. Returns ``fn()``'s result on ``rank`` and ``None`` elsewhere.
    """
    board = _board()
    if board is None:
        return fn() if get_rank() == rank else None
    return _from_rank(board, rank, fn, what, publish=False)  # type: ignore[no-any-return]


def agree(error: BaseException | None, rank: int, what: str) -> None:
    """Make every rank raise if rank ``rank`` failed (``error`` there); re-raise ``error`` where it happened."""

    def outcome() -> None:
        if error is not None:
            raise error

    run_on_rank(rank, outcome, what)  # raises on every rank if ``rank`` failed
    if error is not None:  # this rank's own failure (only the writer's is shared)
        raise error


def share(rank: int, fn: Callable[[], T], what: str) -> T:
    """``fn()`` as computed on ``rank``, returned on every rank; if it raised there, every rank raises.

    ``fn`` must return JSON data (dicts, lists, strings, numbers, ``None``): every rank gets the same decoded
    value, the writer included, so no rank holds a different type or rounding. Without a process group every rank
    computes ``fn()`` itself.
    """

    def decoded() -> T:
        return json.loads(json.dumps(fn()))  # type: ignore[no-any-return]

    board = _board()
    if board is None:
        return decoded()
    return _from_rank(board, rank, decoded, what, publish=True)  # type: ignore[no-any-return]


def _from_rank(board: Board, rank: int, fn: Callable[[], Any], what: str, *, publish: bool) -> Any:
    """One coordinated step: ``rank`` runs ``fn`` (beating its heartbeat) and publishes the outcome, and its value
    when ``publish``; every other rank waits for that record and returns its value, or raises its error."""
    step = board.next_step()
    if board.rank != rank:
        record = board.read(step, rank, what)
        if record["error"] is not None:
            raise RemoteSaveError(f"{what} failed on rank {rank}: {record['error']}")
        return record["value"]
    try:
        with board.busy():
            value = fn()
    except BaseException as err:
        board.publish(step, what, error=err)
        raise
    board.publish(step, what, value=value if publish else None)
    return value
