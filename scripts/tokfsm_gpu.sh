#!/usr/bin/env bash
# The TokFSM models at the paper's scale on one GPU (Codebook Features §4 and the reference's
# fsm_main config: 20,000 steps of 512 walks, constant lr 1e-3), in three stages as
# scripts/tokfsm.sh runs them on CPU: base, + attention codebooks, + MLP codebooks.
#   scripts/tokfsm_gpu.sh OUT_DIR [RUDDER_COMMAND...]      # default command: .venv/bin/rudder
# Env: BASE_STEPS (20000), BATCH (512), ATTN_STEPS (4000), MLP_STEPS (2000), DEVICE (cuda),
# BASE_SECONDS: a wall-clock bound on the base stage; the base checkpoints every 1,000 steps,
# and a base cut short by the bound is finished from its last checkpoint. CODEBOOK_SECONDS: a bound
# on each codebook stage, turned into steps from the base's measured rate (a codebook step taken as
# three base steps), so that a lease of fixed length brings all three stages back.
set -euo pipefail
cd "$(dirname "$0")/.."
out="$1"; shift
if [ $# -gt 0 ]; then rudder=("$@"); else rudder=(.venv/bin/rudder); fi
device="${DEVICE:-cuda}"; batch="${BATCH:-512}"
timeout "${BASE_SECONDS:-1000000}" "${rudder[@]}" train tokfsm --out "$out/base" --steps "${BASE_STEPS:-20000}" \
  --batch "$batch" --schedule constant --eval-every 1000 --device "$device" || true
if [ ! -f "$out/base/model.safetensors" ]; then
  reached=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['curve'][-1]['step'])" "$out/base/tokfsm_curve.json")
  echo "base stopped by BASE_SECONDS: finishing it at its checkpoint, step $reached"
  "${rudder[@]}" train tokfsm --out "$out/base" --steps "$reached" --batch "$batch" --schedule constant --resume --device "$device"
fi
attn_steps="${ATTN_STEPS:-4000}"; mlp_steps="${MLP_STEPS:-2000}"
if [ -n "${CODEBOOK_SECONDS:-}" ]; then
  fit=$(python3 -c "import json,sys; p=json.load(open(sys.argv[1]))['curve'][-1]; print(int(p['step'] / p['seconds'] * float(sys.argv[2]) / 3))" \
    "$out/base/tokfsm_curve.json" "$CODEBOOK_SECONDS")
  attn_steps=$(( fit < attn_steps ? fit : attn_steps )); mlp_steps=$(( fit < mlp_steps ? fit : mlp_steps ))
  echo "codebook stages: $attn_steps and $mlp_steps steps (CODEBOOK_SECONDS=$CODEBOOK_SECONDS)"
fi
"${rudder[@]}" train codebook --config configs/codebook/tokfsm.yaml --model "$out/base" --out "$out/attn" \
  --set device="$device" --set batch="$batch" --set steps="$attn_steps"
"${rudder[@]}" train codebook --config configs/codebook/tokfsm-mlp.yaml --model "$out/attn" --out "$out/full" \
  --set device="$device" --set batch="$batch" --set steps="$mlp_steps"
