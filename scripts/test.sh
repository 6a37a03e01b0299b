#!/usr/bin/env bash
# Brings everything up (see scripts/bootstrap.sh) and runs every check:
# ruff, mypy --strict over the package, its tests and the benchmarks, buf
# lint, protobuf freshness and the whole pytest suite against real
# PostgreSQL, Redis and Docker, then the short chaos soak (bench/soak.py).
# Extra arguments go to pytest. Exits non-zero on any failure, including
# "no tests collected".
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy --strict (rtmanager, tests, bench)"
.venv/bin/mypy rtmanager tests bench
echo "== buf lint"
node_modules/.bin/buf lint
echo "== protobuf freshness"
bash scripts/check-proto.sh
echo "== pytest"
# pytest exits 5 when it collects no test: that is a failure here too.
# The slowest tests are listed at the end, to keep the run within its budget.
.venv/bin/pytest -p no:cacheprovider -n "${RTMANAGER_TEST_WORKERS:-3}" --durations=25 "$@"
echo "== chaos soak"
# Alone and last: it restarts the shared dockerd (and runs its own private
# PostgreSQL and Redis). RTMANAGER_SOAK_SECONDS=0 skips it.
if [[ ${RTMANAGER_SOAK_SECONDS:-90} != 0 ]]; then
  .venv/bin/python -m bench.soak --seconds "${RTMANAGER_SOAK_SECONDS:-90}"
fi
