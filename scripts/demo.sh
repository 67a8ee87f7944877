#!/usr/bin/env bash
# The main job: set up, serve the default model with its shipped SAE (models/default-saes/resid15)
# and concept vector (models/default-vectors/cats), and stream a generation steered by the vector,
# by name, with the SAE's features at each token, beside the unsteered one.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
cache="${RUDDER_CACHE:-$HOME/.cache/rudder}"
port="${RUDDER_PORT:-50051}"
backend="${RUDDER_BACKEND:-auto}"   # auto: vLLM (installed by set-up); RUDDER_BACKEND=reference make demo: the oracle
echo "==> starting the server ($backend backend) on 127.0.0.1:$port"
rudder serve --backend "$backend" --port "$port" > "$cache/demo-server.log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
python examples/steer_demo.py --server "127.0.0.1:$port" "$@"
