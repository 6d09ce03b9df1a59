#!/usr/bin/env bash
# The torch_xla test environment: .venv-xla with torch 2.9.0 + torch-xla 2.9.0 (the newest on PyPI; it needs
# exactly torch 2.9.0, a ~4 GB CUDA build that runs on the CPU with PJRT_DEVICE=CPU) and ckptcloud[s3].
# Created when missing, reused when present. Prints the environment's python path last.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${CKPTCLOUD_XLA_VENV:-.venv-xla}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c 'import torch_xla' 2>/dev/null; then
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "torch==2.9.0" "torch-xla==2.9.0" 1>&2
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[s3]" 1>&2
echo "$venv/bin/python"
