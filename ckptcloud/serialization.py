"""The one call site of ``torch.save`` and ``torch.load``, and the integrity trailer they share.

Every checkpoint ckptcloud writes is ``torch.save``'s output followed by a 24-byte trailer: a magic marker, the
length of the ``torch.save`` bytes and their CRC32C, computed while the bytes stream out (about 8 GB/s, no extra
pass or copy: :mod:`ckptcloud.checksum`). ``torch.load`` ignores bytes after the zip archive, so the files stay
ordinary torch checkpoints for any tool. :func:`load` checks the trailer first and refuses a mismatch with
:class:`~ckptcloud.errors.IntegrityError` before anything is unpickled; a file without a trailer (saved by something
else) loads unverified.
"""

from __future__ import annotations

import io
import logging
import mmap
import os
import pickle
import struct
from pathlib import Path
from typing import IO, Any

import torch

from ckptcloud.checksum import crc32c
from ckptcloud.errors import IntegrityError

logger = logging.getLogger("ckptcloud")

TRAILER_MAGIC = b"\x00ckptcloud\x01\x00"
_TRAILER = struct.Struct(">12sQI")  # magic, length of the torch.save bytes, CRC32C of them
TRAILER_SIZE = _TRAILER.size  # 24


def trailer(length: int, crc: int) -> bytes:
    """The integrity trailer for ``length`` bytes whose CRC32C is ``crc``."""
    return _TRAILER.pack(TRAILER_MAGIC, length, crc)


class _ChecksummingWriter(io.RawIOBase):
    """Forwards writes to ``stream`` while counting the bytes and updating their CRC32C."""

    def __init__(self, stream: IO[bytes]) -> None:
        super().__init__()
        self._stream = stream
        self.crc = 0
        self.length = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(data).cast("B")
        written = self._stream.write(view)
        self.crc = crc32c(view, self.crc)
        self.length += len(view)
        return written if written is not None else len(view)


def save(obj: Any, stream: IO[bytes], **torch_save_kwargs: Any) -> int:
    """Serialize ``obj`` into the write-only ``stream``, then append the integrity trailer; returns bytes written.

    ``torch.save`` (zip format) writes front to back and never seeks; each tensor storage arrives as one
    ``write()`` of a memoryview aliasing the tensor, which the stream must not keep.
    """
    writer = _ChecksummingWriter(stream)
    torch.save(obj, writer, **torch_save_kwargs)
    stream.write(trailer(writer.length, writer.crc))
    return writer.length + TRAILER_SIZE


def verify(file: IO[bytes], name: str) -> bool:
    """Check the trailer of a real, seekable ``file``; ``False`` if it has none. Leaves the position at 0.

    Raises:
        IntegrityError: the trailer's length or CRC32C does not match the bytes before it.
    """
    size = os.fstat(file.fileno()).st_size
    if size < TRAILER_SIZE:
        return False
    file.seek(size - TRAILER_SIZE)
    magic, length, expected = _TRAILER.unpack(file.read(TRAILER_SIZE))
    file.seek(0)
    if magic != TRAILER_MAGIC:
        return False
    if length != size - TRAILER_SIZE:
        raise IntegrityError(f"{name} is damaged: {size - TRAILER_SIZE} bytes before its trailer, {length} recorded")
    with mmap.mmap(file.fileno(), size, access=mmap.ACCESS_READ) as mapped, memoryview(mapped) as view:
        actual = crc32c(view[:length])
    if actual != expected:
        raise IntegrityError(
            f"{name} is damaged: CRC32C {actual:08x} does not match the {expected:08x} recorded when it was saved; "
            "it was not loaded"
        )
    return True


def _is_real_file(source: Any) -> bool:
    try:
        source.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return False
    return bool(source.seekable())


def _fd_path(file: IO[bytes]) -> str | None:
    """A path that opens the same file as ``file`` (also when it has no name, like a ``TemporaryFile``)."""
    for folder in ("/proc/self/fd", "/dev/fd"):
        if os.path.isdir(folder):
            return f"{folder}/{file.fileno()}"
    return None


def load(
    source: IO[bytes] | str | os.PathLike,
    *,
    map_location: Any = "cpu",
    weights_only: bool = True,
    name: str | None = None,
    mmap: bool = False,
) -> Any:
    """Verify the integrity trailer (when present), then deserialize with ``torch.load``.

    ``weights_only=True`` (the default) uses torch's safe unpickler; pass ``False`` only for files you trust.
    ``mmap=True`` maps the tensors onto the file (``torch.load(mmap=True)``) instead of copying them into new
    memory: no second copy and no copying time. Pages the caller writes to are copied on write; the file's pages
    stay in the page cache while a tensor maps them. Ignored for the legacy (non-zip) format and non-files.

    Raises:
        IntegrityError: the bytes were changed or truncated since they were saved.
        ValueError: the bytes are not a torch checkpoint, or hold objects ``weights_only`` refuses.
    """
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as file:
            name = name or str(Path(source))
            return load(file, map_location=map_location, weights_only=weights_only, name=name, mmap=mmap)
    name = name or str(getattr(source, "name", "the checkpoint"))
    real_file = _is_real_file(source)
    if not real_file or not verify(source, name):
        logger.debug("%s has no ckptcloud integrity trailer (or is not a file); loading it unverified", name)
    target: IO[bytes] | str = source
    if real_file:
        head = source.read(4)
        source.seek(0)
        if head[:4] != b"PK\x03\x04" and head[:1] != b"\x80":  # zip archive, or the legacy pickle format
            raise ValueError(f"{name} is not a torch checkpoint (it starts with {head!r})")
        if mmap and head[:4] == b"PK\x03\x04":
            target = _fd_path(source) or source
    try:
        return torch.load(target, map_location=map_location, weights_only=weights_only, mmap=target is not source)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err):  # a class weights_only does not allow, not damage
            raise ValueError(
                f"could not load {name} with weights_only=True: it holds objects other than tensors and plain "
                "containers. If you trust its source, pass weights_only=False to load it anyway "
                f"(torch said: {str(err).splitlines()[-1][:300]})"
            ) from err
        raise ValueError(f"{name} is not a torch checkpoint, or is damaged (unpickling failed: {err})") from err
    except (EOFError, KeyError, IndexError) as err:
        raise ValueError(f"{name} is not a torch checkpoint, or is damaged ({type(err).__name__}: {err})") from err
    except RuntimeError as err:
        if "zip archive" in str(err) or "PytorchStreamReader" in str(err):
            raise ValueError(f"{name} is not a torch checkpoint (torch.load failed: {err})") from err
        raise
