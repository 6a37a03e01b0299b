#!/usr/bin/env bash
# Regenerates rtmanager/_proto from proto/: Python messages, gRPC stubs and
# mypy-protobuf .pyi stubs. protoc names imports after the .proto path
# (galaxy.rtmanager.v1); they are rewritten to live under rtmanager._proto so
# the distribution ships one top-level package. CI runs this script and fails
# when the result differs from what is committed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(cd "${VENV:-.venv}" && pwd)
OUT=${OUT:-rtmanager/_proto}
mapfile -t PROTOS < <(cd proto && find . -name '*.proto' | sed 's|^\./||' | sort)
rm -rf "$OUT"
mkdir -p "$OUT"
OUT_ABS=$(cd "$OUT" && pwd)
(cd proto && "$VENV/bin/python" -m grpc_tools.protoc -I . \
  --plugin=protoc-gen-mypy="$VENV/bin/protoc-gen-mypy" \
  --plugin=protoc-gen-mypy_grpc="$VENV/bin/protoc-gen-mypy_grpc" \
  --python_out="$OUT_ABS" --grpc_python_out="$OUT_ABS" \
  --mypy_out="$OUT_ABS" --mypy_grpc_out="$OUT_ABS" "${PROTOS[@]}" >/dev/null)
find "$OUT" -type f \( -name '*.py' -o -name '*.pyi' \) -print0 \
  | xargs -0 sed -i -E 's/^(from|import) galaxy\./\1 rtmanager._proto.galaxy./'
find "$OUT" -type d -exec sh -c 'touch "$1/__init__.py"' _ {} \;
