#!/usr/bin/env bash
# Fails when the committed rtmanager/_proto differs from what
# scripts/gen-proto.sh generates from proto/ (run that script and commit).
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
OUT="$tmp/_proto" bash scripts/gen-proto.sh
if ! diff -r -x __pycache__ "$tmp/_proto" rtmanager/_proto; then
  echo "rtmanager/_proto is stale: run scripts/gen-proto.sh and commit the result" >&2
  exit 1
fi
echo "generated protobuf code is fresh"
