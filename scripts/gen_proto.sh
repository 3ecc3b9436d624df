#!/usr/bin/env bash
# Regenerates kvpack/v1 (Python, gRPC stubs and mypy stubs) from proto/kvpack/v1/*.proto.
# Usage: scripts/gen_proto.sh [OUTDIR]   (default: the repository root)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$root}"
py="${PYTHON:-$root/.venv/bin/python}"
bindir="$(dirname "$py")"
mkdir -p "$out/kvpack/v1"
PATH="$bindir:$PATH" "$py" -m grpc_tools.protoc -I "$root/proto" \
  --python_out="$out" --grpc_python_out="$out" --mypy_out="$out" --mypy_grpc_out="$out" \
  "$root"/proto/kvpack/v1/*.proto
touch "$out/kvpack/v1/__init__.py"
