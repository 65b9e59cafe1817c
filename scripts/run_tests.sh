#!/usr/bin/env bash
# Installs everything (scripts/install.sh), then runs ruff and the whole test suite,
# the slow end-to-end tests included. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export AXOLOTL_DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ruff check moce_plugin preprocess tests bench studies examples conftest.py
python -m pytest -q "$@"
