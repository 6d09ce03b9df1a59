#!/usr/bin/env bash
# Creates (or reuses) .venv with the CPU torch wheel first, then ckptcloud and its extras.
# Usage: source-free; `bash scripts/bootstrap.sh [EXTRAS]` (default "all"). Prints the venv's python path last.
# CKPTCLOUD_VENV picks the venv folder; CKPTCLOUD_CONSTRAINTS, a pip constraints file (the SDK floors stage).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-all}"
venv="${CKPTCLOUD_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
if ! "$py" -c 'import torch' 2>/dev/null; then
  "$py" -m pip install -q --disable-pip-version-check "torch==2.13.0" 1>&2
fi
constraints=()
if [ -n "${CKPTCLOUD_CONSTRAINTS:-}" ]; then
  constraints=(-c "$CKPTCLOUD_CONSTRAINTS")
fi
"$py" -m pip install -q --disable-pip-version-check "${constraints[@]}" -e ".[${extras}]" 1>&2
echo "$py"
