"""Print pip constraints that pin each cloud SDK (and the core dependencies but torch) at its declared floor.

Used by ``bash scripts/test.sh --floors``: the store suites then run against the oldest versions pyproject.toml
allows, so a floor that is too low (an SDK option we use that arrived later) fails CI instead of users.

Example:
    >>> floors(['boto3>=1.36', 'google-cloud-storage>=2.14; python_version>="3.10"', 'ckptcloud[s3]', 'x'])
    ['boto3==1.36', 'google-cloud-storage==2.14']
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

PINNED_EXTRAS = ("s3", "gcs", "azure")
_FLOOR = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)")


def floors(requirements: list[str]) -> list[str]:
    """``name==floor`` for each requirement with a ``>=`` floor (self-references and torch are skipped)."""
    out = []
    for requirement in requirements:
        match = _FLOOR.match(requirement.split(";")[0])
        if match and match.group(1) not in ("torch", "ckptcloud"):
            out.append(f"{match.group(1)}=={match.group(2)}")
    return out


def main() -> None:
    project = tomllib.loads(Path(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in PINNED_EXTRAS:
        requirements += project["optional-dependencies"][extra]
    print("\n".join(floors(requirements)))


if __name__ == "__main__":
    main()
