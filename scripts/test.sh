#!/usr/bin/env bash
# The whole test suite from a fresh clone: venv, dependencies, emulators, pytest.
# Emulators (moto_server, SeaweedFS, ...) are installed here and started by the tests themselves.
set -euo pipefail
cd "$(dirname "$0")/.."
py=$(bash scripts/bootstrap.sh dev)
# --xla: also set up the torch_xla environment (torch 2.9.0 + torch-xla 2.9.0, ~4 GB once) and collect tests/xla.
if [ "${1:-}" = "--xla" ]; then
  shift
  CKPTCLOUD_XLA_PYTHON="$(pwd)/$(bash scripts/xla_env.sh)"
  export CKPTCLOUD_XLA_PYTHON
fi
bash scripts/emulators.sh
set +e
"$py" -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "test.sh: pytest collected no tests; treating as a failure" >&2
  exit 1
fi
exit "$rc"
