#!/usr/bin/env bash
# The image recipe on one GPU in one call (scripts/gpu_check.py says what it measures), results under $OUT or --out.
#   scripts/gpu_wheels.sh                 # first, where a package index answers: the wheels the GPU machine lacks
#   scripts/gpu_check.sh                  # on the GPU machine, from the repository root (about 8 minutes)
#   scripts/gpu_check.sh --dry-run --out outputs/gpu_check   # the same steps on the CPU, tiny, in this checkout's .venv
# On the GPU machine it installs .wheels/*.whl and fmlab itself (from this tree) into a folder of its own with
# --no-deps and no index, and stops the whole check at GPU_CHECK_TIMEOUT seconds (540): what was measured by then is
# already in gpu_check.json and gpu_check.md.
set -uo pipefail
cd "$(dirname "$0")/.."
dry_run=0
for arg in "$@"; do [ "$arg" = "--dry-run" ] && dry_run=1; done
if [ "$dry_run" = 1 ]; then
  PY=${PY:-.venv/bin/python}
else
  PY=${PY:-python3}
  site=${GPU_CHECK_SITE:-/tmp/fmlab-site}
  if compgen -G ".wheels/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .wheels/*.whl || exit 1
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target "$site" . || exit 1
  export PYTHONPATH="$site"
fi
exec timeout "${GPU_CHECK_TIMEOUT:-540}" "$PY" scripts/gpu_check.py "$@"
