"""Held-out metrics of one reproduction run.

Per domain: mean loss (and perplexity) on the answer tokens, teacher-forced with the
training prompt format; for math, exact match of the final answer of greedy generations;
for MoCE runs, which group each domain's rows go to and how its tokens use the experts.
Per-row answer losses are kept (``rows``) so that runs can be compared row by row (stats.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from repro_config import DOMAINS, HELDOUT_FILE, Run, Settings, read_jsonl, run_dir
from tqdm import tqdm

from moce_plugin.model.routing import CLUSTER_IDS_KWARG

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def alpaca_prompt(row: dict) -> str:
    from axolotl.prompters import AlpacaPrompter

    return next(iter(AlpacaPrompter().build_prompt(row["instruction"], row.get("input") or None)))


def row_id(row: dict) -> str:
    """A short content hash: pairs rows across runs and catches changed held-out files."""
    text = json.dumps([row["instruction"], row.get("input") or "", row["output"]])
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def final_number(text: str) -> str | None:
    """GSM8K's answer convention: the number after '####', else the last number."""
    tail = text.split("####", 1)[1] if "####" in text else text
    found = NUMBER.findall(tail)
    if not found:
        return None
    value = (found[0] if "####" in text else found[-1]).replace(",", "").rstrip(".")
    try:
        return str(float(value)).removesuffix(".0")
    except ValueError:
        return None


class LoadedRun:
    """The trained model of a run with one interface for loss and generation."""

    def __init__(self, run: Run, s: Settings, model_dir: Path | None = None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.run = run
        self.moce = None
        out = model_dir or run_dir(run) / "model"  # or one of its checkpoints
        if run.kind == "moce":
            from moce_plugin.inference import load_moce_model

            self.moce = load_moce_model(out, prompt_format="alpaca")
            self.model, self.tokenizer = self.moce.model, self.moce.tokenizer
        else:
            self.model = AutoModelForCausalLM.from_pretrained(s.base_model, dtype=torch.float32)
            if run.kind == "lora":
                from peft import PeftModel

                self.model = PeftModel.from_pretrained(self.model, out)
            self.tokenizer = AutoTokenizer.from_pretrained(s.base_model)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.eval()

    def clusters(self, rows: list[dict]) -> list[int]:
        if self.moce is None:
            return [0] * len(rows)
        if self.moce.cluster_model is None:  # one group (PESC)
            return [0] * len(rows)
        return [int(c) for c in self.moce.cluster_model.assign_requests(rows)]

    def forward(self, batch: dict, clusters: list[int]) -> torch.Tensor:
        kwargs = {}
        if self.moce is not None:
            ids = torch.tensor(clusters)[:, None].expand_as(batch["input_ids"]).clone()
            ids[batch["attention_mask"] == 0] = -1
            kwargs[CLUSTER_IDS_KWARG] = ids
        return self.model(**batch, **kwargs).logits

    @torch.no_grad()
    def generate(self, prompts: list[str], clusters: list[int], max_new_tokens: int) -> list[str]:
        tok = self.tokenizer
        tok.padding_side = "left"
        batch = tok(prompts, return_tensors="pt", padding=True)
        kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=False,
                                      pad_token_id=tok.pad_token_id)
        if self.moce is not None:
            kwargs[CLUSTER_IDS_KWARG] = torch.tensor(clusters)
        out = self.model.generate(**batch, **kwargs)
        return tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


@torch.no_grad()
def answer_loss(m: LoadedRun, rows: list[dict], clusters: list[int], batch_size: int = 8,
                max_length: int = 384) -> tuple[dict[str, dict[str, float]], dict, dict | None]:
    """Token-mean loss on answers (+ EOS), prompt tokens masked, per domain; the summed
    loss and token count of every row (in ``rows`` order); for MoCE models also the routing
    of the same forward passes, summed per domain and layer."""
    from moce_plugin.model.routing import routing_stats
    from moce_plugin.model.upcycle import pop_last_routing

    tok = m.tokenizer
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    row_nll, row_tokens = [0.0] * len(rows), [0] * len(rows)
    # [domain][layer] -> routing slots per (group, expert); batches are single-domain
    slots: dict[str, dict[int, np.ndarray]] = defaultdict(dict)
    batches = []
    for domain in DOMAINS:
        idx = [i for i, r in enumerate(rows) if r["source"] == domain]
        batches += [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    for idx in tqdm(batches, desc="held-out loss"):
        chunk = [rows[i] for i in idx]
        seqs, labels = [], []
        for row in chunk:
            prompt = tok(alpaca_prompt(row))["input_ids"]
            answer = tok(row["output"], add_special_tokens=False)["input_ids"]
            answer.append(tok.eos_token_id)
            ids = (prompt + answer)[:max_length]
            seqs.append(ids)
            labels.append(([-100] * len(prompt) + answer)[:max_length])
        width = max(map(len, seqs))
        input_ids = torch.full((len(seqs), width), tok.pad_token_id)
        mask = torch.zeros_like(input_ids)
        target = torch.full_like(input_ids, -100)
        for i, (ids, lab) in enumerate(zip(seqs, labels)):
            input_ids[i, :len(ids)] = torch.tensor(ids)
            mask[i, :len(ids)] = 1
            target[i, :len(lab)] = torch.tensor(lab)
        batch = {"input_ids": input_ids, "attention_mask": mask}
        if m.moce is None:
            logits = m.forward(batch, [])
        else:
            with routing_stats():
                logits = m.forward(batch, [clusters[i] for i in idx])
            domain = chunk[0]["source"]
            for record in pop_last_routing(m.model):
                load = (record.expert_load * record.group_tokens[:, None]).cpu().numpy()
                slots[domain][record.layer_index] = slots[domain].get(record.layer_index, 0) + load
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), target[:, 1:].flatten(),
            reduction="none", ignore_index=-100).view(len(seqs), -1)
        valid = target[:, 1:] != -100
        for i, row, n, v in zip(idx, chunk, nll, valid):
            row_nll[i], row_tokens[i] = float(n[v].sum()), int(v.sum())
            sums[row["source"]] += row_nll[i]
            counts[row["source"]] += row_tokens[i]
    loss = {d: {"loss": sums[d] / counts[d], "ppl": math.exp(sums[d] / counts[d]),
                "tokens": counts[d]} for d in DOMAINS if counts[d]}
    per_row = {"id": [row_id(r) for r in rows], "domain": [r["source"] for r in rows],
               "nll": row_nll, "tokens": row_tokens}
    return loss, per_row, (dict(slots) if m.moce is not None else None)


def gsm8k_exact_match(m: LoadedRun, rows: list[dict], clusters: list[int], max_new_tokens: int,
                      batch_size: int = 20) -> dict[str, Any]:
    hits, per_row, samples = 0, [], []
    for start in tqdm(range(0, len(rows), batch_size), desc="gsm8k generation"):
        chunk = rows[start:start + batch_size]
        outs = m.generate([alpaca_prompt(r) for r in chunk], clusters[start:start + batch_size],
                          max_new_tokens)
        for row, out in zip(chunk, outs):
            gold, pred = final_number(row["output"]), final_number(out)
            per_row.append(int(pred is not None and pred == gold))
            hits += per_row[-1]
            if len(samples) < 3:
                samples.append({"question": row["instruction"][:200], "output": out[:400],
                                "gold": gold, "pred": pred})
    return {"exact_match": hits / max(len(rows), 1), "n": len(rows), "hits": per_row,
            "ids": [row_id(r) for r in rows], "samples": samples}


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits (0 = same usage, 1 = disjoint experts)."""
    p, q = p / p.sum(), q / q.sum()
    mid = (p + q) / 2

    def kl(a: np.ndarray, b: np.ndarray) -> float:
        nz = a > 0
        return float((a[nz] * np.log2(a[nz] / b[nz])).sum())

    return 0.5 * kl(p, mid) + 0.5 * kl(q, mid)


def expert_usage(slots: dict[str, dict[int, np.ndarray]], rows: list[dict],
                 clusters: list[int], groups: int) -> dict[str, Any]:
    """Per domain: rows per group, and the per-layer share of routing slots over all C x E
    experts (all prompt and answer tokens of the held-out rows)."""
    result: dict[str, Any] = {"per_domain": {}}
    for domain in DOMAINS:
        per_group = np.bincount([c for r, c in zip(rows, clusters) if r["source"] == domain],
                                minlength=groups)
        own = int(np.argmax(per_group))
        layers = slots[domain]
        share = {i: v / max(v.sum(), 1e-12) for i, v in layers.items()}
        # max expert load / uniform load inside the domain's main group (1 = balanced)
        imbalance = [float(v[own].max() / max(v[own].mean(), 1e-12)) for v in layers.values()]
        result["per_domain"][domain] = {
            "rows_per_group": per_group.tolist(),
            "main_group": own,
            "main_group_share": float(per_group[own] / max(per_group.sum(), 1)),
            "imbalance": float(np.mean(imbalance)),
            "expert_load_by_layer": {str(i): v.tolist() for i, v in sorted(share.items())},
        }
    pairs = [(a, b) for i, a in enumerate(DOMAINS) for b in DOMAINS[i + 1:]]
    result["domain_js"] = {
        f"{a}|{b}": float(np.mean([js_divergence(slots[a][i].ravel() + 1e-12,
                                                 slots[b][i].ravel() + 1e-12)
                                   for i in slots[a]]))
        for a, b in pairs
    }
    return result


def _eval_rows(s: Settings) -> list[dict]:
    rows = read_jsonl(HELDOUT_FILE)
    return [r for d in DOMAINS for r in [x for x in rows if x["source"] == d][:s.eval_per_domain]]


def evaluate(run: Run, s: Settings, model_dir: Path | None = None,
             loss_only: bool = False) -> dict[str, Any]:
    """Held-out metrics of the run's model (or of ``model_dir``, e.g. a checkpoint);
    ``loss_only`` skips routing statistics and generation (checkpoint curves)."""
    torch.manual_seed(0)
    t0 = time.time()
    heldout = _eval_rows(s)
    m = LoadedRun(run, s, model_dir)
    clusters = m.clusters(heldout)
    metrics: dict[str, Any] = {"run": run.name, "label": run.label}
    metrics["loss"], metrics["rows"], slots = answer_loss(m, heldout, clusters)
    if loss_only:
        metrics["eval_seconds"] = time.time() - t0
        return metrics
    if slots is not None:
        metrics["groups"] = m.moce.config.groups
        metrics["usage"] = expert_usage(slots, heldout, clusters, metrics["groups"])
    gsm = [(r, c) for r, c in zip(heldout, clusters) if r["source"] == "gsm8k"]
    gsm = gsm[: s.gsm8k_generate]
    metrics["gsm8k"] = gsm8k_exact_match(m, [r for r, _ in gsm], [c for _, c in gsm],
                                         s.max_new_tokens)
    metrics["eval_seconds"] = time.time() - t0
    return metrics
