#!/usr/bin/env bash
# Installs the emulators that are not Python packages (moto, SeaweedFS and fake-gcs-server come with the dev extra).
set -euo pipefail
cd "$(dirname "$0")/.."
# Azurite (Azure Blob emulator) from npm, pinned: 3.37+ needs Node 22.
if [ ! -x .emulators/node_modules/.bin/azurite-blob ]; then
  npm install --prefix .emulators --no-audit --no-fund --loglevel=error azurite@3.35.0 1>&2
fi
