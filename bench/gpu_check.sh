#!/usr/bin/env bash
# One-command GPU acceptance check (see bench/gpu_check.py for the steps):
#   bash bench/gpu_check.sh [--steps tests,layer576,...] [--skip qlora] [--budget 450] [--out DIR]
# Uses $PYTHON, else the repo's .venv, else python3. Prints one summary table; exit 1 when a
# step failed or timed out (a skipped step is not a failure).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [[ -n "${PYTHON:-}" ]]; then py="$PYTHON"
elif [[ -x "$root/.venv/bin/python" ]]; then py="$root/.venv/bin/python"
else py="$(command -v python3)"; fi
export PYTHONPATH="$root:$root/tests:$root/bench${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" bench/gpu_check.py --python "$py" "$@"
