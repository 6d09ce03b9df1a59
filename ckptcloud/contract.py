"""The save-handler contract, which retention (``Checkpoint``) and every saver share: no torch, no store SDK.

A save handler is called on **every rank** with ``(checkpoint, filename, metadata)`` and decides itself which rank
writes. ``remove(filename)`` deletes a stored checkpoint; removing one that is already gone is not an error.
``describe()`` lists what is stored as :class:`ObjectInfo`, which is all ``Checkpoint.resume`` needs to know.
"""

from __future__ import annotations

import inspect
import logging
import sys
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ckptcloud._ignite import register_with_ignite

logger = logging.getLogger("ckptcloud")


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object: key (relative to the bucket), size in bytes, last-modified timestamp, user metadata, and
    ``version``: what ``read(..., version=...)`` pins a load to (S3/Azure ETag, GCS generation; ``head`` sets it,
    listings may not)."""

    key: str
    size: int
    last_modified: float | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    version: str | None = None


class BaseSaveHandler(ABC):
    """The save-handler contract: ``__call__(checkpoint, filename, metadata=None)`` and ``remove(filename)``.

    Subclasses also count as ignite ``BaseSaveHandler`` instances (registered when ignite is imported), so
    ``ignite.handlers.Checkpoint`` prunes old checkpoints through them.

    Example:
        >>> class PrintSaver(BaseSaveHandler):
        ...     def __call__(self, checkpoint, filename, metadata=None):
        ...         print("save", filename)
        ...     def remove(self, filename):
        ...         print("remove", filename)
        >>> PrintSaver()({"w": 1}, "model_1.pt")
        save model_1.pt
    """

    stores_run_id: ClassVar[bool] = False
    """Whether saves take ``metadata["run"]`` and refuse to replace another run's checkpoint (remote savers do)."""

    @abstractmethod
    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        """Store ``checkpoint`` under ``filename``; ``metadata`` has ``basename``, ``score_name``, ``priority``
        (ignite's keys) and, for handlers whose ``stores_run_id`` is true, ``run``: the id of the run that owns it."""

    @abstractmethod
    def remove(self, filename: str) -> None:
        """Delete the checkpoint stored under ``filename`` (already gone is not an error)."""


register_with_ignite(BaseSaveHandler)


def is_save_handler(obj: Any) -> bool:
    """True for ckptcloud's and (when ignite is imported) ignite's save handlers."""
    if isinstance(obj, BaseSaveHandler):
        return True
    ignite_checkpoint = sys.modules.get("ignite.handlers.checkpoint")
    return ignite_checkpoint is not None and isinstance(obj, ignite_checkpoint.BaseSaveHandler)


def check_filename(filename: Any) -> str:
    """Validate a checkpoint filename: a relative name that cannot escape its folder or prefix.

    Raises:
        TypeError: not a string.
        ValueError: empty, absolute, containing ``..``/``.`` segments, backslashes or control characters.
    """
    if not isinstance(filename, str):
        raise TypeError(f"Argument `filename` should be a str, but given {type(filename)}")
    parts = filename.split("/")
    bad = (
        not filename
        or filename.startswith("/")
        or "\\" in filename
        or any(part in ("", ".", "..") for part in parts)
        or any(ord(ch) < 32 or ord(ch) == 127 for ch in filename)
    )
    if bad:
        raise ValueError(
            "Argument `filename` should be a relative name without '..', '.', empty segments, a leading '/', "
            f"backslashes or control characters, but given {filename!r}"
        )
    return filename


def is_valid_name(filename: str) -> bool:
    """Whether :func:`check_filename` accepts ``filename``; listings skip other names (someone else's objects)."""
    try:
        check_filename(filename)
    except ValueError:
        logger.debug("skipping %r: not a name ckptcloud writes", filename)
        return False
    return True


def metadata_mode(handler: Any) -> str:
    """Decide once, from the signature, how ``handler`` takes ``metadata``: positional, keyword or not at all."""
    try:
        signature = inspect.signature(handler)
    except (TypeError, ValueError):
        return "positional"
    params = list(signature.parameters.values())
    meta = signature.parameters.get("metadata")
    if meta is not None and meta.kind is meta.KEYWORD_ONLY:
        return "keyword"
    if meta is not None or any(p.kind is p.VAR_POSITIONAL for p in params):
        return "positional"
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) >= 3:
        return "positional"
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return "keyword"
    return "none"
