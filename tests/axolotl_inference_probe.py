"""Loads a MoCE model the way ``axolotl inference`` does (``load_cfg(inference=True)``, then
``load_model_and_tokenizer(inference=True)``) and decodes prompts greedily with
``model.generate`` and token ids only, as axolotl's inference CLI calls it; writes each
prompt's text and assigned cluster as JSON.

    python tests/axolotl_inference_probe.py CONFIG OUT_JSON PROMPTS_JSON [--key value ...]
"""

from __future__ import annotations

import json
import sys

import torch


def main(argv: list[str]) -> None:
    config, out, prompts_file, *rest = argv
    overrides = {rest[i].lstrip("-").replace("-", "_"): rest[i + 1]
                 for i in range(0, len(rest), 2)}
    from axolotl.cli.config import load_cfg
    from axolotl.cli.utils.load import load_model_and_tokenizer

    cfg = load_cfg(config, inference=True, rl=None, **overrides)
    cfg.sample_packing = False
    model, tokenizer, _ = load_model_and_tokenizer(cfg=cfg, inference=True)
    model.eval()
    assigner = (model.get_base_model() if hasattr(model, "get_base_model") else model
                )._moce_assigner
    results = []
    for prompt in json.loads(open(prompts_file, encoding="utf-8").read()):
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=True)["input_ids"]
        with torch.no_grad():
            seq = model.generate(inputs=ids, max_new_tokens=5, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        results.append({"prompt": prompt, "cluster": int(assigner.assign(ids, None)[0]),
                        "text": tokenizer.decode(seq[0, ids.shape[1]:],
                                                 skip_special_tokens=True)})
    with open(out, "w", encoding="utf-8") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1:])
