"""How often the cluster a model picks from a templated, tokenized prompt equals the cluster
of the same request at training time.

    python bench/cluster_agreement.py [--tokenizer smollm2|tiny] [--k 3]

Clusters the bundled training sample (examples/data/moce_sample.jsonl, the packaged
all-MiniLM-L6-v2 encoder), then for every held-out row (moce_sample_heldout.jsonl) and every
training row compares:

* training: ``ClusterModel.assign_requests([row])`` / the artifact's stored id, i.e. the
  request text of the row in its training format (alpaca row, or the same row as chat
  messages);
* the model: the prompt formatted as the model sees it (axolotl's alpaca prompt; the
  tokenizer's chat template with the generation prompt; the raw instruction), tokenized,
  then :meth:`ClusterAssigner.assign` (decode -> request -> ``assign_requests``), as
  ``generate`` does in an exported model.

Also reports the per-request assignment cost (batch of 1 and of 32).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

DATA = ROOT / "examples" / "data"


def load_tokenizer(kind: str):
    if kind == "smollm2":
        from transformers import AutoTokenizer

        folder = ROOT / "examples" / "models" / "SmolLM2-135M-Instruct"
        if not folder.is_dir():
            sys.exit("run `python examples/prepare_smollm2.py` first (or pass --tokenizer tiny)")
        return AutoTokenizer.from_pretrained(folder)
    from axolotl_helpers import sample_rows
    from tiny_models import train_tiny_tokenizer

    return train_tiny_tokenizer([t for r in sample_rows() for t in (r["instruction"],
                                                                   r["output"])])


def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line]


def as_chat(row: dict) -> dict:
    user = (row["instruction"] + "\n" + row.get("input", "")).strip()
    return {"messages": [{"role": "user", "content": user},
                         {"role": "assistant", "content": row["output"]}]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--artifact", help="reuse an artifact of moce_sample.jsonl")
    args = parser.parse_args()

    import torch
    from axolotl.prompters import AlpacaPrompter

    from moce_plugin.clustering import (
        ClusteringOptions,
        ClusterModel,
        rows_from_examples,
        run_clustering,
    )
    from moce_plugin.outputs.hf_native import ClusterAssigner

    train, heldout = rows("moce_sample.jsonl"), rows("moce_sample_heldout.jsonl")
    if args.artifact:
        cluster_model = ClusterModel.load(args.artifact)
    else:
        out = Path(tempfile.mkdtemp()) / "artifact"
        cluster_model = run_clustering(rows_from_examples("sample", train, "auto"), out, args.k,
                                       ClusteringOptions(), progress=False)
    tok = load_tokenizer(args.tokenizer)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    assigner = ClusterAssigner(None, cluster_model.num_clusters, True, tokenizer=tok,
                               cluster_model=cluster_model)
    alpaca = AlpacaPrompter()

    def model_clusters(prompts: list[str]) -> list[int]:
        out: list[int] = []
        for start in range(0, len(prompts), 32):
            enc = tok(prompts[start:start + 32], return_tensors="pt", padding=True)
            out += assigner.assign(enc["input_ids"], enc["attention_mask"]).tolist()
        return out

    print(f"tokenizer: {args.tokenizer} ({type(tok).__name__}); k={cluster_model.num_clusters};"
          f" chat user turn: {assigner._user_turn!r}")
    for split, data in (("held-out", heldout), ("training", train)):
        expected = cluster_model.assign_requests(data).tolist()
        chat_expected = cluster_model.assign_requests([as_chat(r) for r in data]).tolist()
        forms = {
            "alpaca prompt": ([next(alpaca.build_prompt(r["instruction"], r["input"]))
                               for r in data], expected),
            "chat template": ([tok.apply_chat_template(as_chat(r)["messages"][:1],
                                                       tokenize=False, add_generation_prompt=True)
                               for r in data], chat_expected),
            "raw instruction": ([(r["instruction"] + "\n" + r["input"]).strip() for r in data],
                                expected),
        }
        for form, (prompts, want) in forms.items():
            got = model_clusters(prompts)
            same = sum(a == b for a, b in zip(got, want))
            print(f"{split:9s} {form:16s} {same}/{len(want)} = {100 * same / len(want):.1f}%")

    prompt = tok(next(alpaca.build_prompt(heldout[0]["instruction"])), return_tensors="pt")
    batch = tok([next(alpaca.build_prompt(r["instruction"])) for r in heldout[:32]],
                return_tensors="pt", padding=True)
    assigner.assign(prompt["input_ids"], None)  # encoder loaded
    torch.set_num_threads(torch.get_num_threads())
    for name, enc, n in (("1 request", prompt, 1), ("32 requests", batch, 32)):
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            assigner.assign(enc["input_ids"], enc.get("attention_mask"))
            best = min(best, time.perf_counter() - start)
        print(f"assignment cost, batch of {name}: {1000 * best / n:.1f} ms per request")


if __name__ == "__main__":
    main()
