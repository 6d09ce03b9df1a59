"""Sharded checkpoints under a saver's prefix, for retention: list the committed ones, save one, delete some.

A sharded checkpoint is the folder ``<prefix>/<name>/`` (``name`` is the filename a single-file save would get,
minus ``.pt``), committed exactly when ``<prefix>/<name>/.metadata`` exists. Its retention metadata (the
``ckptcloud_*`` keys single-file objects carry) is the user metadata of that ``.metadata`` object.

:func:`list_sharded` is what resume and the command line read; :class:`ShardedSaver` is the save handler a
``Checkpoint(..., sharded=True)`` uses over a :class:`~ckptcloud.remote.RemoteSaver`.

Example:
    >>> import torch
    >>> from ckptcloud.remote import RemoteSaver
    >>> from ckptcloud.stores.memory import MemoryStore
    >>> saver = ShardedSaver(RemoteSaver(MemoryStore("b"), "runs", check_bucket=False))
    >>> saver({"w": torch.ones(2)}, "model_1", {"priority": 1, "basename": "model", "score_name": None})
    >>> sorted(list_sharded(saver.saver)), saver.url("model_1")
    (['model_1'], 'mem://b/runs/model_1')
    >>> saver.remove("model_1")
    >>> list_sharded(saver.saver)
    {}
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from ckptcloud import distributed
from ckptcloud.contract import BaseSaveHandler, ObjectInfo, check_filename, is_valid_name
from ckptcloud.deleting import delete_keys
from ckptcloud.remote import RemoteSaver, _object_metadata

from .folder import list_folder
from .layout import METADATA


def list_sharded(saver: RemoteSaver, select: Callable[[str], bool] | None = None) -> dict[str, ObjectInfo]:
    """The committed sharded checkpoints directly under ``saver``'s prefix: folder name -> the ``ObjectInfo`` of its
    ``.metadata`` object, with that object's user metadata (one listing, plus one HEAD per checkpoint on stores
    whose listing omits metadata, ``max_concurrency`` at a time). Folders without ``.metadata`` (saves in progress,
    failed or killed) are not checkpoints and are left out, as are nested folders.

    Args:
        saver: the saver whose prefix holds the checkpoint folders.
        select: only folder names for which ``select(name)`` is true are described (and HEADed).

    A checkpoint deleted between the listing and its HEAD is left out.
    """
    if not isinstance(saver, RemoteSaver):
        raise TypeError(f"Argument `saver` should be a RemoteSaver (S3Saver, ...), but given {type(saver)}")
    base = saver._base
    listed = saver.retry.call(lambda: saver.store.list(base), f"listing {saver.url('')}")
    found: dict[str, ObjectInfo] = {}
    for info in listed:
        name, slash, leaf = info.key[len(base) :].partition("/")
        if slash and leaf == METADATA and is_valid_name(name) and (select is None or select(name)):
            found[name] = info
    out = dict(sorted(found.items()))
    bare = [name for name, info in out.items() if not info.metadata]
    for name, head in zip(bare, saver._head_all([out[name].key for name in bare]), strict=True):
        if head is None:
            del out[name]
        else:
            out[name] = head
    return out


def folder_name(name: str) -> str:
    """Validate the name of a checkpoint folder directly under the prefix (no ``/``, ``..`` and the like).

    Raises:
        ValueError: a name :func:`~ckptcloud.contract.check_filename` refuses, or one with ``/``.
    """
    check_filename(name)
    if "/" in name:
        raise ValueError(f"a sharded checkpoint's folder name should not contain '/', but given {name!r}")
    return name


def _own_failure(err: CheckpointException, rank: int) -> BaseException:
    """The exception rank ``rank`` raised inside ``dcp.save`` (else the first rank's), or ``err`` itself."""
    failures = err.failures
    failure = failures.get(rank) or next(iter(failures.values()), None)
    cause = failure[0] if isinstance(failure, tuple) else failure
    return cause if isinstance(cause, BaseException) else err


def _no_dist() -> bool:
    return not (dist.is_available() and dist.is_initialized())


class ShardedSaver(BaseSaveHandler):
    """The save handler of ``Checkpoint(..., sharded=True)``: every checkpoint is a DCP folder under ``saver``'s
    prefix, written by every rank through :class:`~ckptcloud.dcp.CloudStorageWriter` and committed by
    ``.metadata``, which carries the retention metadata.

    Saving is collective (every rank calls it with its own shards). Removing deletes whole folders, ``.metadata``
    first, on ``saver.save_on_rank`` only, in batched deletes (S3: 1,000 keys a request); every rank returns or
    raises together.

    Args:
        saver: where the folders go (its store, prefix, client, part size, concurrency and retry).
    """

    stores_run_id = True

    def __init__(self, saver: RemoteSaver) -> None:
        if not isinstance(saver, RemoteSaver):
            raise TypeError(f"Argument `saver` should be a RemoteSaver (S3Saver, ...), but given {type(saver)}")
        self.saver = saver
        self._group: Any = None  # async saves' own gloo group, made on first use

    def __repr__(self) -> str:
        return f"ShardedSaver({self.saver!r})"

    @property
    def save_on_rank(self) -> int:
        """The rank that lists and deletes (every rank writes its own shards)."""
        return self.saver.save_on_rank

    def url(self, name: str) -> str:
        """The URL of the checkpoint folder ``name`` (``""``: the prefix)."""
        return self.saver.url(name)

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        """Save ``checkpoint`` (this rank's DCP state dict) as the folder ``filename``; collective."""
        import torch.distributed.checkpoint as dcp

        from .writer import CloudStorageWriter

        folder_name(filename)
        writer = CloudStorageWriter.from_saver(self.saver, filename, metadata=_object_metadata(metadata))
        no_dist = _no_dist()
        try:
            dcp.save(dict(checkpoint), storage_writer=writer, no_dist=no_dist)
        except CheckpointException as err:  # DCP's wrapper of every rank's failure: raise this rank's own
            raise _own_failure(err, 0 if no_dist else dist.get_rank()) from err
        except RuntimeError as err:  # a dead peer: DCP's own gather then fails on its closed socket
            if writer.rank_failure is None:
                raise
            raise writer.rank_failure from err

    def start_async(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> Callable[[], None]:
        """Start saving ``checkpoint`` as the folder ``filename`` with ``dcp.async_save`` (thread mode); collective.

        DCP copies this rank's state to the CPU before this returns (training may then change it), and uploads in
        its own thread, over a gloo process group of its own (made on first use, on every rank), so the upload's
        collectives never interleave with training's. Returns what waits for the upload to be committed (raising
        this rank's own error on failure).
        """
        import torch.distributed.checkpoint as dcp

        from .writer import CloudStorageWriter

        folder_name(filename)
        writer = CloudStorageWriter.from_saver(self.saver, filename, metadata=_object_metadata(metadata))
        no_dist = _no_dist()
        if not no_dist and self._group is None:
            self._group = dist.new_group(backend="gloo")
        rank = 0 if no_dist else dist.get_rank()
        try:
            future = dcp.async_save(dict(checkpoint), storage_writer=writer, process_group=self._group, no_dist=no_dist)
        except CheckpointException as err:
            raise _own_failure(err, rank) from err
        done = getattr(future, "upload_completion", future)  # an AsyncSaveResponse when staging is async too

        def wait() -> None:
            try:
                done.result()
            except CheckpointException as err:
                raise _own_failure(err, rank) from err
            except RuntimeError as err:  # a dead peer, as in save()
                if writer.rank_failure is None:
                    raise
                raise writer.rank_failure from err

        return wait

    def reader(self, name: str) -> Any:
        """A :class:`~ckptcloud.dcp.CloudStorageReader` for the folder ``name``, with this saver's client."""
        from .reader import CloudStorageReader

        return CloudStorageReader.from_saver(self.saver, folder_name(name))

    def remove(self, filename: str) -> None:
        self.remove_many([filename])

    def remove_many(self, filenames: Iterable[str]) -> None:
        """Delete the folders ``filenames``: every ``.metadata`` first (one batch: from then on none of them is a
        checkpoint), then their other files, in batches. Folders already gone are not errors."""
        names = [folder_name(name) for name in filenames]
        if not names:
            return
        saver = self.saver
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        what = f"removing {len(names)} sharded checkpoint(s) under {saver.url('')} ({shown})"

        def delete() -> None:
            markers = [f"{saver.key(name)}/{METADATA}" for name in names]
            delete_keys(saver.store, markers, saver.retry)
            rest = [info.key for name in names for info in list_folder(saver.store, saver.key(name), saver.retry)]
            delete_keys(saver.store, rest, saver.retry)

        distributed.run_on_rank(self.save_on_rank, delete, what)

    def list(self) -> list[str]:
        """Names of the committed checkpoint folders directly under the prefix, sorted."""
        return sorted(list_sharded(self.saver))

    def describe(self, select: Callable[[str], bool] | None = None) -> dict[str, ObjectInfo]:
        """:func:`list_sharded` of this saver (what ``Checkpoint.resume`` reads)."""
        return list_sharded(self.saver, select)
