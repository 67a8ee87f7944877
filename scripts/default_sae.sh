#!/usr/bin/env bash
# Rebuild the shipped default SAE (models/default-saes/resid15) from configs/sae/default.yaml.
# Set-up never runs this: every machine serves the committed artifact. About 20 minutes on 2 cores.
#   scripts/default_sae.sh [OUT]      (default: models/default-saes/resid15)
# The corpus (WordNet glosses, fortunes, the stdlib's docstrings) needs Debian's packages:
#   apt-get install wordnet-base fortunes fortunes-min
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. .venv/bin/activate
out="${1:-models/default-saes/resid15}"
echo "==> training the default SAE into $out"
rudder train sae --config configs/sae/default.yaml --out "$out"
