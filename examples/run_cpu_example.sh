#!/usr/bin/env bash
# The whole MoCE pipeline on the CPU example, from a fresh clone:
# install -> convert SmolLM2 -> cluster the data (stage 1) -> train MoCE with axolotl.
set -euo pipefail
cd "$(dirname "$0")/.."
# The example trains and generates only: the vLLM serving environment is not needed here.
MOCE_SKIP_VLLM=1 bash scripts/install.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export AXOLOTL_DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# `axolotl train` goes through `accelerate launch`, which sets OMP_NUM_THREADS=1 when it is unset
# and no GPU is used: on a CPU that would leave all cores but one idle.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
CONFIG=examples/cpu-smollm2-moce.yml
python examples/prepare_smollm2.py
python preprocess/cluster.py "$CONFIG"
axolotl train "$CONFIG"
echo "done: clusters in outputs/cpu-smollm2-moce/clusters, model in outputs/cpu-smollm2-moce/model"
