"""``CloudStorageReader``: DCP's ``StorageReader`` on S3, GCS, Azure and local folders, by ranged GETs.

How a load goes (``dcp.load`` calls these in this order):

1. ``read_metadata`` (every rank, at the same point, before DCP's first collective): group rank 0 reads
   ``.metadata`` (one HEAD, one GET pinned to the version seen, checked against its CRC32C) and broadcasts its bytes
   to the group; a folder without ``.metadata`` is not a checkpoint, and every rank raises ``FileNotFoundError``.
2. ``read_data`` (every rank): the items this rank's plan needs, and only those, sorted by file and offset;
   adjacent items are coalesced into one range of up to ``part_size`` bytes (a larger item is one range, fetched
   as concurrent ``part_size`` pieces), and up to ``max_concurrency`` ranged GETs run at once
   (:func:`~ckptcloud.download.fetch_ranges`). Each item's bytes are checked against the CRC32C recorded at save
   time (:class:`~ckptcloud.errors.IntegrityError` names the file and item) before ``torch.load(weights_only=True)``
   reads them; the tensor is narrowed to what each request needs (resharding) and copied into place.

Peak extra memory per rank is about ``(max_concurrency + 1) * part_size`` of fetched bytes plus one item's loaded
tensor, besides the state dict being loaded into. Checkpoints written by DCP's own writers (``FileSystemWriter``,
``FsspecWriter``, s3torchconnector) load too, unverified (they record no checksums).
"""

from __future__ import annotations

import io
import os
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from ckptcloud import checksum, serialization
from ckptcloud.checksum import crc32c
from ckptcloud.download import fetch_ranges
from ckptcloud.errors import CkptcloudError, IntegrityError
from ckptcloud.remote import RemoteSaver

from .agreement import require_numpy_across_ranks
from .folder import read_metadata_bytes
from .layout import METADATA, ItemLocation, load_metadata
from .target import Target


@dataclass
class _Span:
    """One ranged GET: bytes ``[start, end)`` of a data file, covering the items in ``items``."""

    name: str
    start: int
    end: int
    items: list[tuple[MetadataIndex, Any]] = field(default_factory=list)


def plan_spans(locations: list[tuple[MetadataIndex, Any]], max_span: int) -> list[_Span]:
    """Coalesce item locations into ranged reads: sorted by file and offset, an item joins the previous span when it
    starts exactly where that span ends, in the same file, and the span stays within ``max_span`` bytes.

    Example:
        >>> from ckptcloud.dcp.layout import ItemLocation
        >>> locs = [(i, ItemLocation("f", off, 10, None, 40, None)) for i, off in enumerate([0, 10, 30])]
        >>> [(s.start, s.end) for s in plan_spans(locs, max_span=100)]
        [(0, 20), (30, 40)]
    """
    spans: list[_Span] = []
    for index, loc in sorted(locations, key=lambda pair: (pair[1].relative_path, pair[1].offset)):
        end = loc.offset + loc.length
        last = spans[-1] if spans else None
        if (
            last is not None
            and last.name == loc.relative_path
            and last.end == loc.offset
            and end - last.start <= max_span
        ):
            last.end = end
        else:
            last = _Span(loc.relative_path, loc.offset, end)
            spans.append(last)
        last.items.append((index, loc))
    return spans


class _ViewReader(io.RawIOBase):
    """A seekable, read-only file over a memoryview, so ``torch.load`` reads an item without a copy of its bytes."""

    def __init__(self, view: memoryview) -> None:
        super().__init__()
        self._view = view
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        out = memoryview(buffer).cast("B")
        n = max(0, min(len(out), len(self._view) - self._pos))
        out[:n] = self._view[self._pos : self._pos + n]
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos


class CloudStorageReader(StorageReader):
    """Read ``torch.distributed.checkpoint`` checkpoints from ``s3://``, ``gs://``, ``az://`` or ``file://`` folders.

    Rank 0 reads ``.metadata`` once and broadcasts it; every rank then fetches only the byte ranges it needs, with
    concurrent ranged GETs, and checks each item's CRC32C (see the module docstring). Loads into any world size:
    DCP reshards.

    Args:
        url: the checkpoint's folder (a committed one: with ``.metadata``).
        process_group: the group ``dcp.load`` runs on (default: the default group), for the metadata broadcast.
        broadcast_metadata: ``True`` (default): when a process group of more than one rank is initialized, group
            rank 0 reads ``.metadata`` and broadcasts it, so every rank of the group must call ``dcp.load`` (as DCP
            requires anyway). Pass ``False`` to have each rank read it itself, e.g. for ``dcp.load(...,
            no_dist=True)`` on some ranks only.
        trust_metadata: unpickle ``.metadata`` and the non-tensor items without restrictions (only for checkpoints
            you trust; a custom planner's data may need it). By default only the classes DCP metadata is made of
            are rebuilt, and every non-tensor item must load with ``torch.load(weights_only=True)`` before DCP's
            planner unpickles it (DCP's default planner itself loads them with ``weights_only=False``).
        **options: ``part_size`` (the longest coalesced read; default 8 MiB), ``max_concurrency`` (ranged GETs at
            once; default 16), ``retry``, ``progress``, and the client/credential arguments of the scheme's saver.

    Example:
        >>> import tempfile, torch, torch.distributed.checkpoint as dcp
        >>> from ckptcloud.dcp import CloudStorageWriter
        >>> url = "file://" + tempfile.mkdtemp() + "/step-1"
        >>> _ = dcp.save({"w": torch.arange(4.0)}, storage_writer=CloudStorageWriter(url), no_dist=True)
        >>> state = {"w": torch.zeros(4)}
        >>> dcp.load(state, storage_reader=CloudStorageReader(url), no_dist=True)
        >>> state["w"]
        tensor([0., 1., 2., 3.])
    """

    def __init__(
        self,
        url: str,
        *,
        process_group: dist.ProcessGroup | None = None,
        broadcast_metadata: bool = True,
        trust_metadata: bool = False,
        **options: Any,
    ) -> None:
        super().__init__()
        self._start(Target(url, **options), process_group, broadcast_metadata, trust_metadata)

    def _start(self, target: Target, group: dist.ProcessGroup | None, broadcast: bool, trusted: bool) -> None:
        require_numpy_across_ranks()
        self._target = target
        self._group = group
        self._broadcast = broadcast
        self._trusted = trusted
        self._locations: dict[MetadataIndex, Any] = {}

    def __repr__(self) -> str:
        return f"CloudStorageReader({self._target.url!r})"

    @classmethod
    def from_saver(
        cls,
        saver: RemoteSaver,
        folder: str,
        *,
        process_group: dist.ProcessGroup | None = None,
        broadcast_metadata: bool = True,
        trust_metadata: bool = False,
    ) -> CloudStorageReader:
        """The checkpoint folder ``folder`` under ``saver``'s prefix, with its store, client and pipeline options.

        Such a reader does not pickle: for process-mode ``async_save``, make it from a URL.

        Example:
            >>> from ckptcloud.remote import RemoteSaver
            >>> from ckptcloud.stores.memory import MemoryStore
            >>> CloudStorageReader.from_saver(RemoteSaver(MemoryStore("b"), "runs/1"), "step-100")
            CloudStorageReader('mem://b/runs/1/step-100')
        """
        reader = cls.__new__(cls)
        StorageReader.__init__(reader)
        reader._start(Target.from_saver(saver, folder), process_group, broadcast_metadata, trust_metadata)
        return reader

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_group"] = None  # process groups do not pickle; the default group is used after
        return state

    @property
    def url(self) -> str:
        """The checkpoint folder this reader loads from."""
        return self._target.url

    @property
    def checkpoint_id(self) -> str:
        return self._target.url

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id:
            self._target = self._target.at(str(checkpoint_id))
        self._locations = {}

    # ---------------------------------------------------------------------------------------- metadata
    def read_metadata(self, *args: Any) -> Metadata:
        """The checkpoint's metadata: read by group rank 0 and broadcast, or read here (see the class)."""
        if not self._shares_metadata():
            body = self._read_metadata_bytes()
        else:
            body = self._broadcast_metadata()
        metadata = load_metadata(body, self._target.url_of(METADATA), trusted=self._trusted)
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = uuid.uuid4().hex
        return metadata

    def _shares_metadata(self) -> bool:
        if not self._broadcast or not dist.is_available() or not dist.is_initialized():
            return False
        return dist.get_world_size(self._group) > 1

    def _read_metadata_bytes(self) -> bytes:
        target = self._target
        body, _ = read_metadata_bytes(target.store, target.prefix, target.retry)
        return bytes(body)

    def _broadcast_metadata(self) -> bytes:
        """Group rank 0 reads; every rank gets the bytes, or rank 0's error, from one ``broadcast_object_list``."""
        group = self._group
        src = dist.get_global_rank(group, 0) if group is not None else 0
        message: list[Any] = [None]
        failure: BaseException | None = None
        if dist.get_rank(group) == 0:
            try:
                message[0] = ("ok", self._read_metadata_bytes())
            except BaseException as err:  # every rank must reach the broadcast, whatever happened here
                message[0] = ("error", type(err).__name__, str(err))
                failure = err
        dist.broadcast_object_list(message, src=src, group=group)
        if failure is not None:
            raise failure
        kind, *payload = message[0]
        if kind == "ok":
            return payload[0]  # type: ignore[no-any-return]
        name, text = payload
        if name == "IntegrityError":
            raise IntegrityError(text)
        builtin = {"FileNotFoundError": FileNotFoundError, "PermissionError": PermissionError}.get(name)
        if builtin is not None:
            raise builtin(text)
        raise CkptcloudError(f"reading the metadata of {self._target.url} failed on rank 0: {name}: {text}")

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if metadata.storage_data is None:
            raise ValueError(f"{self._target.url_of(METADATA)} has no storage data: not a checkpoint DCP wrote")
        self._locations = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    # -------------------------------------------------------------------------------------------- data
    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Fetch the byte ranges ``plan`` needs, check them, and hand each item to ``planner``."""
        target = self._target
        requests: dict[MetadataIndex, list[ReadItem]] = defaultdict(list)
        for item in plan.items:
            requests[item.storage_index].append(item)
        locations = []
        for index in requests:
            loc = self._locations[index]
            if getattr(loc, "transform_descriptors", None):
                raise ValueError(
                    f"{target.url} was saved with stream transforms {list(loc.transform_descriptors)}, which "
                    "CloudStorageReader does not apply"
                )
            locations.append((index, loc))
        spans = plan_spans(locations, target.part_size)
        ranges = [(target.key(span.name), span.start, span.end) for span in spans]
        fetched = fetch_ranges(
            target.store,
            ranges,
            part_size=target.part_size,
            max_concurrency=target.max_concurrency,
            retry=target.retry,
            progress=target.progress,
        )
        try:
            for span, view in zip(spans, fetched, strict=True):
                for index, loc in span.items:
                    data = view[loc.offset - span.start : loc.offset - span.start + loc.length]
                    self._check(index, loc, data)
                    self._deliver(index, data, requests[index], planner)
                del view
        finally:
            fetched.close()  # a failure here stops the GETs still in flight
        future: Future[None] = Future()
        future.set_result(None)
        return future

    def _check(self, index: MetadataIndex, loc: Any, data: memoryview) -> None:
        expected = loc.crc32c if isinstance(loc, ItemLocation) else None
        if expected is None or not checksum.FAST:
            return
        actual = crc32c(data)
        if actual != expected:
            raise IntegrityError(
                f"{self._target.url_of(loc.relative_path)} is damaged: item {index.fqn!r} (bytes {loc.offset}.."
                f"{loc.offset + loc.length}) has CRC32C {actual:08x}, not the {expected:08x} recorded when it was "
                "saved; it was not loaded"
            )

    def _deliver(self, index: MetadataIndex, data: memoryview, items: list[ReadItem], planner: LoadPlanner) -> None:
        url = self._target.url_of(self._locations[index].relative_path)
        if items[0].type == LoadItemType.BYTE_IO:
            if not self._trusted:  # the planner unpickles with weights_only=False: only what the safe unpickler takes
                serialization.load(_ViewReader(data), name=f"item {index.fqn!r} of {url}")
            for item in items:
                planner.load_bytes(item, io.BytesIO(data))
            return
        loaded = serialization.load(_ViewReader(data), name=f"item {index.fqn!r} of {url}")
        if not isinstance(loaded, torch.Tensor):
            raise ValueError(f"item {index.fqn!r} of {url} holds a {type(loaded).__name__}, not a tensor")
        for item in items:
            tensor = narrow_tensor_by_index(loaded, item.storage_offsets, item.lengths)
            target = planner.resolve_tensor(item).detach()
            if target.size() != tensor.size():
                raise ValueError(
                    f"item {index.fqn!r} of {url}: the checkpoint holds a chunk of size {tuple(tensor.size())} where "
                    f"the state dict expects {tuple(target.size())}"
                )
            target.copy_(tensor)
            planner.commit_tensor(item, target)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        """Whether ``checkpoint_id`` is a URL this reader takes (``s3://``, ``gs://``, ``az://``, ``file://``)."""
        from .writer import CloudStorageWriter

        return CloudStorageWriter.validate_checkpoint_id(checkpoint_id)
