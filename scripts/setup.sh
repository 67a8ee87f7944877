#!/usr/bin/env bash
# Idempotent set-up: a virtualenv in .venv with Rudder and its pinned dependencies,
# and the embedded default model converted into ~/.cache/rudder (RUDDER_CACHE).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=.venv/.rudder-installed
want="$(cat pyproject.toml client/pyproject.toml | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "==> installing Rudder into .venv (first time: a few minutes)"
  python -m pip install -q --upgrade pip
  # torch first and pinned: a plain requirement would pull the multi-GB CUDA build.
  python -m pip install -q torch==2.13.0
  # Strict editable installs: a tree of links under build/, so static tools (pyright, mypy, IDEs)
  # follow rudder.* imports across the package-dir mapping (server/ is rudder.server, ...).
  python -m pip install -q --config-settings editable_mode=strict -e ./client -e ".[test,vllm,saelens]"
  # No CPU build of these exists here; if anything pulled them in, transformers breaks.
  python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  echo "$want" > "$stamp"
fi
# A strict editable install links the modules it saw: relink when one is added or removed.
modules="$(find core server cli training analysis client/rudder -name '*.py' -not -path '*/__pycache__/*' | sort | sha256sum | cut -c1-16)"
if [ "$(cat .venv/.rudder-modules 2>/dev/null)" != "$modules" ]; then
  echo "==> linking Rudder's modules into .venv"
  python -m pip install -q --no-deps --config-settings editable_mode=strict -e ./client -e .
  echo "$modules" > .venv/.rudder-modules
fi
# Chromium renders the feature dashboards in tests (Debian's package); optional elsewhere.
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "==> installing Chromium (Debian package) for the dashboard tests"
  apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1) \
    || echo "    Chromium could not be installed: the dashboard's browser test will be skipped"
fi
# nginx is the real L7 load balancer of the rollout test (Debian's package); optional elsewhere.
if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "==> installing nginx (Debian package) for the rollout test"
  apt-get install -y -q nginx-light >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q nginx-light >/dev/null 2>&1) \
    || echo "    nginx could not be installed: the rollout test will be skipped"
fi
echo "==> default model"
rudder fetch-default
