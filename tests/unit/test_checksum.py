"""The zero-copy CRC32C gives google-crc32c's values on every kind of buffer the pipeline hands it."""

from __future__ import annotations

import array
import base64
import os

import google_crc32c
import pytest
import torch

from ckptcloud import checksum


def reference(data: bytes, crc: int = 0) -> int:
    return google_crc32c.extend(crc, data)


@pytest.mark.parametrize("size", [0, 1, 7, 4096, 5 * 1024 * 1024 + 3])
def test_values_match_google_crc32c_for_bytes_bytearray_and_views(size):
    data = os.urandom(size)
    expected = reference(data)
    assert checksum.crc32c(data) == expected
    assert checksum.crc32c(bytearray(data)) == expected
    assert checksum.crc32c(memoryview(data)) == expected  # read-only view
    assert checksum.crc32c(memoryview(bytearray(data))) == expected


def test_slices_and_extension_chain_like_one_pass():
    data = bytearray(os.urandom(3 * 1024 * 1024))
    view = memoryview(data)
    crc = 0
    for start in range(0, len(data), 1_000_003):  # uneven pieces of one buffer, no copies
        crc = checksum.crc32c(view[start : start + 1_000_003], crc)
    assert crc == reference(bytes(data))
    assert checksum.crc32c(view[5:17]) == reference(bytes(data[5:17]))


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


def test_the_copying_fallback_gives_the_same_values():
    data = os.urandom(9 * 1024 * 1024 + 1)  # over two of its 4 MiB copies
    assert checksum._crc32c_copying(memoryview(data)) == reference(data)
    assert checksum._crc32c_copying(memoryview(data)[10:], 123) == reference(data[10:], 123)


def test_the_zero_copy_path_is_the_one_in_use_on_this_platform():
    # google-crc32c's Linux and macOS wheels bundle libcrc32c; if this fails, saves pay a copy per checksum
    assert checksum.ZERO_COPY
    assert checksum.crc32c is checksum._crc32c_zero_copy


def test_base64_is_the_big_endian_form_s3_expects():
    data = b"checkpoint"
    assert base64.b64decode(checksum.crc32c_base64(data)) == reference(data).to_bytes(4, "big")
