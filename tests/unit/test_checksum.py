"""CRC32C: the right values on every buffer the pipeline hands it, read in place, with the GIL released; and a slow
implementation never runs silently."""

from __future__ import annotations

import array
import base64
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc

import pytest
import torch

from ckptcloud import checksum

MiB = 1024 * 1024

# RFC 3720 (iSCSI) appendix B.4, and the usual check value
KNOWN_VECTORS = [
    (b"123456789", 0xE3069283),
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
    (b"", 0),
]


def reference(data: bytes, crc: int = 0) -> int:
    """The pure-Python implementation, itself checked against the known vectors below."""
    return checksum._crc32c_python(data, crc)


@pytest.mark.parametrize(("data", "expected"), KNOWN_VECTORS)
def test_known_vectors(data, expected):
    assert checksum.crc32c(data) == expected
    assert checksum.crc32c(memoryview(bytearray(data))) == expected


@pytest.mark.parametrize(("data", "expected"), KNOWN_VECTORS)
def test_the_pure_python_fallback_gives_the_known_vectors_too(data, expected):
    assert checksum._crc32c_python(data) == expected
    assert checksum._crc32c_python(data[5:], checksum._crc32c_python(data[:5])) == expected


@pytest.mark.parametrize("size", [0, 1, 7, 4096, 1024 * 1024 + 3])
def test_values_match_for_bytes_bytearray_and_views(size):
    data = os.urandom(size)
    expected = reference(data)
    assert checksum.crc32c(data) == expected
    assert checksum.crc32c(bytearray(data)) == expected
    assert checksum.crc32c(memoryview(data)) == expected  # read-only view
    assert checksum.crc32c(memoryview(bytearray(data))) == expected


def test_slices_and_extension_chain_like_one_pass():
    data = bytearray(os.urandom(3 * MiB))
    view = memoryview(data)
    crc = 0
    for start in range(0, len(data), 1_000_003):  # uneven pieces of one buffer, no copies
        crc = checksum.crc32c(view[start : start + 1_000_003], crc)
    assert crc == checksum.crc32c(bytes(data))
    assert checksum.crc32c(view[5:17]) == reference(bytes(data[5:17]))
    assert checksum.crc32c(view[10:], 123) == reference(bytes(data[10:12345]) + bytes(data[12345:]), 123)


def test_multi_byte_items_are_checksummed_as_their_bytes():
    floats = array.array("f", torch.randn(1000).tolist())
    view = memoryview(floats)  # float32 items, format "f"
    assert view.format == "f" and view.itemsize == 4
    assert checksum.crc32c(view) == reference(floats.tobytes())
    ints = array.array("q", range(100))
    assert checksum.crc32c(ints) == reference(ints.tobytes())


def test_a_non_contiguous_buffer_is_refused_not_misread():
    strided = memoryview(bytearray(range(100)))[::2]
    with pytest.raises(ValueError, match="contiguous"):
        checksum.crc32c(strided)
    with pytest.raises(ValueError, match="contiguous"):
        checksum._crc32c_python(strided)


def test_the_fast_crc32c_package_is_in_use_here():
    # the crc32c package's wheels are C only; if this fails, every save skips its trailer (see the module docstring)
    assert checksum.FAST and checksum.ZERO_COPY
    assert checksum.IMPLEMENTATION in ("hardware", "software")
    assert checksum.crc32c is checksum._crc32c_fast


def _tensor_view(tensor: torch.Tensor) -> memoryview:
    """A memoryview of a tensor's memory, as torch.save hands it to the stream."""
    import ctypes

    storage = tensor.untyped_storage()
    return memoryview((ctypes.c_char * storage.nbytes()).from_address(storage.data_ptr())).cast("B")


def test_checksumming_copies_nothing_proportional_to_the_buffer():
    data = bytearray(64 * MiB)
    tensor = torch.ones(16 * MiB)  # 64 MiB
    tensor_view = _tensor_view(tensor)
    checksum.crc32c(b"warm up")
    tracemalloc.start()
    try:
        checksum.crc32c(data)
        checksum.crc32c(memoryview(data)[1:])
        checksum.crc32c(tensor_view)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024, f"{peak} bytes allocated to checksum 192 MiB: a copy"


def test_other_threads_run_during_one_large_checksum():
    """The GIL is released: a Python thread makes progress while one call checksums 256 MiB."""
    data = bytearray(os.urandom(MiB)) * 256
    for _attempt in range(5):  # a loaded machine may not schedule the other thread; the GIL never lets it
        ticks: list[float] = []
        stop = threading.Event()

        def count(ticks: list[float] = ticks, stop: threading.Event = stop) -> None:
            while not stop.is_set():
                ticks.append(time.perf_counter())

        thread = threading.Thread(target=count)
        thread.start()
        time.sleep(0.01)
        start = time.perf_counter()
        checksum.crc32c(data)
        end = time.perf_counter()
        stop.set()
        thread.join()
        margin = (end - start) / 4
        during = [t for t in ticks if start + margin < t < end - margin]
        if len(during) > 10:
            return
    pytest.fail(f"no other thread ran during a {end - start:.3f} s checksum: the GIL is held")


def test_base64_is_the_big_endian_form_s3_expects():
    data = b"checkpoint"
    assert base64.b64decode(checksum.crc32c_base64(data)) == reference(data).to_bytes(4, "big")


SLOW_SCRIPT = textwrap.dedent(
    """
    import json, sys, tempfile, warnings
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        import torch
        from ckptcloud import DiskSaver, checksum, serialization
        from ckptcloud.errors import IntegrityError
        folder = tempfile.mkdtemp()
        saver = DiskSaver(folder)
        saver({"w": torch.arange(1000.0)}, "a.pt")
        saver({"w": torch.arange(10.0)}, "b.pt")
        loaded = saver.load("a.pt")["w"].tolist() == torch.arange(1000.0).tolist()
        with open(folder + "/a.pt", "rb") as file:
            tail = file.read()[-serialization.TRAILER_SIZE:]
        # a file with a trailer whose recorded length is wrong: still refused (only the CRC is skipped)
        body = open(folder + "/b.pt", "rb").read()
        open(folder + "/c.pt", "wb").write(body + serialization.trailer(len(body) + 1, 0))
        try:
            saver.load("c.pt")
            refused = False
        except IntegrityError:
            refused = True
    ours = [str(w.message) for w in caught if "ckptcloud: no fast CRC32C" in str(w.message)]
    impl = getattr(checksum, "IMPLEMENTATION", None)
    print(json.dumps({"impl": impl, "warnings": ours, "loaded": loaded, "refused": refused,
                      "trailer": tail.startswith(serialization.TRAILER_MAGIC)}))
    """
)


@pytest.mark.parametrize("how", ["not installed", "software mode disabled"])
def test_without_a_fast_crc32c_saves_warn_once_and_skip_the_trailer(how):
    env = dict(os.environ)
    code = SLOW_SCRIPT
    if how == "not installed":
        code = "import sys; sys.modules['crc32c'] = None\n" + code  # import crc32c raises ImportError
    else:
        env.update(CRC32C_SW_MODE="none", CRC32C_SKIP_HW_PROBE="1")  # crc32c's own switches: no hardware, no C
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["trailer"] is False  # the save wrote a plain torch file, at full speed
    assert len(result["warnings"]) == 1, result["warnings"]  # once, not per save or per load
    warning = result["warnings"][0]
    assert "MiB/s" in warning and "no integrity trailer" in warning
    if how == "not installed":
        assert "crc32c" in warning and "pip install 'crc32c>=2.7'" in warning
    else:
        assert "Unset CRC32C_SW_MODE=none" in warning
    assert result["impl"] == "python"
    assert result["loaded"] is True
    assert result["refused"] is True
