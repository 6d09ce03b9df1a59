"""``RemoteSaver``: the one save handler for every object store, the front of the shared pipeline.

XLA sync (every rank) -> rank gate -> ``torch.save`` into a ``PartWriter`` (CUDA storages reach the host one at a
time, as ``torch.save`` reaches them) -> commit once or abort -> every rank learns the outcome.
``S3Saver``, ``GCSSaver`` and ``AzureBlobSaver`` are thin named constructors that pick the ``Store``.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any
from urllib.parse import quote, unquote

import torch

from ckptcloud import distributed, serialization
from ckptcloud._resume import format_priority
from ckptcloud._tree import tree_leaves
from ckptcloud.contract import BaseSaveHandler, ObjectInfo, check_filename, is_valid_name
from ckptcloud.dedup.load import rebuild_if_manifest
from ckptcloud.dedup.state import make_dedup
from ckptcloud.deleting import delete_keys
from ckptcloud.download import download_to_file
from ckptcloud.errors import RunConflictError
from ckptcloud.retry import Retry
from ckptcloud.stores.base import MiB, Store
from ckptcloud.streaming import PartWriter, Progress, choose_part_size

DEFAULT_PART_SIZE = 8 * MiB
DEFAULT_MAX_CONCURRENCY = 16
"""Saves: 16 parts of 8 MiB in flight, peak extra memory ``(16 + 1) * 8 MiB`` (136 MiB; 0.1's 16 MiB x 8 held 144).

Twice the connections of 16 MiB x 8 for less memory: on links with a per-connection cap (a WAN, S3's ~100 MB/s
per connection) a save runs about twice as fast; 8 MiB is also boto3's and s3torchconnector's part size.
"""
MAX_CONCURRENCY_LIMIT = 64
DEFAULT_LOAD_CONCURRENCY = 32
"""Ranged GETs in flight per load unless ``load_concurrency=`` says otherwise (at least ``max_concurrency``).

A load writes each range into its file as it arrives (1 MiB at a time), so a range in flight costs a connection,
not a part's memory: loads can keep more requests in flight than saves, which hold a whole part per request.
"""
NEARBY_LOAD_CONCURRENCY = 8
"""With the default ``load_concurrency``, the most ranges when the server answers within 10 ms (same host or LAN)."""


def check_concurrency(value: Any, argument: str) -> int:
    """``value`` as a concurrency: an int from 1 to :data:`MAX_CONCURRENCY_LIMIT`, else an error naming ``argument``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Argument `{argument}` should be an int, but given {type(value)}")
    if not 1 <= value <= MAX_CONCURRENCY_LIMIT:
        raise ValueError(f"Argument `{argument}` should be between 1 and {MAX_CONCURRENCY_LIMIT}, but given {value}")
    return value


def resolve_load_concurrency(load_concurrency: Any, max_concurrency: Any) -> int:
    """The ranged GETs a load keeps in flight: ``load_concurrency`` (checked), or by default
    ``max(DEFAULT_LOAD_CONCURRENCY, max_concurrency)``.

    Example:
        >>> resolve_load_concurrency(None, 8), resolve_load_concurrency(None, 48), resolve_load_concurrency(4, 8)
        (32, 48, 4)
    """
    if load_concurrency is None:
        return max(DEFAULT_LOAD_CONCURRENCY, check_concurrency(max_concurrency, "max_concurrency"))
    return check_concurrency(load_concurrency, "load_concurrency")


def _estimate_nbytes(obj: Any) -> int:
    """The bytes ``torch.save`` will write for the tensors of ``obj``: each storage once, and whole.

    ``torch.save`` stores the whole storage of a view and shares one storage between tensors (tied weights), so
    summing the tensors' own sizes would under- or over-count.
    """
    storages: dict[int, int] = {}
    other = 0
    for t in tree_leaves(obj):
        if not isinstance(t, torch.Tensor):
            continue
        try:
            storage = t.untyped_storage()
            storages[storage._cdata] = storage.nbytes()
        except (RuntimeError, NotImplementedError, TypeError):  # no plain storage (XLA, sparse, ...)
            other += t.nbytes
    return sum(storages.values()) + other


def check_bucket_name(name: Any, argument: str = "bucket") -> str:
    """A bucket or container name: a non-empty string without ``/``."""
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"Argument `{argument}` should be a {argument} name without '/', but given {name!r}")
    return name


def normalize_prefix(prefix: Any) -> str:
    """``prefix`` without leading/trailing slashes; refuses ``..``/``.`` segments."""
    if not isinstance(prefix, str):
        raise TypeError(f"Argument `prefix` should be a str, but given {type(prefix)}")
    stripped = prefix.strip("/")
    if stripped and any(part in ("", ".", "..") for part in stripped.split("/")):
        raise ValueError(f"Argument `prefix` should not contain '..', '.' or empty segments, but given {prefix!r}")
    return stripped


class RemoteSaver(BaseSaveHandler):
    """Save handler over any :class:`~ckptcloud.stores.base.Store`: streaming, bounded-memory, all-or-nothing.

    Args:
        store: the bucket adapter.
        prefix: folder-like key prefix for every checkpoint (``""`` for the bucket root).
        part_size: bytes per uploaded part; raised automatically if a checkpoint would need too many parts.
        max_concurrency: parts uploaded at once. Peak extra memory is ``(max_concurrency + 1) * part_size``.
        load_concurrency: ranged GETs in flight per load (1 to 64; default ``max(32, max_concurrency)``, or 8
            when the server answers the load's HEAD within 10 ms: a server on this host
            or LAN, where more threads only compete for the CPU). A load writes each range into its temporary file
            as it arrives, so this costs connections, not memory.
            Ranges are at least 8 MiB (or ``part_size`` if smaller) long: a checkpoint under 16 MiB is one GET.
        require_empty: refuse a prefix that already holds ``*.pt`` objects.
        check_bucket: check at construction that the bucket exists and is reachable (a one-item listing on GCS
            and Azure, HeadBucket on S3). ``False`` for load-only use with credentials scoped to objects:
            the object's own request then reports a missing object or denied access.
        save_on_rank: the one rank that uploads and deletes; every rank must call the handler.
        tmp_dir: folder for the temporary file a load downloads into (default: the system temp folder).
        retry: how each request is retried on transient failures (default :class:`~ckptcloud.retry.Retry()`:
            6 attempts, exponential backoff with jitter, 300 s per request at most).
        progress: ``progress(bytes_done, bytes_total)`` during saves and loads, called from worker threads
            (``bytes_total`` is the tensors' size estimate while saving, the object size while loading).
        dedup: content-addressed saves (:mod:`ckptcloud.dedup`): tensor bytes stored once as blobs under
            ``prefix/.blobs/``, each checkpoint a small manifest; unchanged bytes are never uploaded again, and
            removing checkpoints garbage-collects blobs. Needs the ``dedup`` extra. Loads of such checkpoints work
            with any saver.
        dedup_grace: seconds an unreferenced blob is kept before GC may delete it (default 6 hours); blobs older
            than half of it are stored again rather than reused. Every saver and GC of a prefix must use the same.
        **torch_save_kwargs: passed to ``torch.save``.

    Example:
        >>> import torch
        >>> from ckptcloud.stores.memory import MemoryStore
        >>> saver = RemoteSaver(MemoryStore("bucket"), "runs/1")
        >>> saver({"w": torch.ones(3)}, "model_1.pt")
        >>> saver.list(), saver.url("model_1.pt")
        (['model_1.pt'], 'mem://bucket/runs/1/model_1.pt')
        >>> saver.load("model_1.pt")["w"]
        tensor([1., 1., 1.])
    """

    stores_run_id = True

    def __init__(
        self,
        store: Store,
        prefix: str = "",
        *,
        part_size: int = DEFAULT_PART_SIZE,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        load_concurrency: int | None = None,
        require_empty: bool = True,
        check_bucket: bool = True,
        save_on_rank: int = 0,
        tmp_dir: str | None = None,
        retry: Retry | None = None,
        progress: Progress | None = None,
        dedup: bool = False,
        dedup_grace: float | None = None,
        **torch_save_kwargs: Any,
    ) -> None:
        limits = store.limits
        if isinstance(part_size, bool) or not isinstance(part_size, int):
            raise TypeError(f"Argument `part_size` should be an int, but given {type(part_size)}")
        if not limits.min_part_size <= part_size <= limits.max_part_size or part_size % limits.part_alignment:
            align = f" and a multiple of {limits.part_alignment}" if limits.part_alignment > 1 else ""
            raise ValueError(
                f"Argument `part_size` should be between {limits.min_part_size} and {limits.max_part_size} bytes"
                f"{align} for {store.scheme}://, but given {part_size}"
            )
        check_concurrency(max_concurrency, "max_concurrency")
        self.store = store
        self.prefix = normalize_prefix(prefix)
        self.part_size = part_size
        self.max_concurrency = max_concurrency
        self.load_concurrency = resolve_load_concurrency(load_concurrency, max_concurrency)
        # the default adapts: a nearby server (loopback, LAN) gets 8 ranges, as 0.1 loads had; the cloud all
        self._nearby_concurrency = None if load_concurrency is not None else NEARBY_LOAD_CONCURRENCY
        self.save_on_rank = save_on_rank
        self.tmp_dir = tmp_dir
        self.retry = retry or Retry()
        self.progress = progress
        self.kwargs = torch_save_kwargs
        self.dedup = make_dedup(dedup, dedup_grace)  # ckptcloud.dedup: None unless dedup=True
        if distributed.get_rank() == save_on_rank:
            if check_bucket:
                self.retry.call(store.check_bucket, f"checking {self.url('')}")
            if require_empty:
                existing = self.list()
                if existing:
                    raise ValueError(
                        f"Objects {existing[:10]} with extension '.pt' are already present under "
                        f"{self.url('')}. If you want to use this prefix anyway, pass `require_empty=False`."
                    )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(url={self.url('')!r}, part_size={self.part_size}, "
            f"max_concurrency={self.max_concurrency}, save_on_rank={self.save_on_rank})"
        )

    def key(self, filename: str) -> str:
        """The object key of ``filename``: ``prefix/filename``; ``filename`` cannot escape the prefix."""
        check_filename(filename)
        return f"{self.prefix}/{filename}" if self.prefix else filename

    def url(self, filename: str) -> str:
        """Full URL of ``filename``, e.g. ``s3://bucket/prefix/model_3.pt``."""
        if filename == "":
            return self.store.url(self._base)
        return self.store.url(self.key(filename))

    # ------------------------------------------------------------------------------------ save and remove
    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        key = self.key(filename)
        distributed.sync_xla(checkpoint)  # every rank; then only the writer copies anything to the host
        distributed.run_on_rank(
            self.save_on_rank,
            lambda: self._upload(distributed.xla_to_cpu(checkpoint), key, metadata),
            f"saving {self.url(filename)}",
        )

    def _upload(self, checkpoint: Mapping, key: str, metadata: Mapping | None) -> None:
        if self.dedup is not None:  # blobs + manifest (ckptcloud.dedup)
            return self.dedup.save(self, checkpoint, key, metadata)
        expected = _estimate_nbytes(checkpoint)
        part_size = choose_part_size(self.store.limits, self.part_size, expected)
        writer = PartWriter(
            self.store,
            key,
            part_size=part_size,
            max_concurrency=self.max_concurrency,
            metadata=_object_metadata(metadata),
            retry=self.retry,
            progress=self.progress,
            expected_size=expected,
            claim=_run_claim(self.store.url(key), metadata),
        )
        try:
            serialization.save(checkpoint, writer, **self.kwargs)
            writer.commit()
        except BaseException as err:
            writer.abort()  # a Ctrl-C while it waits comes out of here, after the upload was discarded
            cause = writer.failure
            if cause is None or cause is err:
                raise
            if not isinstance(err, Exception):  # Ctrl-C or exit in flight: never replaced by a part's error
                if err.__context__ is None:
                    err.__context__ = cause  # chained: the traceback shows the part's error too
                raise
            raise cause from None  # torch.save masks exceptions raised inside write()

    def remove(self, filename: str) -> None:
        key = self.key(filename)
        what = f"removing {self.url(filename)}"
        distributed.run_on_rank(
            self.save_on_rank, lambda: (self.retry.call(lambda: self.store.delete(key), what), self._collect()), what
        )

    def _collect(self) -> None:
        """With ``dedup``: garbage-collect the blobs no kept checkpoint references (:mod:`ckptcloud.dedup.gc`)."""
        if self.dedup is not None:
            self.dedup.collect(self)

    def remove_many(self, filenames: Iterable[str]) -> None:
        """Remove several checkpoints in as few requests as the store allows (S3: 1,000 keys per request).

        Like :meth:`remove`: call it on every rank, ``save_on_rank`` deletes; names already gone are not errors.
        """
        names = list(filenames)
        if not names:
            return
        keys = [self.key(name) for name in names]
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        what = f"removing {len(keys)} checkpoint(s) under {self.url('')} ({shown})"

        distributed.run_on_rank(
            self.save_on_rank, lambda: (delete_keys(self.store, keys, self.retry), self._collect()), what
        )

    # ------------------------------------------------------------------------------------- read and list
    @property
    def _base(self) -> str:
        return f"{self.prefix}/" if self.prefix else ""

    def list(self) -> list[str]:
        """Names of the ``*.pt`` checkpoints directly under the prefix, sorted."""
        return sorted(self._checkpoints())

    def _checkpoints(self) -> dict[str, ObjectInfo]:
        listed = self.retry.call(lambda: self.store.list(self._base), f"listing {self.url('')}")
        infos = ((info.key[len(self._base) :], info) for info in listed)
        return {name: info for name, info in infos if name.endswith(".pt") and "/" not in name and is_valid_name(name)}

    def describe(self, select: Callable[[str], bool] | None = None) -> dict[str, ObjectInfo]:
        """Each ``*.pt`` checkpoint directly under the prefix: size, time and the metadata saved with it, by name.

        The metadata holds the exact priority, score name and basename (percent-encoded text), as used by
        :meth:`ckptcloud.Checkpoint.resume` and the ``ckptcloud`` command. Stores whose listing omits metadata
        (S3) cost one HEAD request per checkpoint, ``max_concurrency`` at a time.

        Args:
            select: only names for which ``select(name)`` is true are described (and HEADed): resume passes its
                filename pattern, so foreign objects cost nothing.

        An object deleted between the listing and its HEAD is left out.
        """
        listed = sorted((name, info) for name, info in self._checkpoints().items() if select is None or select(name))
        out = dict(listed)
        bare = [name for name, info in listed if not info.metadata]
        for name, info in zip(bare, self._head_all([out[name].key for name in bare]), strict=True):
            if info is None:
                del out[name]
            else:
                out[name] = info
        return out

    def _head_all(self, keys: list[str]) -> list[ObjectInfo | None]:
        """HEAD every key, ``max_concurrency`` at a time, each retried on its own; ``None`` for a key now gone.

        The first failure (other than a missing object) stops the HEADs not yet started and is raised once the
        ones in flight have returned.
        """
        cancel = threading.Event()
        failures: list[BaseException] = []
        lock = threading.Lock()

        def head(key: str) -> ObjectInfo | None:
            try:
                return self.retry.call(lambda: self.store.head(key), f"reading {self.store.url(key)}", cancel)
            except FileNotFoundError:  # deleted since it was listed
                return None
            except BaseException as err:
                with lock:
                    if not cancel.is_set():  # the first failure; the HEADs it stops raise CancelledError
                        failures.append(err)
                    cancel.set()
                raise

        if len(keys) <= 1 or self.max_concurrency == 1:
            return [head(key) for key in keys]
        executor = ThreadPoolExecutor(min(self.max_concurrency, len(keys)), thread_name_prefix="ckptcloud-head")
        try:
            futures = [executor.submit(head, key) for key in keys]
            wait(futures, return_when=FIRST_EXCEPTION)
        finally:  # on a failure or Ctrl-C: start no further HEAD, wait for the ones in flight
            cancel.set()
            executor.shutdown(wait=True, cancel_futures=True)
        if failures:
            raise failures[0]
        return [future.result() for future in futures]

    def cleanup_incomplete(self, older_than: float = 3600.0) -> list[str]:
        """Discard uploads under the prefix that a killed process left incomplete; returns what was discarded.

        Args:
            older_than: only uploads started at least this many seconds ago (default one hour, so that running
                saves of other processes are left alone: pass more than your longest save).
        """
        if distributed.get_rank() != self.save_on_rank:
            return []
        now = time.time()
        discarded = []
        incomplete = self.retry.call(lambda: self.store.list_incomplete(self._base), f"listing {self.url('')}")
        for item in incomplete:
            if item.started is not None and now - item.started < older_than:
                continue
            self.retry.call(lambda u=item.upload: self.store.abort(u), f"discarding {self.store.url(item.key)}")
            discarded.append(item.key)
        return discarded

    def load(self, filename: str, *, map_location: Any = "cpu", weights_only: bool = True, mmap: bool = False) -> Any:
        """Download ``filename`` into a temporary file and ``torch.load`` it (``weights_only=True`` by default).

        The file is deleted at once. By default the tensors are copied out of it into ordinary memory, and its
        pages are released when the load returns. ``mmap=True`` maps the tensors onto the file's pages instead: no
        copy and no copying time, and pages written to later are copied on write. But the file's space (RAM when
        the temp folder is a tmpfs) stays held for as long as any loaded tensor lives, which for an optimizer's
        state restored with ``load_state_dict`` is the rest of the run. Put the temporary file on fast local
        storage with ``tmp_dir``.
        """
        key = self.key(filename)
        with tempfile.TemporaryFile(dir=self.tmp_dir, prefix="ckptcloud-") as file:
            download_to_file(
                self.store,
                key,
                file,
                part_size=self.part_size,
                max_concurrency=self.load_concurrency,
                retry=self.retry,
                progress=self.progress,
                nearby_concurrency=self._nearby_concurrency,
            )
            rebuild_if_manifest(self, filename, file, self.progress)  # a dedup manifest -> its checkpoint
            return serialization.load(
                file, map_location=map_location, weights_only=weights_only, name=self.url(filename), mmap=mmap
            )


def _object_metadata(metadata: Mapping | None) -> dict[str, str]:
    """Retention metadata stored with the object (the exact priority, not the 4-decimal filename text), and what
    retention policies read after a restart: the step, the save time (unix seconds) and the score.

    Keys are identifiers (Azure requires it) and values are percent-encoded ASCII (S3 and Azure require it).
    """
    if not metadata:
        return {}

    def number(key: str) -> str | None:
        return None if metadata.get(key) is None else format_priority(metadata[key])

    fields = {
        "ckptcloud_priority": number("priority"),
        "ckptcloud_score_name": metadata.get("score_name"),
        "ckptcloud_basename": metadata.get("basename"),
        "ckptcloud_run": metadata.get("run"),
        "ckptcloud_step": number("step"),
        "ckptcloud_time": number("time"),
        "ckptcloud_score": number("score"),
    }
    return {key: quote(str(value), safe="") for key, value in fields.items() if value is not None}


def _run_claim(url: str, metadata: Mapping | None) -> Callable[[ObjectInfo], None] | None:
    """For a save that carries a run id: accept an existing object at ``url`` only if this run wrote it.

    Objects without a run id (saved by ckptcloud 0.1.0, or by another tool) are this run's to replace, as before.
    """
    run = (metadata or {}).get("run")
    if not run:
        return None

    def claim(existing: ObjectInfo) -> None:
        theirs = unquote(existing.metadata.get("ckptcloud_run", ""))
        if theirs and theirs != run:
            raise RunConflictError(
                f"not saving {url}: another run (id {theirs}) wrote it; this run's id is {run}. Two jobs must not "
                "share a prefix: give each its own prefix, or continue that run with Checkpoint(..., resume=True)"
            )

    return claim
