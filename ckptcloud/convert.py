"""Convert between a sharded checkpoint (a DCP folder) and one ``torch.save`` file, store to store.

:func:`sharded_to_file` streams a committed sharded checkpoint into one ``torch.save`` file with ckptcloud's
integrity trailer, uploaded in parts as it is written: no temporary local file, and never the whole checkpoint in
memory. The file's structure (``data.pkl``) is pickled first from ``.metadata`` alone, with stand-ins for the
tensors; then the tensors are loaded a batch at a time (ranged GETs of only their bytes, CRC32C checked) and each
is written as its ``data/<n>`` record and freed. Peak memory is about twice the larger of ``batch_bytes`` and the
largest tensor (a tensor's bytes, then the tensor), plus the upload pipeline's ``(max_concurrency + 1) *
part_size``. Non-tensor items (steps, optimizer hyper-parameters) are loaded with ``weights_only=True``.

:func:`file_to_sharded` loads a ``torch.save`` file (downloaded to a temporary file and memory-mapped, so its
tensors are not copied into memory) and saves it as a sharded checkpoint with
:class:`~ckptcloud.dcp.CloudStorageWriter` (``.metadata`` written last: committed or nothing).

Example:
    >>> import tempfile, torch
    >>> from ckptcloud.dcp import CloudStorageWriter
    >>> import torch.distributed.checkpoint as dcp
    >>> root = "file://" + tempfile.mkdtemp()
    >>> _ = dcp.save({"w": torch.ones(3), "step": 5}, storage_writer=CloudStorageWriter(root + "/s"), no_dist=True)
    >>> sharded_to_file(root + "/s", root + "/model.pt").tensors
    1
    >>> file_to_sharded(root + "/model.pt", root + "/again").tensors
    1
"""

from __future__ import annotations

import collections
import io
import pickle
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import ReadItem

from ckptcloud import checksum
from ckptcloud.dcp.folder import is_committed, read_metadata
from ckptcloud.dcp.layout import CheckpointExistsError
from ckptcloud.dcp.reader import CloudStorageReader
from ckptcloud.dcp.target import Target
from ckptcloud.dcp.writer import CloudStorageWriter
from ckptcloud.handlers import DiskSaver, atomic_write
from ckptcloud.serialization import _ChecksummingWriter, trailer
from ckptcloud.streaming import PartWriter, choose_part_size
from ckptcloud.urls import saver_from_url, split_url

MiB = 1024 * 1024


@dataclass(frozen=True)
class Converted:
    """What a conversion wrote: the destination URL, its size in bytes (``None`` for a folder), how many tensors
    and other items it holds, and the most tensor bytes held in memory at once (``sharded_to_file``)."""

    url: str
    size: int | None
    tensors: int
    others: int
    peak_batch_bytes: int = 0


# --------------------------------------------------------------------------------- sharded -> one file
class _Slot:
    """Stands for one tensor of the checkpoint while the file's structure is pickled: its record, dtype, shape."""

    def __init__(self, key: str, fqn: str, dtype: torch.dtype, size: torch.Size) -> None:
        self.key, self.fqn, self.dtype, self.size = key, fqn, dtype, size

    @property
    def numel(self) -> int:
        n = 1
        for dim in self.size:
            n *= dim
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class _SlotStorage:
    """The storage of a :class:`_Slot`, pickled by reference (``persistent_id``) as ``torch.save`` does."""

    def __init__(self, slot: _Slot) -> None:
        self.slot = slot


def _contiguous_stride(size: torch.Size) -> tuple[int, ...]:
    """The strides of a contiguous tensor of ``size`` (what ``torch.empty(size).stride()`` gives)."""
    stride, acc = [], 1
    for dim in reversed(size):
        stride.append(acc)
        acc *= max(dim, 1)
    return tuple(reversed(stride))


class _Pickler(pickle.Pickler):
    """Pickles the checkpoint's structure exactly as ``torch.save`` would, with :class:`_Slot` stand-ins written as
    ``torch._utils._rebuild_tensor_v2`` over a storage record; real tensors (inside non-tensor items) become
    records too, their bytes kept in :attr:`inline`."""

    def __init__(self, file: IO[bytes], keys: Callable[[], str]) -> None:
        super().__init__(file, protocol=2)  # torch.save's default protocol
        self.keys = keys
        self.inline: dict[str, torch.UntypedStorage] = {}
        self._seen: dict[int, str] = {}

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, _Slot):
            args = (_SlotStorage(obj), 0, obj.size, _contiguous_stride(obj.size), False, collections.OrderedDict())
            return torch._utils._rebuild_tensor_v2, args
        return NotImplemented

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _SlotStorage):
            slot = obj.slot
            return ("storage", _pickle_storage_type(slot.dtype), slot.key, "cpu", slot.numel)
        if isinstance(obj, torch.storage.TypedStorage):
            storage = obj._untyped_storage
            key = self._seen.setdefault(storage._cdata, self.keys())
            self.inline[key] = storage
            return ("storage", getattr(torch, obj._pickle_storage_type()), key, "cpu", obj._size())
        return None


def _pickle_storage_type(dtype: torch.dtype) -> Any:
    """``torch.FloatStorage`` and the like: the storage type ``torch.save`` records for a tensor of ``dtype``."""
    storage = torch.storage.TypedStorage(0, dtype=dtype, _internal=True)
    return getattr(torch, storage._pickle_storage_type())


class _SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, but non-tensor items are unpickled with ``weights_only=True`` (DCP's own uses
    ``weights_only=False``, which runs whatever a checkpoint's bytes ask)."""

    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        self.state_dict[read_item.dest_index.fqn] = torch.load(value, weights_only=True, map_location="cpu")


def _batches(slots: list[_Slot], budget: int) -> Iterator[list[_Slot]]:
    """``slots`` in order, grouped so that each group's bytes stay within ``budget`` (a bigger tensor: alone)."""
    batch: list[_Slot] = []
    size = 0
    for slot in slots:
        if batch and size + slot.nbytes > budget:
            yield batch
            batch, size = [], 0
        batch.append(slot)
        size += slot.nbytes
    if batch:
        yield batch


def _load(reader: CloudStorageReader, state: dict[str, Any]) -> dict[str, Any]:
    """Load the items ``state`` names (flat fully qualified names) from the checkpoint, in place; returns it."""
    with warnings.catch_warnings():  # one process by design: DCP's "torch.distributed is disabled" is noise here
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(state, storage_reader=reader, planner=_SafeLoadPlanner(), no_dist=True)
    return state


def _skeleton(metadata: Any, others: dict[str, Any], slots: dict[str, _Slot]) -> Any:
    """The checkpoint's nested structure (as saved, before DCP flattened it), with slots for the tensors."""
    flat = {**others, **slots}
    mapping = metadata.planner_data
    if not isinstance(mapping, dict) or not all(fqn in mapping for fqn in flat):
        return flat  # saved without flattening (or by a planner that kept no paths): the names as they are
    from torch.distributed.checkpoint._nested_dict import unflatten_state_dict

    return _optimizer_keys(unflatten_state_dict(flat, mapping))


def _optimizer_keys(obj: Any) -> Any:
    """Give back the integer keys of ``optimizer.state_dict()["state"]``, which DCP's flattening turned into strings
    (``"0"``): ``Optimizer.load_state_dict`` would silently drop state under string keys. Only a dict with
    ``state`` and ``param_groups`` whose ``params`` are integers, and only the keys those integers name, change."""
    if isinstance(obj, dict):
        groups, state = obj.get("param_groups"), obj.get("state")
        if isinstance(groups, list) and isinstance(state, dict):
            ids = {p for g in groups if isinstance(g, dict) for p in g.get("params", []) if isinstance(p, int)}
            if ids and all(isinstance(k, str) and k.lstrip("-").isdigit() and int(k) in ids for k in state):
                obj["state"] = {int(k): v for k, v in state.items()}
        for key, value in obj.items():
            obj[key] = _optimizer_keys(value)
    elif isinstance(obj, list):
        return [_optimizer_keys(value) for value in obj]
    return obj


def _write_file(
    src: Target, metadata: Any, out: IO[bytes], batch_bytes: int, progress: Callable[[int], None] | None
) -> tuple[int, int, int]:
    """Write the ``torch.save`` zip archive of the checkpoint into ``out``; returns (tensors, others, peak)."""
    items = metadata.state_dict_metadata
    fqns = sorted(items)
    counter = iter(range(sys.maxsize))
    slots = {
        fqn: _Slot(str(next(counter)), fqn, md.properties.dtype, torch.Size(md.size))
        for fqn in fqns
        if isinstance(md := items[fqn], TensorStorageMetadata)
    }
    others_names = [fqn for fqn in fqns if isinstance(items[fqn], BytesStorageMetadata)]
    reader = CloudStorageReader(src.url, **src.options)
    others = _load(reader, dict.fromkeys(others_names)) if others_names else {}
    buf = io.BytesIO()
    pickler = _Pickler(buf, lambda: str(next(counter)))
    pickler.dump(_skeleton(metadata, others, slots))
    data = buf.getvalue()
    opener = torch.serialization._open_zipfile_writer(out)
    archive = opener.file_like
    archive.write_record("data.pkl", data, len(data))
    archive.write_record(".format_version", "1", 1)
    alignment = str(torch.serialization._get_storage_alignment())
    archive.write_record(".storage_alignment", alignment, len(alignment))
    archive.write_record("byteorder", sys.byteorder, len(sys.byteorder))
    peak = 0
    for batch in _batches(list(slots.values()), batch_bytes):
        loaded = _load(reader, {slot.fqn: torch.empty(slot.size, dtype=slot.dtype) for slot in batch})
        peak = max(peak, sum(slot.nbytes for slot in batch))
        for slot in batch:
            storage = loaded.pop(slot.fqn).contiguous().untyped_storage()
            archive.write_record(f"data/{slot.key}", storage, storage.nbytes())
            if progress is not None:
                progress(storage.nbytes())
            del storage
        del loaded
    for key, storage in pickler.inline.items():  # tensors inside non-tensor items (rare, small)
        archive.write_record(f"data/{key}", storage, storage.nbytes())
    opener.__exit__(None, None, None)  # the zip's central directory
    return len(slots), len(others_names), peak


def sharded_to_file(
    src_url: str, dst_url: str, *, batch_bytes: int = 64 * MiB, src_options: dict | None = None, **dst_options: Any
) -> Converted:
    """Stream the committed sharded checkpoint at ``src_url`` into the one ``torch.save`` file ``dst_url``.

    Args:
        src_url: the checkpoint folder (``s3://bucket/run/step-100``, ``gs://``, ``az://``, ``file://``).
        dst_url: the file to write (``s3://bucket/export/model.pt``, ...); an existing object is replaced.
        batch_bytes: tensor bytes loaded per batch (a bigger tensor is loaded alone): fewer requests against less
            memory.
        src_options: options of the source's store (see :class:`~ckptcloud.dcp.target.Target`).
        **dst_options: options of the destination's saver (``part_size``, ``max_concurrency``, client arguments).

    Raises:
        FileNotFoundError: ``src_url`` is not a committed sharded checkpoint.
        IntegrityError: an item's bytes do not match the CRC32C recorded when it was saved (nothing is committed).
    """
    src = Target(src_url, **(src_options or {}))
    metadata = read_metadata(src.store, src.prefix, src.retry)
    with_trailer = not checksum.warn_if_slow()
    total = sum(md.size.numel() * md.properties.dtype.itemsize for md in metadata.state_dict_metadata.values()
                if isinstance(md, TensorStorageMetadata))  # fmt: skip
    scheme, _, key = split_url(dst_url)
    folder, _, name = key.rpartition("/")
    if not name:
        raise ValueError(f"{dst_url} names no file: give the file's name, e.g. {dst_url.rstrip('/')}/model.pt")

    counts: list[tuple[int, int, int]] = []

    def fill(stream: IO[bytes]) -> int:
        writer = _ChecksummingWriter(stream, checksum=with_trailer)
        counts.append(_write_file(src, metadata, writer, batch_bytes, None))
        if with_trailer:
            stream.write(trailer(writer.length, writer.crc))
        return writer.length

    if scheme == "file":
        path = Path(key)
        if not path.parent.is_dir():
            raise FileNotFoundError(f"no folder {path.parent} to write {path.name} into")
        atomic_write(path, fill)
        size = path.stat().st_size
    else:
        saver = saver_from_url(f"{scheme}://{split_url(dst_url)[1]}/{folder}", require_empty=False, **dst_options)
        expected = total + 64 * 1024
        part_size = choose_part_size(saver.store.limits, saver.part_size, expected)
        writer = PartWriter(saver.store, saver.key(name), part_size=part_size, max_concurrency=saver.max_concurrency,
                            retry=saver.retry, expected_size=expected)  # fmt: skip
        try:
            fill(writer)
            writer.commit()
        except BaseException:
            writer.abort()
            raise
        size = saver.retry.call(lambda: saver.store.head(saver.key(name)), f"reading {dst_url}").size
    tensors, others, peak = counts[-1]
    return Converted(dst_url, size, tensors, others, peak)


# --------------------------------------------------------------------------------- one file -> sharded
def file_to_sharded(src_url: str, dst_url: str, *, src_options: dict | None = None, **dst_options: Any) -> Converted:
    """Save the ``torch.save`` file ``src_url`` as a sharded checkpoint in the folder ``dst_url``.

    The file is downloaded to a temporary file and memory-mapped (its integrity trailer checked, loaded with
    ``weights_only=True``), so its tensors are read from the page cache as the writer streams them, not copied.

    Raises:
        CheckpointExistsError: a checkpoint is already committed at ``dst_url`` (nothing is replaced).
    """
    dst = Target(dst_url.rstrip("/"), **dst_options)
    if is_committed(dst.store, dst.prefix, dst.retry):  # before the download; the writer checks again at its commit
        raise CheckpointExistsError(
            f"a sharded checkpoint is already committed at {dst.url}: checkpoint ids are written once. Convert to a "
            f"new folder, or delete that one first (ckptcloud rm {dst.url}/)"
        )
    scheme, bucket, key = split_url(src_url)
    folder, _, name = key.rpartition("/")
    if scheme == "file":
        saver: Any = DiskSaver(folder or "/", require_empty=False, create_dir=False)
        if not (saver.dirname / name).is_file():
            raise FileNotFoundError(f"no file at {src_url}")
    else:
        saver = saver_from_url(f"{scheme}://{bucket}/{folder}", require_empty=False, **(src_options or {}))
    state = saver.load(name, mmap=True)
    if not isinstance(state, dict):
        raise TypeError(f"{src_url} holds a {type(state).__name__}, not a dict: only a state dict can be sharded")
    writer = CloudStorageWriter(dst_url.rstrip("/"), **dst_options)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            dcp.save(state, storage_writer=writer, no_dist=True)
    except CheckpointException as err:  # DCP's wrapper of the one rank's failure: raise that failure itself
        failure = next(iter(err.failures.values()), None)
        cause = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(cause, BaseException):
            raise cause from err
        raise
    del state
    items = read_metadata(dst.store, dst.prefix, dst.retry).state_dict_metadata.values()
    tensors = sum(isinstance(md, TensorStorageMetadata) for md in items)
    return Converted(dst_url, None, tensors, len(items) - tensors)
