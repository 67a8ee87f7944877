#!/usr/bin/env bash
# Train the default SAE on the default model once (configs/sae/default.yaml) and cache it.
# Usage: scripts/default_sae.sh [OUT]   (default: $RUDDER_CACHE/artifacts/default/saes/resid15)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. .venv/bin/activate
cache="${RUDDER_CACHE:-$HOME/.cache/rudder}"
out="${1:-$cache/artifacts/default/saes/resid15}"
stamp="$out/.config-sha"
want="$(sha256sum configs/sae/default.yaml | cut -c1-16)"
if [ -f "$out/cfg.json" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
echo "==> training the default SAE (once, about 5 minutes on 2 cores; resumes if interrupted)"
rudder train sae --config configs/sae/default.yaml --out "$out"
echo "$want" > "$stamp"
