"""CRC32C of any buffer without copying it, and with the GIL released.

``google_crc32c.extend`` only accepts ``bytes``, so checksumming a ``memoryview`` of a tensor or a part buffer
used to cost a copy (~0.1 CPU-s/GiB) and held the GIL. Its wheel ships Google's C library, whose public C API
``crc32c_extend(crc, data, count)`` we call through ``ctypes`` on the buffer's own memory (ctypes releases the
GIL, so part checksums in worker threads run in parallel). Where that library cannot be found, the same values
come from ``google_crc32c.extend`` on 4 MiB copies.

Example:
    >>> crc32c(b"123456789") == 0xE3069283
    True
    >>> crc32c(memoryview(b"456789"), crc32c(b"123")) == 0xE3069283
    True
    >>> crc32c_base64(b"123456789")
    '4waSgw=='
"""

from __future__ import annotations

import base64
import ctypes
import ctypes.util
from collections.abc import Callable
from pathlib import Path

import google_crc32c

_COPY_CHUNK = 4 * 1024 * 1024


class _PyBuffer(ctypes.Structure):
    """CPython's ``Py_buffer`` (part of the stable buffer protocol)."""

    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


def _find_library() -> ctypes.CDLL | None:
    package = Path(google_crc32c.__file__).parent
    candidates = [
        *sorted(package.parent.glob("google_crc32c.libs/libcrc32c*")),  # Linux wheels (auditwheel)
        *sorted(package.glob(".dylibs/libcrc32c*")),  # macOS wheels (delocate)
        *sorted(package.glob("libcrc32c*")),
    ]
    system = ctypes.util.find_library("crc32c")
    if system:
        candidates.append(Path(system))
    for candidate in candidates:
        try:
            lib = ctypes.CDLL(str(candidate))
            extend = lib.crc32c_extend
        except (OSError, AttributeError):
            continue
        extend.argtypes = [ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t]
        extend.restype = ctypes.c_uint32
        return lib
    return None


_LIB = _find_library()
_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_get_buffer.restype = ctypes.c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]
_release_buffer.restype = None


def _crc32c_zero_copy(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    view = memoryview(data)
    if not view.contiguous:
        raise ValueError("crc32c needs a contiguous buffer")
    buffer = _PyBuffer()
    _get_buffer(view, ctypes.byref(buffer), 0)  # PyBUF_SIMPLE: raises (via ctypes) if not possible
    try:
        return int(_LIB.crc32c_extend(crc, buffer.buf, buffer.len))  # type: ignore[union-attr]
    finally:
        _release_buffer(ctypes.byref(buffer))


def _crc32c_copying(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    view = memoryview(data).cast("B")
    for start in range(0, len(view), _COPY_CHUNK):
        crc = google_crc32c.extend(crc, view[start : start + _COPY_CHUNK].tobytes())
    return crc


crc32c: Callable[..., int] = _crc32c_zero_copy if _LIB is not None else _crc32c_copying
"""``crc32c(data, crc=0)``: CRC32C of the bytes of ``data`` (any contiguous buffer), extending ``crc``."""

ZERO_COPY = _LIB is not None
"""Whether :func:`crc32c` reads buffers in place (True on the google-crc32c wheels for Linux and macOS)."""


def crc32c_base64(data: bytes | bytearray | memoryview) -> str:
    """The CRC32C of ``data`` as S3's ``x-amz-checksum-crc32c`` header wants it: 4 big-endian bytes, base64."""
    return base64.b64encode(crc32c(data).to_bytes(4, "big")).decode("ascii")
