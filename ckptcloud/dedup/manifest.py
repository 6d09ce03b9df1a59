"""The manifest: what a deduplicated checkpoint's own key holds, and how to tell one from a plain checkpoint.

A manifest is a ``torch.save`` file (with ckptcloud's integrity trailer) of a dict whose first key is ``format``::

    {"format": "ckptcloud-dedup/1", "length": bytes of the rebuilt file, "inline": uint8 tensor,
     "segments": [["inline", offset, length, inline_offset] | ["blob", offset, length, name, crc32c, tensor], ...]}

It loads with ``weights_only=True``. ``segments`` cover ``[0, length)`` of the rebuilt file in order. The object
carries the metadata ``ckptcloud_format=dedup-1``; without it (a listing that omits metadata, a copy) the format
string near the start of the file identifies it (:func:`is_manifest_head`), since the pickle is the zip's first
record and ``format`` its first key.
"""

from __future__ import annotations

import ctypes
import io
import re
from typing import IO, Any

import torch

from ckptcloud import serialization

FORMAT = "ckptcloud-dedup/1"
METADATA_KEY = "ckptcloud_format"
METADATA_VALUE = "dedup-1"
SNIFF_BYTES = 4096
INLINE_MAX = 64 * 1024
"""Writes of ``torch.save`` shorter than this (headers, the pickle, small storages) stay inside the manifest."""

_MAGIC = FORMAT.encode()


def is_manifest_head(head: bytes) -> bool:
    """Whether the first bytes of an object are those of a manifest."""
    return head[:4] == b"PK\x03\x04" and _MAGIC in head[:SNIFF_BYTES]


def is_manifest_file(file: IO[bytes]) -> bool:
    """Whether the real file ``file`` holds a manifest; leaves its position at 0."""
    file.seek(0)
    head = file.read(SNIFF_BYTES)
    file.seek(0)
    return is_manifest_head(head)


def encode(segments: list[list[Any]], inline: bytearray, length: int) -> bytes:
    """The manifest's bytes (small: the inline bytes plus a few dozen bytes per segment)."""
    tensor = torch.frombuffer(inline, dtype=torch.uint8) if inline else torch.empty(0, dtype=torch.uint8)
    out = io.BytesIO()
    body = {"format": FORMAT, "length": length, "segments": segments, "inline": tensor}
    serialization.save(body, out)
    return out.getvalue()


def decode(file: IO[bytes], name: str) -> dict[str, Any]:
    """Parse (and integrity-check) the manifest in the real file ``file``; ``inline`` becomes ``bytes``."""
    manifest = serialization.load(file, weights_only=True, name=name)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{name} is not a {FORMAT} manifest (format {getattr(manifest, 'get', dict)('format')!r})")
    inline = manifest["inline"]
    manifest["inline"] = ctypes.string_at(inline.data_ptr(), inline.nbytes) if inline.nbytes else b""
    _validate(manifest, name)
    return manifest


_BLOB_NAME = re.compile(r"[0-9a-f]{64}(\.[0-9a-f]{1,40})?")


def _validate(manifest: dict[str, Any], name: str) -> None:
    """Segments that tile ``[0, length)`` in order, inline ranges inside the inline bytes, blob names that are
    names this format writes (nothing outside ``.blobs/`` is ever read); ``ValueError`` naming ``name`` else."""
    position, inline = 0, len(manifest["inline"])
    for segment in manifest["segments"]:
        kind, offset, length = segment[0], segment[1], segment[2]
        good = offset == position and isinstance(length, int) and length >= 0
        if kind == "inline":
            good = good and len(segment) == 4 and 0 <= segment[3] <= inline - length
        elif kind == "blob":
            good = good and len(segment) == 6 and isinstance(segment[3], str) and bool(_BLOB_NAME.fullmatch(segment[3]))
        else:
            good = False
        if not good:
            raise ValueError(f"{name} is a damaged {FORMAT} manifest (bad segment {segment[:4]!r})")
        position += length
    if position != manifest["length"]:
        raise ValueError(f"{name} is a damaged {FORMAT} manifest (segments cover {position} of {manifest['length']})")


def decode_bytes(data: bytes, name: str) -> dict[str, Any]:
    """:func:`decode` for a manifest held in memory (written to an unnamed temporary file: the trailer check
    needs a real file)."""
    import tempfile

    with tempfile.TemporaryFile(prefix="ckptcloud-manifest-") as file:
        file.write(data)
        file.seek(0)
        return decode(file, name)


def blob_names(manifest: dict[str, Any]) -> set[str]:
    """Every blob name a manifest references."""
    return {segment[3] for segment in manifest["segments"] if segment[0] == "blob"}
