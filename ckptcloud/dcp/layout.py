"""What a sharded checkpoint folder holds, by name, and how its ``.metadata`` is encoded and decoded.

A checkpoint is a folder (a key prefix) with:

* one data file per rank, ``__<rank>_<save token>.distcp``: each item (a tensor chunk, or bytes) is what
  ``torch.save`` writes for it, back to back, as DCP's own ``FileSystemWriter`` lays them out. The save token is
  new for every save, so two saves never write the same file, and a save that loses the race for ``.metadata``
  can delete its own files without touching the winner's;
* ``.metadata``: DCP's pickled ``Metadata``, written last, and only if no ``.metadata`` exists yet. **Its presence
  is what makes the folder a checkpoint.** Its ``storage_data`` maps each item to an :class:`ItemLocation`: file,
  offset, length and the CRC32C of the item's bytes, plus the size and CRC32C of the whole file.

The attribute names of :class:`ItemLocation` are those of DCP's ``_StorageInfo``, so torch's own
``FileSystemReader`` reads a ``file://`` checkpoint written here (with ckptcloud importable).

Example:
    >>> data_file_name(3, "5f0c")
    '__3_5f0c.distcp'
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata

from ckptcloud.errors import CkptcloudError

METADATA = ".metadata"
"""The commit marker and index of a checkpoint: the last object a save writes."""

DATA_SUFFIX = ".distcp"

SAVE_TOKEN_KEY = "ckptcloud_dcp_save"
"""User metadata of ``.metadata`` (object stores): the save that wrote it, so a retried create recognizes its own."""

CRC_KEY = "ckptcloud_crc32c"
"""User metadata of ``.metadata`` (object stores): the CRC32C of its bytes, checked when it is read."""

DCP_FORMAT_VERSION = "1.0.0"
"""``Metadata.version`` as torch 2.13's ``FileSystemWriter`` writes it."""


class CheckpointExistsError(CkptcloudError, FileExistsError):
    """A sharded checkpoint is already committed under this id; nothing was replaced.

    Checkpoint ids are written once: two jobs cannot both commit one. Save under a new id, or delete the old one.
    """


def data_file_name(rank: int, token: str) -> str:
    """The name of rank ``rank``'s data file in the save ``token``."""
    return f"__{rank}_{token}{DATA_SUFFIX}"


@dataclass(frozen=True)
class RankFiles:
    """What the coordinator tells each rank before it writes (``SavePlan.storage_data``)."""

    token: str
    rank: int
    world: int


@dataclass
class ItemLocation:
    """Where one item of a checkpoint is stored, and its checksums (``Metadata.storage_data`` values).

    ``crc32c`` covers the item's ``length`` bytes at ``offset``; ``file_size`` and ``file_crc32c`` cover its whole
    file. Checksums are ``None`` where only the slow pure-Python CRC32C was available at save time.

    Example:
        >>> ItemLocation("__0_ab.distcp", offset=0, length=10, crc32c=1, file_size=10, file_crc32c=1).relative_path
        '__0_ab.distcp'
    """

    relative_path: str
    offset: int
    length: int
    crc32c: int | None
    file_size: int
    file_crc32c: int | None
    transform_descriptors: list[str] | None = None


@dataclass(frozen=True)
class FileRecord:
    """One data file of a checkpoint: its name in the folder, size and CRC32C (``None``: not recorded)."""

    name: str
    size: int
    crc32c: int | None


def files_of(metadata: Metadata) -> dict[str, FileRecord]:
    """Every data file a checkpoint's metadata refers to, by name.

    Checkpoints written by other DCP writers (``FileSystemWriter``, s3torchconnector) record no sizes nor
    checksums: their size is where their last item ends, their CRC32C ``None``.
    """
    files: dict[str, FileRecord] = {}
    for location in (metadata.storage_data or {}).values():
        name = location.relative_path
        if isinstance(location, ItemLocation):
            files[name] = FileRecord(name, location.file_size, location.file_crc32c)
        else:
            end = location.offset + location.length
            known = files.get(name)
            files[name] = FileRecord(name, max(end, known.size if known else 0), None)
    return dict(sorted(files.items()))


# ---------------------------------------------------------------------------------------------- .metadata
def dump_metadata(metadata: Metadata) -> bytes:
    """The bytes of ``.metadata``: ``pickle`` of DCP's ``Metadata``, as DCP's own writers store it."""
    return pickle.dumps(metadata, protocol=pickle.HIGHEST_PROTOCOL)


_METADATA_MODULES = frozenset({"torch.distributed.checkpoint.metadata"})
_ALLOWED_GLOBALS = frozenset(
    {
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("ckptcloud.dcp.layout", "ItemLocation"),
        ("collections", "OrderedDict"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib", "PureWindowsPath"),
    }
)


class _RefusedGlobal(pickle.UnpicklingError):
    """A global outside what DCP metadata is made of."""


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata only: its dataclasses, torch dtypes and sizes, paths; any other global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if module in _METADATA_MODULES or (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise _RefusedGlobal(f"{module}.{name}")


def load_metadata(data: bytes | memoryview, url: str, *, trusted: bool = False) -> Metadata:
    """Decode ``.metadata`` read from ``url``.

    Only the classes DCP metadata is made of are rebuilt (its dataclasses, torch dtypes and sizes, paths), so
    loading a checkpoint never runs code it carries. ``trusted=True`` unpickles anything (a custom planner's
    ``planner_data`` may need it): only for checkpoints you trust.

    Raises:
        ValueError: not DCP metadata, damaged, or (without ``trusted``) a reference to another class.
    """
    try:
        loaded = pickle.loads(data) if trusted else _MetadataUnpickler(io.BytesIO(data)).load()
    except _RefusedGlobal as err:
        raise ValueError(
            f"refused to load {url}: it references {err}, which DCP metadata is not made of; nothing in it was "
            "run. If you trust this checkpoint (a custom planner may store its own classes), pass "
            "trust_metadata=True"
        ) from err
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError, ValueError) as err:
        raise ValueError(f"{url} is not DCP metadata, or is damaged ({type(err).__name__}: {err})") from err
    if not isinstance(loaded, Metadata):
        raise ValueError(f"{url} is not DCP metadata (it holds a {type(loaded).__name__})")
    return loaded
