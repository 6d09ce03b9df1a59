#!/usr/bin/env bash
# The README's benchmark from a fresh clone: environments, emulators, every case, tables and plot (~15 min).
# Usage: bash scripts/bench.sh [bench.py options]   (default: S3, GCS, Azure and the WAN run, into docs/benchmarks)
set -euo pipefail
cd "$(dirname "$0")/.."
py=$(bash scripts/bootstrap.sh dev,bench)
# fsspec (s3fs, gcsfs, adlfs) in its own venv: see the bench-fsspec extra in pyproject.toml.
fsspec_py=$(CKPTCLOUD_VENV=.venv-fsspec bash scripts/bootstrap.sh bench-fsspec)
bash scripts/emulators.sh
exec "$py" benchmarks/bench.py --fsspec-python "$fsspec_py" --out docs/benchmarks "$@"
