"""CRC32C of any buffer, read in place, with the GIL released: the ``crc32c`` package, or a slow fallback.

Fast path: ``crc32c.crc32c(data, value)`` from the ``crc32c`` package (ICRAR, LGPL-2.1-or-later, wheels for Linux,
macOS and Windows on x86-64 and ARM64). It takes any C-contiguous buffer (``y*``: bytes, bytearray, a memoryview of a
tensor) without copying it, releases the GIL for buffers of 32 KiB or more, and uses the CPU's CRC32C instruction
(SSE 4.2 on x86-64, ARMv8 CRC) or, without one, its C slice-by-8 code. Its wheels are C extensions only: where
``crc32c`` installs at all, the C code is there.

Measured on a development machine (Xeon with SSE 4.2, 2 cores shared with other jobs, CPython 3.11), best of 3, one
call per 256 MiB buffer (random bytes), two ``threading.Thread`` for the 2-thread runs; aggregate MiB/s::

    implementation                                  bytearray 1 thr / 2 thr   tensor memoryview 1 thr / 2 thr
    crc32c 2.9 (SSE 4.2)                            11206 / 22219             11661 / 22060
    crc32c 2.9, software (CRC32C_SW_MODE=force)      1630 /  1895              1654 /  1942
    google-crc32c's libcrc32c via ctypes (before)    6023 / 10268              6281 / 10615
    google_crc32c.value (bytes only; holds the GIL)  5557 /  4754              1220 /   787 (bytes(view) first)
    pure Python (the fallback below), 4 MiB            11 (google-crc32c's pure-Python fallback: 8)

The package is about twice as fast as the ctypes call into google-crc32c's private library that it replaces, and
two threads checksum twice as fast as one (S3 part checksums run in the upload threads). Its software mode,
1.6 GiB/s, outruns most networks and disks, so it is used without a warning.

Slow fallback: when ``crc32c`` cannot be imported (installed with ``--no-deps``, a failed build) or refuses to run
(``CRC32C_SW_MODE=none`` on a CPU without the instruction), :func:`crc32c` computes the same values in pure Python
at about 10 MiB/s, holding the GIL: 100 s per GiB, per save and again per load. ckptcloud then warns once
(:func:`warn_if_slow`: a ``RuntimeWarning`` with the cause and ``pip install 'crc32c>=2.7'``), and
:mod:`ckptcloud.serialization` stops computing whole-checkpoint checksums: saves write no trailer (those files load
as "not verifiable", like files saved by other tools) and loads check only the trailer's recorded length, which
still catches truncation. A save that stalls training (and, holding the GIL, every other thread) for minutes is
worse than a checkpoint without a checksum. An explicit :func:`ckptcloud.serialization.verify` (``ckptcloud verify``)
still computes it, slowly.

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
import logging
import os
import threading
import warnings
from collections.abc import Callable
from types import ModuleType

logger = logging.getLogger("ckptcloud")

PYTHON_MIB_PER_S = 10.0
"""The order of the pure-Python fallback's speed (measured 11 MiB/s on CPython 3.11 here), for the warning."""

_CHUNK = 1024 * 1024


def _import_fast() -> tuple[ModuleType | None, str]:
    """The ``crc32c`` module if it imports and computes; else ``None`` and why not."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # CRC32C_SW_MODE=none without hardware warns here
            import crc32c as module
        if module.crc32c(b"123456789") != 0xE3069283:
            return None, "the crc32c package gives wrong values on this machine"
    except (ImportError, RuntimeError) as err:  # RuntimeError: software mode disabled and no hardware support
        return None, f"{type(err).__name__}: {err}".strip()
    return module, ""


_FAST, _WHY_SLOW = _import_fast()

IMPLEMENTATION = "python" if _FAST is None else ("hardware" if _FAST.hardware_based else "software")
"""``"hardware"`` (the CPU's CRC32C instruction), ``"software"`` (C slice-by-8) or ``"python"`` (the slow fallback)."""

FAST = _FAST is not None
"""Whether :func:`crc32c` is the C implementation (1.6 to 11+ GiB/s); ``False`` means the pure-Python fallback."""

ZERO_COPY = FAST
"""Whether :func:`crc32c` reads buffers in place (the fallback reads 1 MiB copies)."""

_warned = threading.Event()


def warn_if_slow() -> bool:
    """Warn once (``RuntimeWarning``) if only the pure-Python fallback is available; returns whether it is slow."""
    if FAST:
        return False
    if not _warned.is_set():
        _warned.set()
        seconds = 1024 / PYTHON_MIB_PER_S
        if os.environ.get("CRC32C_SW_MODE") == "none":
            remedy = "Unset CRC32C_SW_MODE=none: it turns off crc32c's C software mode (about 1.6 GiB/s)"
        else:
            remedy = "Install it: pip install 'crc32c>=2.7'"
        warnings.warn(
            f"ckptcloud: no fast CRC32C implementation is available ({_WHY_SLOW}), so CRC32C runs in pure Python at "
            f"about {PYTHON_MIB_PER_S:.0f} MiB/s ({seconds:.0f} seconds per GiB). Until that is fixed, saves write no "
            "integrity trailer (those checkpoints load as 'not verifiable'), loads check only the trailer's length, "
            f"not its CRC32C, and S3 part checksums are slow. {remedy}",
            RuntimeWarning,
            stacklevel=3,
        )
    return True


def _crc32c_fast(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    try:
        return int(_FAST.crc32c(data, crc))  # type: ignore[union-attr]
    except BufferError as err:  # "y*" asks for a C-contiguous buffer
        raise ValueError(f"crc32c needs a contiguous buffer, but given {data!r}: {err}") from err


_TABLE: list[int] = []


def _table() -> list[int]:
    if not _TABLE:
        for byte in range(256):
            crc = byte
            for _ in range(8):
                crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
            _TABLE.append(crc)
    return _TABLE


def _crc32c_python(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """The same values as the ``crc32c`` package, byte by byte in Python (about 10 MiB/s)."""
    view = memoryview(data)
    if not view.contiguous:
        raise ValueError(f"crc32c needs a contiguous buffer, but given {data!r}")
    view = view.cast("B")
    table = _table()
    crc ^= 0xFFFFFFFF
    for start in range(0, len(view), _CHUNK):
        for byte in view[start : start + _CHUNK].tobytes():
            crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _crc32c_slow(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    warn_if_slow()
    return _crc32c_python(data, crc)


crc32c: Callable[..., int] = _crc32c_fast if FAST else _crc32c_slow
"""``crc32c(data, crc=0)``: CRC32C of the bytes of ``data`` (any contiguous buffer), extending ``crc``."""

if FAST:
    logger.debug("CRC32C: the crc32c package (%s)", IMPLEMENTATION)


def crc32c_base64(data: bytes | bytearray | memoryview) -> str:
    """The CRC32C of ``data`` as S3's ``x-amz-checksum-crc32c`` header wants it: 4 big-endian bytes, base64."""
    return base64.b64encode(crc32c(data).to_bytes(4, "big")).decode("ascii")


# ------------------------------------------------------------------------------------------ combining CRCs
_POLY = 0x82F63B78  # CRC32C's polynomial, bit-reflected


def _multiply_mod_p(a: int, b: int) -> int:
    """``a(x) * b(x)`` modulo CRC32C's polynomial, both reflected (zlib's ``multmodp``)."""
    m = 1 << 31
    product = 0
    while True:
        if a & m:
            product ^= b
            if not a & (m - 1):
                return product
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1


def _powers() -> list[int]:
    table = [1 << 30]  # x^1
    for _ in range(31):
        table.append(_multiply_mod_p(table[-1], table[-1]))  # x^(2^n)
    return table


_X_2N = _powers()


def crc32c_combine(crc1: int, crc2: int, length2: int) -> int:
    """The CRC32C of ``a + b`` from ``crc1 = crc32c(a)``, ``crc2 = crc32c(b)`` and ``length2 = len(b)``, without the
    bytes (zlib's ``crc32_combine`` for CRC32C): a few dozen integer operations, whatever the lengths.

    Example:
        >>> crc32c_combine(crc32c(b"1234"), crc32c(b"56789"), 5) == crc32c(b"123456789")
        True
    """
    power = 1 << 31  # x^0
    k = 3  # x^(8 * length2): one byte is 8 bits
    n = length2
    while n:
        if n & 1:
            power = _multiply_mod_p(_X_2N[k & 31], power)
        n >>= 1
        k += 1
    return _multiply_mod_p(power, crc1) ^ crc2
