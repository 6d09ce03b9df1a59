"""The one call site of ``torch.save`` and ``torch.load``, and the integrity trailer they share.

Every checkpoint ckptcloud writes is ``torch.save``'s output followed by a 24-byte trailer: a magic marker, the
length of the ``torch.save`` bytes and their CRC32C, computed while the bytes stream out (about 11 GB/s, no extra
pass or copy: :mod:`ckptcloud.checksum`). ``torch.load`` ignores bytes after the zip archive, so the files stay
ordinary torch checkpoints for any tool. :func:`load` checks the trailer first and refuses a mismatch with
:class:`~ckptcloud.errors.IntegrityError` before anything is unpickled; a file without a trailer (saved by something
else) loads unverified. Where only the slow pure-Python CRC32C is available, saves write no trailer and loads check
only its length (see :mod:`ckptcloud.checksum`).

A file that ``weights_only=True`` refuses is reported as refused, never as damaged: with the class torch named and
torch's safe fix (``torch.serialization.add_safe_globals``) for ordinary classes, and as possibly malicious when it
references a function that can run code (``os.system``, ``eval``, ...). Nothing in such a file is run.
"""

from __future__ import annotations

import io
import logging
import mmap
import os
import pickle
import re
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from ckptcloud import checksum
from ckptcloud.checksum import crc32c
from ckptcloud.errors import IntegrityError

logger = logging.getLogger("ckptcloud")

TRAILER_MAGIC = b"\x00ckptcloud\x01\x00"
_TRAILER = struct.Struct(">12sQI")  # magic, length of the torch.save bytes, CRC32C of them
TRAILER_SIZE = _TRAILER.size  # 24


def trailer(length: int, crc: int) -> bytes:
    """The integrity trailer for ``length`` bytes whose CRC32C is ``crc``."""
    return _TRAILER.pack(TRAILER_MAGIC, length, crc)


class _ZipCrc32Off:
    """Turns off ``torch.save``'s per-record zip CRC32 for ckptcloud's saves only, as briefly as possible.

    ``torch.save`` computes a CRC32 of every record (zlib's software slice-by-16, holding the GIL): 0.65 CPU-s per
    GiB measured here, the whole cost of ``torch.save`` into a stream that discards (0.00 s without it). ckptcloud
    already checksums every byte it writes with CRC32C (hardware, ~11 GB/s, in place) into its trailer, which
    :func:`load` verifies; ``torch.load`` never checks zip CRCs. The option is a process-wide setting
    (``torch.serialization.set_crc32_options``) that torch reads once, when the zip writer is made, before the first
    write: :func:`save` turns it off on entry and restores it at the stream's first write (or when ``torch.save``
    fails), so another thread's ``torch.save`` is affected only if it starts within that window (the pickling of a
    state dict's structure, milliseconds); such a file still loads with ``torch.load``, only its zip CRCs read 0.
    Overlapping ckptcloud saves keep a count, so the user's setting is restored by the last one.

    Files saved this way are ordinary ``torch.load`` checkpoints; zip tools (``unzip -t``, Python's ``zipfile``
    reading a record) report CRC mismatches on them. :data:`TORCH_ZIP_CRC32` ``= True`` keeps torch's CRCs.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active = 0
        self._saved = True

    def enter(self) -> bool:
        """Turn the CRCs off (unless :data:`TORCH_ZIP_CRC32` or torch has no such option); whether it did."""
        if TORCH_ZIP_CRC32 or not hasattr(torch.serialization, "set_crc32_options"):
            return False
        with self._lock:
            if self._active == 0:
                self._saved = torch.serialization.get_crc32_options()
                torch.serialization.set_crc32_options(False)
            self._active += 1
        return True

    def exit(self) -> None:
        with self._lock:
            self._active -= 1
            if self._active == 0:
                torch.serialization.set_crc32_options(self._saved)


TORCH_ZIP_CRC32 = False
"""Whether ckptcloud's saves keep ``torch.save``'s per-record zip CRC32 (see :class:`_ZipCrc32Off`): ``False``, since
the CRC32C trailer covers every byte and is what loads verify."""

_zip_crc32 = _ZipCrc32Off()


class _ChecksummingWriter(io.RawIOBase):
    """Forwards writes to ``stream`` while counting the bytes and (if ``checksum``) updating their CRC32C.

    The first exception a write raises is kept in :attr:`failure`: ``torch.save`` replaces it with its own
    ``RuntimeError`` ("unexpected pos ..."), and :func:`save` raises the real one instead.
    """

    def __init__(self, stream: IO[bytes], *, checksum: bool = True) -> None:
        super().__init__()
        self._stream = stream
        self._checksum = checksum
        self.crc = 0
        self.length = 0
        self.failure: BaseException | None = None
        self.on_first_write: Callable[[], None] | None = None

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        if self.on_first_write is not None:
            self.on_first_write, first = None, self.on_first_write
            first()
        try:
            view = memoryview(data).cast("B")
            written = self._stream.write(view)
            if self._checksum:
                self.crc = crc32c(view, self.crc)
        except BaseException as err:
            if self.failure is None:
                self.failure = err
            raise
        self.length += len(view)
        return written if written is not None else len(view)


def save(obj: Any, stream: IO[bytes], **torch_save_kwargs: Any) -> int:
    """Serialize ``obj`` into the write-only ``stream``, then append the integrity trailer; returns bytes written.

    ``torch.save`` (zip format) writes front to back and never seeks; each tensor storage arrives as one
    ``write()`` of a memoryview aliasing the tensor, which the stream must not keep. An exception raised by the
    stream's ``write`` (a full disk, a failed upload) is raised as itself, not as torch's "unexpected pos ..."
    ``RuntimeError``. Without a fast CRC32C (:data:`ckptcloud.checksum.FAST`), no trailer is written (warned once).
    """
    with_trailer = not checksum.warn_if_slow()
    writer = _ChecksummingWriter(stream, checksum=with_trailer)
    crc_off = with_trailer and _zip_crc32.enter()  # only when the trailer's CRC32C covers the bytes
    if crc_off:
        writer.on_first_write = _zip_crc32.exit
    try:
        torch.save(obj, writer, **torch_save_kwargs)
    except BaseException as err:
        cause = writer.failure
        if cause is None or cause is err or not isinstance(err, Exception):
            raise
        raise cause from None  # torch.save masks exceptions raised inside write()
    finally:
        if writer.on_first_write is not None:  # ended before its first write: restore the option here
            writer.on_first_write = None
            _zip_crc32.exit()
    if not with_trailer:
        return writer.length
    stream.write(trailer(writer.length, writer.crc))
    return writer.length + TRAILER_SIZE


def verify(file: IO[bytes], name: str) -> bool:
    """Check the trailer of a real, seekable ``file``; ``False`` if it has none. Leaves the position at 0.

    Always computes the CRC32C, even with the slow pure-Python implementation (which warns once).

    Raises:
        IntegrityError: the trailer's length or CRC32C does not match the bytes before it.
    """
    return _check_trailer(file, name, crc=True)


def _check_trailer(file: IO[bytes], name: str, *, crc: bool) -> bool:
    """:func:`verify`, which with ``crc=False`` checks only the recorded length (for the slow implementation)."""
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
    if not crc:
        checksum.warn_if_slow()
        logger.info("%s: checked the length its trailer records, not its CRC32C (no fast CRC32C here)", name)
        return True
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
    """A path that opens the same file as ``file`` (also when it has no name, like a ``TemporaryFile``).

    Linux: ``/proc/self/fd/N``, a new open file with its own offset. macOS: ``/dev/fd/N``, which opens like
    ``dup(N)``: the new file shares ``file``'s offset. torch's zip reader takes the offset it finds at open as the
    archive's start (and seeks from there before every read), so :func:`load` rewinds ``file`` first
    (:func:`_rewind`). Windows has neither (and ckptcloud refuses to run there).
    """
    for folder in ("/proc/self/fd", "/dev/fd"):
        if os.path.isdir(folder):
            return f"{folder}/{file.fileno()}"
    return None


def _rewind(file: IO[bytes]) -> None:
    """Put ``file``'s OS-level offset at 0, and drop its read buffer.

    A buffered ``seek(0)`` that lands inside the buffer only moves the buffer's pointer, leaving the descriptor's
    offset where the last read left it; a file that shares the descriptor's offset (``/dev/fd/N`` on macOS) would
    start there. Seeking to the end first always reaches the descriptor, and empties the buffer.
    """
    file.seek(0, os.SEEK_END)
    file.seek(0)


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
        ValueError: the bytes are not a torch checkpoint (or are damaged), or hold objects ``weights_only`` refuses
            (the message says which: a class to allowlist, or a reference to code, "the file may be malicious").
    """
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as file:
            name = name or str(Path(source))
            return load(file, map_location=map_location, weights_only=weights_only, name=name, mmap=mmap)
    name = name or str(getattr(source, "name", "the checkpoint"))
    real_file = _is_real_file(source)
    if not real_file or not _check_trailer(source, name, crc=checksum.FAST):
        logger.debug("%s has no ckptcloud integrity trailer (or is not a file); loading it unverified", name)
    target: IO[bytes] | str = source
    if real_file:
        head = source.read(4)
        source.seek(0)
        if head[:4] != b"PK\x03\x04" and head[:1] != b"\x80":  # zip archive, or the legacy pickle format
            raise ValueError(f"{name} is not a torch checkpoint (it starts with {head!r})")
        if mmap and head[:4] == b"PK\x03\x04":
            target = _fd_path(source) or source
    if target is not source:
        _rewind(source)  # a /dev/fd/N path (macOS) shares its offset: torch must find it at 0
    try:
        return torch.load(target, map_location=map_location, weights_only=weights_only, mmap=target is not source)
    except pickle.UnpicklingError as err:
        refusal = _weights_only_refusal(str(err), name) if weights_only else None
        if refusal is not None:  # refused, not damaged
            raise refusal from err
        reason = _torch_detail(str(err)) if _WEIGHTS_ONLY in str(err) else str(err)
        raise ValueError(f"{name} is not a torch checkpoint, or is damaged (unpickling failed: {reason})") from err
    except (EOFError, KeyError, IndexError, UnicodeDecodeError) as err:
        raise ValueError(f"{name} is not a torch checkpoint, or is damaged ({type(err).__name__}: {err})") from err
    except RuntimeError as err:
        if "zip archive" in str(err) or "PytorchStreamReader" in str(err):
            raise ValueError(f"{name} is not a torch checkpoint (torch.load failed: {err})") from err
        raise
    finally:
        if target is not source:
            _rewind(source)  # the shared offset moved under source's buffer


_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+) was not an allowed global by default\.[^\n]*")
_BLOCKED_GLOBAL = re.compile(r"Trying to load unsupported GLOBAL (\S+) whose module (\S+) is blocked\.")
_WEIGHTS_ONLY = "Weights only load failed"
_LAST_RESORT = "If you trust its source, pass weights_only=False to load it anyway: that can run code the file holds"

_RUNS_CODE_BUILTINS = frozenset(
    "eval exec compile __import__ getattr setattr delattr open breakpoint input globals locals vars".split()
)
"""Builtins (torch names them without ``builtins.``) that let a pickle run or reach arbitrary code."""

_RUNS_CODE_MODULES = frozenset(
    "os posix nt sys subprocess shutil importlib runpy pty socket ctypes pickle _pickle marshal code codeop "
    "webbrowser multiprocessing".split()
)
"""Modules whose functions a checkpoint has no reason to reference (torch blocks the first four outright)."""

_RUNS_CODE_GLOBALS = frozenset(["operator.attrgetter", "operator.methodcaller", "types.FunctionType", "types.CodeType"])


def _runs_code(qualified: str) -> bool:
    """Whether ``qualified`` (a pickle GLOBAL as torch prints it: builtins without ``builtins.``) can run code."""
    if "." not in qualified:
        return qualified in _RUNS_CODE_BUILTINS
    return qualified in _RUNS_CODE_GLOBALS or qualified.split(".", 1)[0] in _RUNS_CODE_MODULES


def _weights_only_refusal(message: str, name: str) -> ValueError | None:
    """The error for a ``weights_only=True`` refusal that torch reported as ``message``; ``None`` if it is not one
    (a pickle it cannot parse, "Unsupported operand ...": damage).

    torch's own text puts the unsafe remedy first and the class name and safe fix in the middle; this keeps torch's
    line that names the global, and orders the remedies from safe to unsafe.
    """
    blocked = _BLOCKED_GLOBAL.search(message)
    unsupported = _UNSUPPORTED_GLOBAL.search(message)
    found = blocked or unsupported
    qualified = found.group(1) if found is not None else ""
    if found is not None and (blocked or _runs_code(qualified)):
        how = "which weights_only=True blocks" if blocked else "a function that can run arbitrary code"
        return ValueError(
            f"refused to load {name}: it references {qualified}, {how}; the file may be malicious. Nothing in it "
            "was run. Do not allowlist it, and do not load it with weights_only=False unless you know why it "
            f"references {qualified} (torch said: {_first_sentence(found.group(0))})"
        )
    if unsupported is not None:
        return ValueError(
            f"could not load {name} with weights_only=True: it references {qualified}, which weights_only does "
            f"not allow by default. torch said: {unsupported.group(0)} {_LAST_RESORT}"
        )
    if _WEIGHTS_ONLY not in message:
        return None
    detail = _torch_detail(message)
    if "add_safe_globals" in detail or "must be imported" in detail:  # a type it will not build, a missing import
        return ValueError(f"could not load {name} with weights_only=True: torch said: {detail} {_LAST_RESORT}")
    return None  # a pickle that weights_only cannot even parse: damaged, or not a checkpoint


def _first_sentence(text: str) -> str:
    """Up to the first ". " (torch's refusal without its allowlisting advice, for globals that must not be allowed)."""
    return text.split(". ", 1)[0].rstrip(".") + "."


def _torch_detail(message: str) -> str:
    """torch's own reason from a "Weights only load failed" message, without its boilerplate."""
    boilerplate = ("Weights only load failed", "(1)", "(2)", "Check the documentation", "Please file an issue")
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(boilerplate)]
    detail = useful[0] if useful else (lines[-1] if lines else message)
    return detail.removeprefix("WeightsUnpickler error: ")[:300]
