#!/usr/bin/env bash
# Build a TokFSM codebook model from nothing on CPU (the shipped models/tokfsm-codebook was built
# the same way at the paper's batch on a GPU: scripts/tokfsm_gpu.sh):
#   1. the TokFSM base model (GPT-NeoX, hidden 128, 4 layers, 4 heads), 1500 steps from scratch;
#   2. attention codebooks fine-tuned with it (configs/codebook/tokfsm.yaml);
#   3. MLP codebooks added at every layer, the attention codebooks continuing (configs/codebook/tokfsm-mlp.yaml);
#   4. state codes and steering figures (tokfsm_codes.json, per-codebook feature metadata).
# About 20 + 38 + 40 minutes on 2 CPU cores (CPU only).
#   scripts/tokfsm.sh [OUT_DIR]      # default: models/tokfsm-codebook
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-models/tokfsm-codebook}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
.venv/bin/rudder train tokfsm --out "$work/base" --steps 1500
.venv/bin/rudder train codebook --config configs/codebook/tokfsm.yaml --model "$work/base" --out "$work/attn"
.venv/bin/rudder train codebook --config configs/codebook/tokfsm-mlp.yaml --model "$work/attn" --out "$out"
cp "$work/base/tokfsm_metrics.json" "$out/tokfsm_base_metrics.json"
.venv/bin/rudder analyze tokfsm-codes "$out"
