"""MoCE exports served by vLLM (the plugin in moce_plugin/outputs/vllm_*.py): offline `LLM`
greedy generations equal the Hugging Face-loaded export's for every cluster, automatic
per-request clusters in a batch mixing three domains (prefilled in chunks, decoded together),
top-1 + (V), top-2 and soft routing; the OpenAI client against `vllm serve`. vLLM runs in its own
environment (`.venv-vllm`, `bash scripts/install.sh --vllm`)."""

from __future__ import annotations

import json

import pytest
import torch
from hf_native_helpers import CFG, PROMPTS
from vllm_helpers import build_exports, require_vllm, run_vllm

from moce_plugin.model.config import MoCEConfig

NEW_TOKENS = 6
CONFIGS = {
    "topk_v": CFG,  # top-1 of 2 experts per group + 1 general expert (the (V) variant)
    "soft": MoCEConfig(num_clusters=3, experts_per_group=2, top_k="soft", adapter_dim=8),
    # top-2 of 4: decode steps of one request take the "gather" plan, of several "dense"
    "top2": MoCEConfig(num_clusters=3, experts_per_group=4, top_k=2, adapter_dim=8),
}

pytestmark = pytest.mark.slow

OFFLINE = """
import json, sys
from vllm import LLM, SamplingParams

def main(runs, prompts, new_tokens):
    results = {}
    for name, run in runs.items():
        # Eager runs: a token budget of 16 per step, every prompt prefilled in chunks beside
        # other requests' decode steps (continuous batching at its most mixed).
        llm = LLM(model=run["path"], dtype="float32", max_model_len=256,
                  enforce_eager=run["eager"], enable_chunked_prefill=True,
                  max_num_batched_tokens=run["budget"], max_num_seqs=16)
        greedy = dict(max_tokens=new_tokens, temperature=0)
        explicit = [(p, c) for p in range(len(prompts)) for c in range(3)]
        outs = llm.generate([prompts[p] for p, _ in explicit],
                            [SamplingParams(**greedy, extra_args={"moce_cluster": c})
                             for _, c in explicit])
        auto = llm.generate(prompts, SamplingParams(**greedy))
        results[name] = {
            "explicit": {f"{p},{c}": list(o.outputs[0].token_ids)
                         for (p, c), o in zip(explicit, outs)},
            "auto": [list(o.outputs[0].token_ids) for o in auto],
            "eager": llm.llm_engine.vllm_config.model_config.enforce_eager,
        }
        del llm
    print(json.dumps(results))

if __name__ == "__main__":
    main(json.loads(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3]))
"""


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    require_vllm()
    return build_exports(tmp_path_factory.mktemp("vllm"), CONFIGS)


def hf_reference(dest) -> dict:
    """Greedy tokens of the export loaded by AutoModelForCausalLM (trust_remote_code)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(dest, trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(dest, trust_remote_code=True)
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)
    explicit, auto = {}, []
    with torch.no_grad():
        for p, prompt in enumerate(PROMPTS):
            enc = tok([prompt], return_tensors="pt")
            n = enc["input_ids"].shape[1]
            for c in range(3):
                out = model.generate(**enc, moce_cluster_ids=[c], **kwargs)
                explicit[f"{p},{c}"] = out[0, n:].tolist()
            auto.append(model.generate(**enc, **kwargs)[0, n:].tolist())
    return {"explicit": explicit, "auto": auto}


def test_offline_llm_equals_the_hf_export_for_every_cluster_and_routing(exports, tmp_path):
    """Every routing eagerly; top-2 also compiled by vLLM (the plugin lets it compile on the
    CPU), with a budget of 64 tokens a step, so one traced graph runs the prefill's sorted
    plans and the decode steps' gather and dense plans."""
    from moce_plugin.clustering import ClusterModel

    runs = {name: {"path": str(path), "eager": True, "budget": 16}
            for name, path in exports.items()}
    runs["top2_compiled"] = {"path": str(exports["top2"]), "eager": False, "budget": 64}
    script = tmp_path / "offline.py"
    script.write_text(OFFLINE)
    proc = run_vllm(script, tmp_path, json.dumps(runs), json.dumps(PROMPTS), str(NEW_TOKENS))
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["top2_compiled"]["eager"] is False  # compiled: the plugin did not force eager
    for name in runs:
        dest = exports[name.removesuffix("_compiled")]
        want = hf_reference(dest)
        clusters = ClusterModel.load(dest / "cluster_artifact").assign_requests(PROMPTS).tolist()
        assert sorted(clusters) == [0, 1, 2]  # three domains, three clusters
        # the clusters matter: some prompt generates differently in another cluster
        assert any(len({str(want["explicit"][f"{p},{c}"]) for c in range(3)}) > 1
                   for p in range(len(PROMPTS))), name
        assert got[name]["explicit"] == want["explicit"], name
        assert got[name]["auto"] == want["auto"], name
        assert got[name]["auto"] == [want["explicit"][f"{p},{c}"]
                                     for p, c in enumerate(clusters)], name


def test_vllm_serve_answers_the_openai_client_with_per_domain_clusters(exports, tmp_path):
    import os

    from openai import OpenAI
    from vllm_helpers import VLLM_ENV

    from bench.bench_vllm import Server
    from bench.launch import free_port
    from moce_plugin.clustering import ClusterModel

    dest = exports["topk_v"]
    expected = ClusterModel.load(dest / "cluster_artifact").assign_requests(PROMPTS).tolist()
    port = free_port()
    vllm = require_vllm().parent / "vllm"
    log_path = tmp_path / "serve.log"
    env = {**os.environ, **VLLM_ENV, "MOCE_LOG_CLUSTERS": "1"}
    # no MoCE flag: the plugin does the rest; the server is ready when /health answers
    server = Server([str(vllm), "serve", str(dest), "--host", "127.0.0.1", "--port", str(port),
                     "--dtype", "float32", "--max-model-len", "256"], env, log_path, port,
                    ready_s=600)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                        timeout=300, max_retries=0)
        for prompt in PROMPTS:
            reply = client.chat.completions.create(
                model=str(dest), messages=[{"role": "user", "content": prompt}], max_tokens=4,
                temperature=0)
            assert reply.choices[0].message.role == "assistant"
            assert reply.usage.completion_tokens == 4
        stream = client.chat.completions.create(
            model=str(dest), messages=[{"role": "user", "content": PROMPTS[1]}], max_tokens=4,
            temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        forced = client.completions.create(model=str(dest), prompt=PROMPTS[0], max_tokens=4,
                                           temperature=0,
                                           extra_body={"vllm_xargs": {"moce_cluster": 2}})
        assert forced.usage.completion_tokens == 4
    finally:
        server.stop()
    log = log_path.read_text()
    for prompt, cluster in zip(PROMPTS, expected):
        assert f"moce cluster {cluster} <- {prompt[:80]!r}" in log, log[-4000:]
    assert log.count(f"moce cluster {expected[1]} <- {PROMPTS[1][:80]!r}") == 2  # + streamed
    assert "moce cluster 2 <- moce_cluster=2" in log


def test_vllm_refuses_an_export_with_a_damaged_expert(exports, tmp_path):
    """vLLM runs the export's weight check before loading: NaN in one expert is refused,
    naming the tensor, as with AutoModelForCausalLM (tests/unit/test_export_weights.py)."""
    import os
    import shutil
    import subprocess

    from safetensors.torch import load_file, save_file
    from vllm_helpers import VLLM_ENV

    dest = tmp_path / "damaged"
    shutil.copytree(exports["soft"], dest)
    tensors = load_file(dest / "model.safetensors")
    name = next(k for k in sorted(tensors) if ".moce_experts." in k)
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    script = tmp_path / "load.py"
    script.write_text("from vllm import LLM\n\nif __name__ == '__main__':\n"
                      f"    LLM(model={str(dest)!r}, dtype='float32', max_model_len=64, "
                      "enforce_eager=True)\n")
    proc = subprocess.run([str(require_vllm()), str(script)], cwd=tmp_path,
                          env={**os.environ, **VLLM_ENV}, capture_output=True, text=True,
                          timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode != 0
    assert name in proc.stderr + proc.stdout, (proc.stderr + proc.stdout)[-4000:]
