"""The host copy an async save serializes while training goes on (made on the writing rank only).

One copy per storage, not per tensor: tensors that share a storage (tied weights, views) share it in the copy
too, exactly as ``torch.save`` would have stored them, so the file is the same size as a synchronous save's and
tied weights come back tied.

:class:`SnapshotPool` keeps those copies between saves: after the first save, a snapshot is one ``copy_`` per
storage into host memory that is already allocated (pinned, with non-blocking copies, for CUDA storages), instead
of a fresh allocation per save.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from typing import Any

import torch

from ckptcloud._tree import tree_leaves, tree_map

# Devices whose tensors have a real storage that can be copied whole (XLA, meta, ... are copied per tensor).
_STORAGE_DEVICES = ("cpu", "cuda")

# How many owners a storage has (tensors and Python storage objects); private, so looked up defensively.
_use_count: Callable[[int], int] | None = getattr(torch._C, "_storage_Use_Count", None)

StorageCopier = Callable[[torch.UntypedStorage], torch.UntypedStorage]


def _has_plain_storage(leaf: Any) -> bool:
    """Whether ``leaf`` is a dense tensor whose whole storage can be copied and viewed again with ``set_``."""
    return (
        type(leaf) in (torch.Tensor, torch.nn.Parameter)
        and leaf.layout == torch.strided
        and not leaf.is_quantized
        and leaf.device.type in _STORAGE_DEVICES
    )


def _copy_tree(obj: Any, copy_storage: StorageCopier) -> Any:
    """``obj`` with each plain tensor rebuilt as a view of ``copy_storage(its storage)``; other leaves copied."""

    def copy_leaf(leaf: Any) -> Any:
        if not isinstance(leaf, torch.Tensor):
            return copy.deepcopy(leaf)
        if not _has_plain_storage(leaf):
            return leaf.detach().to("cpu", copy=True)
        storage = copy_storage(leaf.untyped_storage())
        out = torch.empty(0, dtype=leaf.dtype).set_(storage, leaf.storage_offset(), leaf.size(), leaf.stride())
        if isinstance(leaf, torch.nn.Parameter):
            return torch.nn.Parameter(out, requires_grad=leaf.requires_grad)
        return out

    return tree_map(copy_leaf, obj)


def snapshot(obj: Any) -> Any:
    """A copy of ``obj`` with every tensor copied to the CPU, safe to serialize while training goes on.

    Each storage is copied once (``torch.save`` deduplicates storages the same way); tensors become views of the
    copies with their offsets, sizes and strides. Tensors without a plain storage (sparse, quantized, XLA,
    subclasses) are copied one by one; other leaves are deep-copied. Every call allocates new host memory; see
    :class:`SnapshotPool` for copies into memory reused across saves.

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

    return _copy_tree(obj, copy_storage)


def _allocate(nbytes: int, pinned: bool) -> torch.UntypedStorage:
    """Uninitialized host memory of ``nbytes`` bytes; page-locked (pinned) when ``pinned``."""
    if pinned:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).untyped_storage()
    return torch.UntypedStorage(nbytes)


def _needs_pinned(storage: torch.UntypedStorage) -> bool:
    """Whether copies of ``storage`` go to pinned memory with non-blocking copies (CUDA storages)."""
    return storage.device.type == "cuda"


def _record_copies_done(devices: set[torch.device]) -> list[Any]:
    """One CUDA event per device, recorded on its current stream after the snapshot's copies were queued."""
    events = []
    for device in devices:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        events.append(event)
    return events


class SnapshotPool:
    """Host buffers that consecutive snapshots copy into, so that a save allocates nothing after the first one.

    The pool holds one buffer set: one byte storage per source storage of the last snapshot, keyed by the source's
    identity (``_cdata``, as ``torch.save`` deduplicates) and checked by size. :meth:`snapshot` copies each
    storage into its buffer with one ``copy_`` (dtype-agnostic: the buffers are untyped) and rebuilds the tensors as
    views with ``set_``, exactly like :func:`snapshot`.

    - A storage that changed size (or first appears, e.g. optimizer state after the first step) gets a buffer of
      its size: a spare one of that size left by a storage that is gone, or a new one. Buffers that the snapshot
      did not use are dropped, so steady-state memory is one snapshot of the current state.
    - A buffer is never handed out while anything else still holds it: the lease (:meth:`release`) covers the
      upload, and a buffer still referenced after it (a failed upload's traceback, a save handler that kept the
      payload) is left to its holders and replaced by a new one.
    - A snapshot asked for while the pool is leased gets fresh memory that is not pooled, like :func:`snapshot`:
      at most two buffer sets exist (``Checkpoint`` never does this: it waits for the upload first).
    - CUDA storages are copied into pinned memory with ``non_blocking=True``; :meth:`wait_for_copies` (called by
      the upload before it reads) waits for a CUDA event recorded after the copies on each device's current stream.

    Example:
        >>> import torch
        >>> pool = SnapshotPool()
        >>> state = {"w": torch.ones(4), "view": None}
        >>> state["view"] = state["w"][1:3]
        >>> first = pool.snapshot(state)["w"].data_ptr()
        >>> pool.release()
        >>> state["w"].add_(1.0)
        tensor([2., 2., 2., 2.])
        >>> again = pool.snapshot(state)
        >>> again["w"].data_ptr() == first, again["view"].tolist()
        (True, [2.0, 2.0])
    """

    def __init__(self) -> None:
        self._buffers: dict[int, tuple[torch.UntypedStorage, bool]] = {}  # source _cdata -> (buffer, pinned)
        self._lock = threading.Lock()
        self._leased = False
        self._copies_done: list[Any] = []
        self.allocations = 0  # buffers allocated so far (tests and benchmarks read it)

    @property
    def nbytes(self) -> int:
        """Bytes of host memory the pool holds."""
        return sum(buffer.nbytes() for buffer, _ in self._buffers.values())

    def snapshot(self, obj: Any) -> Any:
        """Like :func:`snapshot`, into the pool's buffers; the pool stays leased until :meth:`release`."""
        with self._lock:
            if self._leased:
                return snapshot(obj)  # the pooled set is still being uploaded: a second, unpooled set
            self._leased = True
        try:
            return self._fill(obj)
        except BaseException:
            self.release()
            raise

    def _fill(self, obj: Any) -> Any:
        wanted = {leaf.untyped_storage()._cdata for leaf in tree_leaves(obj) if _has_plain_storage(leaf)}
        old = self._buffers
        spare = [entry for key, entry in old.items() if key not in wanted]  # left by storages that are gone
        used: dict[int, tuple[torch.UntypedStorage, torch.UntypedStorage, bool]] = {}
        devices: set[torch.device] = set()

        def usable(entry: tuple[torch.UntypedStorage, bool] | None, nbytes: int, pinned: bool) -> bool:
            return entry is not None and entry[0].nbytes() == nbytes and entry[1] == pinned and self._free(entry[0])

        def copy_storage(storage: torch.UntypedStorage) -> torch.UntypedStorage:
            key = storage._cdata
            if key in used:
                return used[key][1]
            nbytes, pinned = storage.nbytes(), _needs_pinned(storage)
            entry = old.get(key)
            if not usable(entry, nbytes, pinned):
                entry = next((e for e in spare if usable(e, nbytes, pinned)), None)
                if entry is not None:
                    spare.remove(entry)
                else:
                    entry = (_allocate(nbytes, pinned), pinned)
                    self.allocations += 1
            buffer = entry[0]
            buffer.copy_(storage, non_blocking=pinned)
            if pinned:
                devices.add(storage.device)
            used[key] = (storage, buffer, pinned)  # the source stays alive so its identity stays unique
            return buffer

        copied = _copy_tree(obj, copy_storage)
        self._buffers = {key: (buffer, pinned) for key, (_, buffer, pinned) in used.items()}
        self._copies_done = _record_copies_done(devices) if devices else []
        return copied

    @staticmethod
    def _free(buffer: torch.UntypedStorage) -> bool:
        """Whether only the pool holds ``buffer`` (no tensor of an earlier snapshot still views it).

        Without torch's (private) use count, no buffer is known to be free: every snapshot gets new memory.
        """
        return _use_count is not None and _use_count(buffer._cdata) <= 1

    def wait_for_copies(self) -> None:
        """Block until the last snapshot's non-blocking device-to-host copies are done (no-op without any)."""
        events, self._copies_done = self._copies_done, []
        for event in events:
            event.synchronize()

    def release(self) -> None:
        """End the lease taken by :meth:`snapshot`: the upload no longer reads the buffers."""
        with self._lock:
            self._leased = False

    def clear(self) -> None:
        """Drop every buffer (the memory is freed once no snapshot views it any more)."""
        with self._lock:
            self._buffers = {}
            self._copies_done = []
