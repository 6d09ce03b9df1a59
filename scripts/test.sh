#!/usr/bin/env bash
# The whole test suite from a fresh clone: venv, dependencies, emulators, pytest.
# Emulators (moto_server, SeaweedFS, ...) are installed here and started by the tests themselves.
# Usage: bash scripts/test.sh [--xla | --minimal] [pytest arguments]
#   --xla      also set up the torch_xla environment (torch 2.9.0 + torch-xla 2.9.0, ~4 GB once), collect tests/xla
#   --minimal  run in .venv-min: torch, ckptcloud[all] and the test tools only (no numpy, no dev extras), so a
#              runtime dependency that only the dev extra installs fails here instead of for users
#   --floors   run in .venv-floor: each cloud SDK (and crc32c) at the lowest version pyproject.toml allows
#              (scripts/floors.py), so a floor that is too low fails here instead of for users
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  --xla)
    shift
    py=$(bash scripts/bootstrap.sh dev)
    CKPTCLOUD_XLA_PYTHON="$(pwd)/$(bash scripts/xla_env.sh)"
    export CKPTCLOUD_XLA_PYTHON
    ;;
  --minimal)
    shift
    py=$(CKPTCLOUD_VENV=.venv-min bash scripts/bootstrap.sh all,test)
    if "$py" -c 'import numpy' 2>/dev/null; then
      echo "test.sh: numpy is installed in .venv-min, so this stage cannot show that ckptcloud runs without it" >&2
      exit 1
    fi
    export CKPTCLOUD_MINIMAL_INSTALL=1
    ;;
  --floors)
    shift
    python3 scripts/floors.py > .floors.txt
    py=$(CKPTCLOUD_VENV=.venv-floor CKPTCLOUD_CONSTRAINTS=.floors.txt bash scripts/bootstrap.sh all,test)
    echo "test.sh: SDK floors: $(tr '\n' ' ' < .floors.txt)" >&2
    "$py" -m pip check 1>&2
    ;;
  *)
    py=$(bash scripts/bootstrap.sh dev)
    ;;
esac
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
