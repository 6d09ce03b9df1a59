"""Rebuilding a ``Checkpoint``'s kept list from what is stored (helpers of ``Checkpoint.resume``).

Only filenames that the checkpoint's own pattern could have produced count; priorities come from the metadata
saved with each object (exact), else from the filename (the score's 4-decimal text, or the step).
"""

from __future__ import annotations

import ast
import re
import string
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

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


def priority_from(metadata: Mapping[str, str], match: re.Match[str], by_score: bool) -> Any:
    """The exact priority saved in the object metadata, else the one the filename shows."""
    text = metadata.get("ckptcloud_priority")
    if text is not None:
        try:
            value = ast.literal_eval(unquote(text))
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return value
        except (ValueError, SyntaxError):
            pass
        number = re.search(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", unquote(text))
        if number:
            return float(number.group(0))
    groups = match.groupdict()
    if by_score and groups.get("score") is not None:
        return float(groups["score"])
    if groups.get("global_step") is not None:
        return int(groups["global_step"])
    return None
