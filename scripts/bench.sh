#!/usr/bin/env bash
# The README's benchmarks from a fresh clone: environments, emulators, every benchmark, tables and raw JSON.
# Usage: bash scripts/bench.sh [--quick | --full] [OUT]
#   (default)  the README run (~30 min here): 3 interleaved rounds of every benchmark at the README's sizes
#   --quick    a smoke run of each benchmark (~5 min): one round, small sizes; not for the README
#   --full     everything (~3 h here): also 64 MiB and 1 GiB per store, the 4 GiB ceiling, the WAN scaling curve
#              (c = 1..32), sharded at 4 GiB and world 4, request counts
# OUT defaults to docs/benchmarks. Each benchmark writes its own NAME.md (the table) and NAME.json (every round).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=readme
case "${1:-}" in
  --quick) mode=quick; shift ;;
  --full) mode=full; shift ;;
esac
out="${1:-docs/benchmarks}"
py=$(bash scripts/bootstrap.sh dev,bench)
# fsspec (s3fs, gcsfs, adlfs) in its own venv: see the bench-fsspec extra in pyproject.toml.
fsspec_py=$(CKPTCLOUD_VENV=.venv-fsspec bash scripts/bootstrap.sh bench-fsspec)
bash scripts/emulators.sh
mkdir -p "$out"
run() { echo "== bench.sh ($mode): $*" >&2; "$py" "$@"; }
case "$mode" in
  quick)
    run benchmarks/bench.py --quick --fsspec-python "$fsspec_py" --out "$out"
    run benchmarks/ceiling.py --quick --out "$out"
    run benchmarks/wan.py --quick --out "$out"
    run benchmarks/sharded.py --quick --fsspec-python "$fsspec_py" --out "$out"
    run benchmarks/async_snapshot.py --quick --out "$out"
    run -m benchmarks.dedup_savings --base-mib 64 --saves 3 --rounds 1 --out "$out"
    ;;
  readme)
    run benchmarks/bench.py --stores s3,gcs,azure --sizes 256 --fsspec-python "$fsspec_py" --out "$out"
    run benchmarks/ceiling.py --sizes 1024 --out "$out"
    run benchmarks/wan.py --only "ckptcloud defaults,ckptcloud 0.1 defaults,s3torchconnector" --out "$out"
    run benchmarks/sharded.py --sizes 1024 --worlds 2 --no-count --fsspec-python "$fsspec_py" --out "$out"
    run benchmarks/async_snapshot.py --out "$out"
    run -m benchmarks.dedup_savings --out "$out"
    ;;
  full)
    run benchmarks/bench.py --stores s3,gcs,azure,wan --fsspec-python "$fsspec_py" --out "$out"
    run benchmarks/ceiling.py --out "$out"
    run benchmarks/wan.py --out "$out"
    run benchmarks/sharded.py --fsspec-python "$fsspec_py" --out "$out"
    run benchmarks/async_snapshot.py --out "$out"
    run -m benchmarks.dedup_savings --base-mib 1024 --out "$out"
    ;;
esac
echo "bench.sh: wrote $out" >&2
