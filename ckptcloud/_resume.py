"""Rebuilding a ``Checkpoint``'s kept list from what is stored (helpers of ``Checkpoint.resume``).

Only filenames that the checkpoint's own pattern could have produced count; priorities come from the metadata
saved with each object (exact), else from the filename (the score's 4-decimal text, or the step).
"""

from __future__ import annotations

import numbers
import operator
import re
import string
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

_INT = re.compile(r"[-+]?\d+")
_FLOAT = re.compile(r"[-+]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|inf|nan)", re.IGNORECASE)
_NUMPY_REPR = re.compile(r"(?:np|numpy)\.(?:float|int|uint)\d*\((.*)\)")
_FIELDS = {
    "score": r"(?P<score>-?(?:\d+(?:\.\d+)?|inf)|nan)",
    "global_step": r"(?P<global_step>-?\d+)",
}


def pattern_regex(pattern: str, known: Mapping[str, Any]) -> re.Pattern[str]:
    """A regex matching every filename ``pattern`` renders with the ``known`` fields (score and step vary).

    Raises:
        ValueError: the pattern has a field that is neither known nor ``score``/``global_step``.
    """
    parts = []
    seen: set[str] = set()
    for literal, field, spec, conversion in string.Formatter().parse(pattern):
        parts.append(re.escape(literal))
        if field is None:
            continue
        if field in _FIELDS:
            parts.append(_FIELDS[field] if field not in seen else f"(?P={field})")
            seen.add(field)
        elif field in known:
            value = format(known[field], spec or "") if not conversion else str(known[field])
            parts.append(re.escape(value))
        else:
            raise ValueError(f"cannot resume with field {{{field}}} in filename_pattern {pattern!r}")
    return re.compile("".join(parts))


def as_priority(value: Any) -> int | float:
    """A score or step as a plain ``int`` or ``float`` (NumPy and torch scalars included), the same on every rank.

    Raises:
        ValueError: not a real number.
    """
    if isinstance(value, numbers.Integral):
        return operator.index(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise ValueError(f"A checkpoint's score or step should be a real number, but given {value!r}")


def format_priority(priority: Any) -> str:
    """The one text form of a priority stored with a checkpoint: ``str(int)`` for whole numbers (steps, integer
    scores), ``repr(float)`` for the rest; NumPy and torch scalars are converted first, so ``np.float64(0.7)`` is
    stored as ``0.7``, never as its repr.

    Example:
        >>> format_priority(3), format_priority(0.7), format_priority(True)
        ('3', '0.7', '1')
    """
    return repr(as_priority(priority))


def parse_priority(text: str | None) -> int | float | None:
    """The priority in ``text`` (percent-encoded or not) written by :func:`format_priority`, else ``None``.

    The whole text must be one number: an int stays an int, anything else is a float. Texts that ckptcloud 0.1.0
    wrote for NumPy scalars (``np.float64(0.7)``) are read as the number inside them. Nothing else is guessed.

    Example:
        >>> parse_priority("3"), parse_priority("0.7"), parse_priority("np.float64%280.7%29"), parse_priority("x64")
        (3, 0.7, 0.7, None)
    """
    if text is None:
        return None
    text = unquote(text).strip()
    legacy = _NUMPY_REPR.fullmatch(text)
    if legacy:
        text = legacy.group(1)
    if _INT.fullmatch(text):
        return int(text)
    if _FLOAT.fullmatch(text):
        return float(text)
    return None


def priority_from(metadata: Mapping[str, str], match: re.Match[str]) -> int | float | None:
    """The exact priority saved in the object metadata, else the one the filename shows (its score, else step)."""
    exact = parse_priority(metadata.get("ckptcloud_priority"))
    if exact is not None:
        return exact
    groups = match.groupdict()
    if groups.get("score") is not None:
        return parse_priority(groups["score"])
    if groups.get("global_step") is not None:
        return int(groups["global_step"])
    return None
