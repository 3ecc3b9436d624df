#!/usr/bin/env bash
# Regenerates kvpack/v1 (Python, gRPC stubs and mypy stubs) from proto/kvpack/v1/*.proto.
# Usage: scripts/gen_proto.sh [OUTDIR]   (default: the repository root)
#
# The generator is pinned in scripts/requirements/protoc.txt (grpcio-tools 1.78.0, protobuf 6.31.1
# gencode) and runs from its own cached environment (scripts/cached_venv.py, ~/.cache/kvpack):
# generated code demands a runtime at least as new as its generator, so the oldest supported
# generator makes kvpack/v1 import under both protobuf 6.31+ / grpcio 1.78+ (LMCache's pins) and
# protobuf 7 (kvpack's own environment). KVPACK_PROTOC_PYTHON overrides the generator's python.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$root}"
py="${KVPACK_PROTOC_PYTHON:-}"
if [ -z "$py" ]; then
  py="$(python3 "$root/scripts/cached_venv.py" protoc -- -r "$root/scripts/requirements/protoc.txt")"
fi
bindir="$(dirname "$py")"
mkdir -p "$out/kvpack/v1"
# PATH: protoc finds the protoc-gen-mypy plugins next to the generator's python.
PATH="$bindir:$PATH" "$py" -m grpc_tools.protoc -I "$root/proto" \
  --python_out="$out" --grpc_python_out="$out" --mypy_out="$out" --mypy_grpc_out="$out" \
  "$root"/proto/kvpack/v1/*.proto
touch "$out/kvpack/v1/__init__.py"
