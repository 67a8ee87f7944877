#!/usr/bin/env bash
# SAELens in its own virtualenv (.venv-saelens), for bench/sae_training.py and
# scripts/make_saelens_fixtures.py only: it is never a dependency of Rudder.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv-saelens/bin/python ] || "${PYTHON:-python3}" -m venv .venv-saelens
.venv-saelens/bin/pip install -q torch==2.13.0
.venv-saelens/bin/pip install -q sae-lens==6.54.12
.venv-saelens/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
echo ".venv-saelens ready: $(.venv-saelens/bin/python -c 'import sae_lens; print("sae-lens", sae_lens.__version__)')"
