#!/usr/bin/env bash
# The demo from a fresh clone: venv, dependencies, then `python -m ckptcloud demo` (arguments are passed on).
set -euo pipefail
cd "$(dirname "$0")/.."
py=$(bash scripts/bootstrap.sh dev)
exec "$py" -m ckptcloud demo "$@"
