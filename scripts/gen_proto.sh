#!/usr/bin/env bash
# Regenerate the Python stubs from proto/ (grpcio-tools is pinned in client/pyproject.toml).
#   scripts/gen_proto.sh [OUT_DIR]     # default: client/
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-client}"
python -m grpc_tools.protoc -I proto --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" proto/rudder/v1/*.proto
