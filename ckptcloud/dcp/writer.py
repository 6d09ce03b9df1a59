"""``CloudStorageWriter``: DCP's ``StorageWriter`` on S3, GCS, Azure and local folders, through the part pipeline.

How a save goes (``dcp.save`` calls these in this order):

1. ``prepare_global_plan`` (coordinator, before any upload): refuse an id that is already committed (one HEAD of
   ``.metadata``), pick the save's token, tell every rank its file.
2. ``write_data`` (every rank): stream every item into the rank's one data file through a
   :class:`~ckptcloud.streaming.PartWriter` (parts of ``part_size`` uploaded ``max_concurrency`` at a time: peak
   extra memory ``(max_concurrency + 1) * part_size`` per rank, plus one item's CPU copy when it is not already a
   compact CPU tensor; no temporary file), recording each item's offset, length and CRC32C as the bytes pass. The
   file is committed (completed) at the end. Ranks agree through the process group's store
   (:mod:`ckptcloud.dcp.agreement`): a rank that fails tells the others, which cancel their uploads and delete what
   they committed; every rank raises. A rank that dies without a word (SIGKILL) stops beating its heartbeat, and
   the others raise :class:`~ckptcloud.errors.RankFailedError` within a minute (not the process group's timeout).
3. ``finish`` (coordinator, only when every rank's ``write_data`` succeeded): check with one listing that every
   data file is there at its size, then create ``.metadata`` with a conditional write that only creates (S3
   ``If-None-Match: *``, GCS ``ifGenerationMatch=0``, Azure ``If-None-Match: *``, a hard link on local disk). If
   another save committed the id first, this one fails with :class:`CheckpointExistsError` and deletes its own
   files (their names are unique to the save). Until ``.metadata`` exists, the folder is not a checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import uuid
from collections.abc import Mapping
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from ckptcloud import checksum, serialization
from ckptcloud.checksum import crc32c, crc32c_combine
from ckptcloud.contract import ObjectInfo
from ckptcloud.deleting import delete_keys
from ckptcloud.errors import CkptcloudError, RankFailedError, RemoteSaveError
from ckptcloud.remote import RemoteSaver
from ckptcloud.streaming import PartWriter, choose_part_size

from .agreement import SaveAgreement, remote_error, require_numpy_across_ranks
from .folder import list_folder, metadata_info
from .layout import (
    CRC_KEY,
    DCP_FORMAT_VERSION,
    METADATA,
    SAVE_TOKEN_KEY,
    CheckpointExistsError,
    ItemLocation,
    RankFiles,
    data_file_name,
    dump_metadata,
)
from .target import Target

logger = logging.getLogger("ckptcloud")


class _ItemStream(io.RawIOBase):
    """What ``torch.save`` writes an item into: forwards to the rank's ``PartWriter``, checksumming as it goes.

    ``flush`` costs nothing (``torch.save`` and DCP's own stream wrappers call it after every item); the position is
    the ``PartWriter``'s. The file's CRC32C is combined from the items' (:func:`~ckptcloud.checksum.crc32c_combine`),
    so the bytes are read once.
    """

    def __init__(self, writer: PartWriter, *, checksums: bool) -> None:
        super().__init__()
        self._writer = writer
        self._checksums = checksums
        self.item_crc = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:  # type: ignore[override]
        view = memoryview(data).cast("B")
        written = self._writer.write(view)
        if self._checksums:
            self.item_crc = crc32c(view, self.item_crc)
        return written

    def flush(self) -> None:
        """Nothing to do: full parts are already on their way, and the last one goes at commit."""

    def tell(self) -> int:
        return self._writer.tell()


def _compact_cpu(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` on the CPU, owning exactly its own bytes (``torch.save`` writes a view's whole storage)."""
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if tensor.untyped_storage().nbytes() != tensor.nbytes:
        tensor = tensor.clone()
    return tensor


def _item_nbytes(item: WriteItem) -> int:
    if item.tensor_data is None:
        return 0
    return torch.Size(item.tensor_data.size).numel() * item.tensor_data.properties.dtype.itemsize


class CloudStorageWriter(StorageWriter):
    """Write ``torch.distributed.checkpoint`` checkpoints to ``s3://``, ``gs://``, ``az://`` or ``file://`` folders.

    Every rank streams its shards into its own file through the part pipeline; the coordinator commits the
    checkpoint by creating ``.metadata`` last, only if no other save committed that folder (see the module
    docstring). Works with ``dcp.save`` and ``dcp.async_save`` (thread and process mode: the writer pickles its URL
    and options, and builds its client again in the checkpoint process).

    Args:
        url: the checkpoint's folder: ``s3://bucket/run/step-100``, ``gs://...``, ``az://container/...`` or
            ``file:///abs/folder``. Written once: saving again to a committed folder raises
            :class:`CheckpointExistsError`. ``dcp.save(checkpoint_id=other_url, storage_writer=writer)`` saves to
            another folder of the same bucket with the same client.
        **options: the pipeline's ``part_size`` (default 8 MiB), ``max_concurrency`` (default 16: peak extra memory
            per rank is ``(max_concurrency + 1) * part_size``), ``retry``, ``progress`` (per rank), and the
            client/credential arguments of the scheme's saver (``endpoint_url=``, ``connection_string=``,
            ``client=``, ...: see :class:`~ckptcloud.S3Saver`, :class:`~ckptcloud.GCSSaver`,
            :class:`~ckptcloud.AzureBlobSaver`). For process-mode ``async_save``, pass arguments that pickle
            (``endpoint_url=``, not ``client=``).
        metadata: user metadata stored with the ``.metadata`` object when it is created (keys are identifiers,
            values percent-encoded ASCII, as :class:`~ckptcloud.Checkpoint` writes its retention metadata), so a
            listing and one HEAD tell what the checkpoint is without reading it.

    Example:
        >>> import tempfile, torch, torch.distributed.checkpoint as dcp
        >>> url = "file://" + tempfile.mkdtemp() + "/step-1"
        >>> _ = dcp.save({"w": torch.ones(2)}, storage_writer=CloudStorageWriter(url), no_dist=True)
        >>> from ckptcloud.dcp import CloudStorageReader
        >>> state = {"w": torch.zeros(2)}
        >>> dcp.load(state, storage_reader=CloudStorageReader(url), no_dist=True)
        >>> state["w"]
        tensor([1., 1.])
    """

    def __init__(self, url: str, *, metadata: Mapping[str, str] | None = None, **options: Any) -> None:
        super().__init__()
        self._start(Target(url, **options), metadata)

    def _start(self, target: Target, metadata: Mapping[str, str] | None = None) -> None:
        require_numpy_across_ranks()
        self._metadata = _check_metadata(metadata)
        self._target = target
        self._is_coordinator = True
        self._rank = 0
        self._token: str | None = None
        self._rank_failure: RankFailedError | None = None

    def __repr__(self) -> str:
        return f"CloudStorageWriter({self._target.url!r})"

    @classmethod
    def from_saver(
        cls, saver: RemoteSaver, folder: str, *, metadata: Mapping[str, str] | None = None
    ) -> CloudStorageWriter:
        """The checkpoint folder ``folder`` under ``saver``'s prefix, with its store, client and pipeline options;
        ``metadata`` is stored with ``.metadata`` (see the class).

        Such a writer does not pickle: for process-mode ``async_save``, make it from a URL.

        Example:
            >>> from ckptcloud.remote import RemoteSaver
            >>> from ckptcloud.stores.memory import MemoryStore
            >>> CloudStorageWriter.from_saver(RemoteSaver(MemoryStore("b"), "runs/1"), "step-100")
            CloudStorageWriter('mem://b/runs/1/step-100')
        """
        writer = cls.__new__(cls)
        StorageWriter.__init__(writer)
        writer._start(Target.from_saver(saver, folder), metadata)
        return writer

    @property
    def url(self) -> str:
        """The checkpoint folder this writer saves to."""
        return self._target.url

    @property
    def checkpoint_id(self) -> str:
        """What DCP logs as the checkpoint's id: its URL."""
        return self._target.url

    # ------------------------------------------------------------------------------------------ planning
    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id:
            self._target = self._target.at(str(checkpoint_id))
        self._token = None

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("use_collectives", True) is False:
            raise ValueError(
                "CloudStorageWriter needs use_collectives=True: a checkpoint is committed once, by the coordinator, "
                "after every rank's files are; per-rank metadata (use_collectives=False) cannot be all or nothing"
            )
        self._is_coordinator = is_coordinator
        self._rank = int(kwargs.get("rank") or 0)
        self._token = None

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self._target.url, save_id=self._token or "")

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """Refuse a committed id before anything is uploaded; give every rank its file in this save."""
        target = self._target
        if metadata_info(target.store, target.prefix, target.retry) is not None:
            raise CheckpointExistsError(
                f"a sharded checkpoint is already committed at {target.url}: checkpoint ids are written once. Save "
                "under a new id, or delete that checkpoint first"
            )
        token = uuid.uuid4().hex[:16]
        self._token = token
        world = len(plans)
        return [
            dataclasses.replace(plan, storage_data=RankFiles(token, rank, world)) for rank, plan in enumerate(plans)
        ]

    # ----------------------------------------------------------------------------------------- writing
    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        files: RankFiles = plan.storage_data
        if not isinstance(files, RankFiles):
            raise TypeError(f"the save plan was not prepared by CloudStorageWriter (storage_data={files!r})")
        self._token = files.token
        agreement = SaveAgreement.join(files)
        target = self._target
        name = data_file_name(files.rank, files.token)
        what = f"saving the sharded checkpoint {target.url}"
        self._rank_failure = None
        # the heartbeat runs from here until this rank is past wait_for_all (its thread ends with the block)
        beating = agreement.alive() if agreement is not None else contextlib.nullcontext()
        try:
            with beating:
                results = self._write_and_agree(name, plan, planner, agreement, what)
        except RankFailedError as err:  # DCP's gather then fails on the dead rank's socket, hiding this error
            self._rank_failure = err
            raise
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    @property
    def rank_failure(self) -> RankFailedError | None:
        """The :class:`~ckptcloud.errors.RankFailedError` this rank's last ``write_data`` raised, if any.

        When a rank dies mid-save, the survivors find it dead by its heartbeat (see :mod:`ckptcloud.dcp.agreement`)
        and raise this error (and log it), but ``dcp.save`` then runs its own gather, which fails at once on the dead
        rank's closed socket: what ``dcp.save`` raises is gloo's ``RuntimeError: Connection closed by peer``. This
        property tells which rank died and where (``None`` when no rank was found dead).
        """
        return self._rank_failure

    def _write_and_agree(
        self, name: str, plan: SavePlan, planner: SavePlanner, agreement: SaveAgreement | None, what: str
    ) -> list[WriteResult]:
        """Write this rank's file, then wait for every rank (see :meth:`write_data`)."""
        target = self._target
        try:  # a rank with nothing to write (DCP's dedup gave its replicated items to others) writes no file
            results = self._write_file(name, plan.items, planner, agreement) if plan.items else []
        except BaseException as err:
            if agreement is not None and agreement.dead is not None and err is not agreement.dead:
                raise agreement.dead from err  # this rank found another dead and cancelled its own upload
            if agreement is not None and not isinstance(err, RemoteSaveError):  # not another rank's failure
                with contextlib.suppress(Exception):  # the store gone too: DCP's gather still reports this error
                    agreement.report(err)
            raise
        if agreement is not None:
            try:
                agreement.wait_for_all(what)
            except BaseException:
                self._delete_quietly([target.key(name)])  # another rank failed or died: this file is no use
                raise
        return results
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def _write_file(
        self, name: str, items: list[WriteItem], planner: SavePlanner, agreement: SaveAgreement | None
    ) -> list[WriteResult]:
        """Stream ``items`` into the data file ``name`` and commit it; abort it on any failure."""
        target = self._target
        expected = sum(_item_nbytes(item) for item in items)
        writer = PartWriter(
            target.store,
            target.key(name),
            part_size=choose_part_size(target.store.limits, target.part_size, expected),
            max_concurrency=target.max_concurrency,
            retry=target.retry,
            progress=target.progress,
            expected_size=expected,
        )
        checksums = not checksum.warn_if_slow()
        stream = _ItemStream(writer, checksums=checksums)
        ordered = [i for i in items if i.type == WriteItemType.BYTE_IO] + [
            i for i in items if i.type != WriteItemType.BYTE_IO
        ]
        placed: list[tuple[WriteItem, int, int, int]] = []

        what = f"saving the sharded checkpoint {target.url}"

        def stop(text: str) -> None:
            writer.cancel(remote_error(what, text))

        watching = agreement.watch(stop, what) if agreement is not None else contextlib.nullcontext()
        try:
            with watching:
                for item in ordered:
                    data = planner.resolve_data(item)
                    offset = writer.tell()
                    stream.item_crc = 0
                    if item.type == WriteItemType.BYTE_IO:
                        if not isinstance(data, io.BytesIO):
                            raise TypeError(f"a BYTE_IO item resolved to {type(data).__name__}, not io.BytesIO")
                        stream.write(data.getbuffer())
                    else:
                        serialization.save(_compact_cpu(data), stream)
                    placed.append((item, offset, writer.tell() - offset, stream.item_crc))
                writer.commit()
        except BaseException as err:
            writer.abort()
            cause = writer.failure
            if cause is None or cause is err or not isinstance(err, Exception):
                raise
            raise cause from None  # a part's failure, or another rank's: the real reason
        size = writer.tell()
        file_crc: int | None = None
        if checksums:
            file_crc = 0
            for _, _, length, crc in placed:
                file_crc = crc32c_combine(file_crc, crc, length)
        return [
            WriteResult(
                index=item.index,
                size_in_bytes=length,
                storage_data=ItemLocation(name, offset, length, crc if checksums else None, size, file_crc),
            )
            for item, offset, length, crc in placed
        ]

    # ----------------------------------------------------------------------------------------- commit
    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Commit: check that every rank's file is there, then create ``.metadata`` (only if absent)."""
        target = self._target
        token = self._token or ""
        locations = {result.index: result.storage_data for rank in results for result in rank}
        metadata.storage_data = locations
        metadata.version = DCP_FORMAT_VERSION
        metadata.storage_meta = StorageMeta(checkpoint_id=target.url, save_id=token)
        sizes = {loc.relative_path: loc.file_size for loc in locations.values()}
        try:
            self._check_files(sizes)
            body = dump_metadata(metadata)
            self._publish_metadata(body, token)
        except Exception as err:
            if self._settle_failed_commit(token, list(sizes), lost_race=isinstance(err, CheckpointExistsError)):
                return
            raise
        finally:
            world = len(results)
            agreement = SaveAgreement.join(RankFiles(token, 0, world)) if world > 1 else None
            if agreement is not None:
                agreement.clear()

    def _check_files(self, sizes: dict[str, int]) -> None:
        """Every data file is committed at its size (one listing): a deleted or truncated file fails the save."""
        target = self._target
        listed = {info.key: info for info in list_folder(target.store, target.prefix, target.retry)}
        missing = [name for name, size in sizes.items() if _size(listed.get(target.key(name))) != size]
        if missing:
            raise CkptcloudError(
                f"not committing {target.url}: {len(missing)} data file(s) are missing or not at the size written "
                f"({', '.join(sorted(missing)[:5])}); was the folder cleaned up during the save?"
            )

    def _publish_metadata(self, body: bytes, token: str) -> None:
        target = self._target
        key = target.key(METADATA)
        object_metadata = {**self._metadata, SAVE_TOKEN_KEY: token}
        if checksum.FAST:
            object_metadata[CRC_KEY] = str(crc32c(body))

        def claim(existing: ObjectInfo) -> None:
            if existing.metadata.get(SAVE_TOKEN_KEY) == token:
                return  # our own create, whose answer was lost and retried: replacing it with the same bytes is fine
            raise CheckpointExistsError(
                f"another save committed {target.url} first (conditional create of {METADATA} failed): checkpoint "
                "ids are written once, so two jobs cannot both commit one. This save's files were deleted"
            )

        writer = PartWriter(
            target.store,
            key,
            part_size=choose_part_size(target.store.limits, target.part_size, len(body)),
            max_concurrency=target.max_concurrency,
            metadata=object_metadata,
            retry=target.retry,
            claim=claim,
        )
        try:
            writer.write(memoryview(body))
            writer.commit()
        except BaseException:
            writer.abort()
            raise

    def _settle_failed_commit(self, token: str, names: list[str], *, lost_race: bool) -> bool:
        """After ``finish`` failed: whether this save is committed after all, else delete its files if nothing
        else can be using them.

        A create whose answer was lost on every retry may still have made ``.metadata``: if the one there carries this
        save's token, the checkpoint is committed (``True``). If there is no ``.metadata``, or another save's, this
        save's files are garbage (their names are this save's own) and are deleted. When that cannot be told (the
        HEAD fails, or a store that keeps no metadata shows a ``.metadata``), they are left for a cleanup.
        """
        target = self._target
        if lost_race:  # the store refused the create: another save's .metadata is there, never this one's
            self._delete_quietly([target.key(name) for name in names])
            return False
        try:
            info = metadata_info(target.store, target.prefix, target.retry)
        except Exception as err:
            logger.warning("could not tell whether %s was committed after its commit failed: %s", target.url, err)
            return False
        if info is not None and info.metadata.get(SAVE_TOKEN_KEY) == token:
            logger.info("%s was committed: its create succeeded, though its answer was lost", target.url)
            return True
        if info is None or info.metadata.get(SAVE_TOKEN_KEY) is not None:
            self._delete_quietly([target.key(name) for name in names])
        return False

    def _delete_quietly(self, keys: list[str]) -> None:
        """Delete this save's own files after it failed; a failure here is only logged (cleanup can finish it)."""
        try:
            delete_keys(self._target.store, keys, self._target.retry)
        except Exception as err:
            logger.warning("could not delete %d file(s) of a failed save under %s: %s", len(keys), self.url, err)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        """Whether ``checkpoint_id`` is a URL this writer takes (``s3://``, ``gs://``, ``az://``, ``file://``)."""
        return _is_url(checkpoint_id)


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """``metadata`` as a plain dict of identifier keys and ASCII values, without the keys the writer sets itself.

    Raises:
        TypeError: not a mapping of strings.
        ValueError: a key is not an identifier, a value is not ASCII, or a key is one the writer sets.
    """
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise TypeError(f"Argument `metadata` should be a mapping of str to str, but given {type(metadata)}")
    out: dict[str, str] = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"Argument `metadata` should map str to str, but given {key!r}: {value!r}")
        if not key.isidentifier() or not value.isascii():
            raise ValueError(
                f"Argument `metadata`: keys must be identifiers and values ASCII (percent-encode them), given "
                f"{key!r}: {value!r}"
            )
        if key in (SAVE_TOKEN_KEY, CRC_KEY):
            raise ValueError(f"Argument `metadata` cannot set {key!r}: the writer sets it")
        out[key] = value
    return out


def _size(info: ObjectInfo | None) -> int | None:
    return None if info is None else info.size


def _is_url(checkpoint_id: Any) -> bool:
    from ckptcloud.urls import split_url

    if not isinstance(checkpoint_id, str):
        return False
    try:
        split_url(checkpoint_id)
    except ValueError:
        return False
    return True
