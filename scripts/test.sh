#!/usr/bin/env bash
# Set up (idempotent), then run the whole test suite. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
echo "==> ruff (lint + import order; config in pyproject.toml)"
ruff check .
set +e
start=$(date +%s)
# Two workers (pytest-xdist), a test module at a time each, so that module-scoped engines are started
# once; RUDDER_TEST_WORKERS=0 runs in one process (a debugger, -x, -s).
python -m pytest -q -p no:cacheprovider --durations=10 -n "${RUDDER_TEST_WORKERS:-2}" --dist loadfile \
  --no-loadscope-reorder "$@"
rc=$?
echo "==> test time: $(( $(date +%s) - start )) s (set-up excluded)"
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: the suite is missing or failed to import" >&2
  exit 1
fi
exit "$rc"
