#!/usr/bin/env bash
# One-command GPU acceptance check (see bench/gpu_check.py for the steps):
#   bash bench/gpu_check.sh [--steps tests,layer576,...] [--skip qlora] [--budget 450] [--out DIR]
# Uses $PYTHON, else the repo's .venv, else python3. GPU_CHECK_WHEELS=DIR first installs the
# wheels in DIR (no index, no dependency resolution) into a temporary folder put on
# PYTHONPATH: how a bare GPU image gets what it lacks (pydantic, axolotl, bitsandbytes...).
# Prints one summary table; exit 1 when a step failed or timed out (a skip is not a failure).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [[ -n "${PYTHON:-}" ]]; then py="$PYTHON"
elif [[ -x "$root/.venv/bin/python" ]]; then py="$root/.venv/bin/python"
else py="$(command -v python3)"; fi
extra=""
if [[ -n "${GPU_CHECK_WHEELS:-}" ]]; then
  site="$(mktemp -d /tmp/moce_gpu_check_site.XXXXXX)"
  "$py" -m pip install -q --no-index --no-deps --no-compile --target "$site" \
    "$GPU_CHECK_WHEELS"/*.whl
  extra="$site:"
fi
export PYTHONPATH="$extra$root:$root/tests:$root/bench${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" -m bench.gpu_check --python "$py" "$@"
