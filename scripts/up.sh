#!/usr/bin/env bash
# Brings everything up (see scripts/bootstrap.sh) and runs the service in the
# foreground with every worker. Settings come from RTMANAGER_* variables.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/rtmanager serve "$@"
