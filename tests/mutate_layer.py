"""Plants the layer / loss bugs that once survived the suite, one at a time
in a scratch copy of the repository and checks that the named tests fail.

    python tests/mutate_layer.py          # all of them; prints caught / missed, exit 1 if missed
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (what, file, original text, planted text, tests that must catch it)
MUTANTS = [
    ("adapter scaling doubled in the layer", "moce_plugin/model/layer.py",
     "self.scaling = config.adapter_scaling", "self.scaling = 2 * config.adapter_scaling",
     "tests/unit/test_layer.py::test_fast_equals_naive_forward_and_grad"),
    ("balancing loss counts padding (all-ones mask)", "moce_plugin/model/layer.py",
     "routing.chosen, safe_groups, valid, self.num_groups",
     "routing.chosen, safe_groups, torch.ones_like(valid), self.num_groups",
     "tests/unit/test_layer.py -k aux_loss_value"),
    ("per-group loss averaged plainly, not token-weighted", "moce_plugin/model/losses.py",
     "loss = (per_group * tokens).sum() / tokens.sum().clamp(min=1.0)",
     "loss = per_group[tokens > 0].mean()",
     "tests/unit/test_layer.py -k aux_loss_value"),
    ("top-1 weight renormalised to 1", "moce_plugin/model/plans.py",
     "    if top_k > 1:\n        # Renormalised", "    if top_k >= 1:\n        # Renormalised",
     "tests/unit/test_layer.py -k 'fast_equals_naive and top1'"),
    # The plan registry and the dispatch step: each registered plan against the eager one.
    ("set plan drops the padding mask", "moce_plugin/model/plans.py",
     "return BlockCall(groups * subsets.shape[0] + subset, members, weights * mask)",
     "return BlockCall(groups * subsets.shape[0] + subset, members, weights)",
     "tests/unit/test_plans.py -k 'equals_eager and sets'"),
    ("folded general weights not masked", "moce_plugin/model/plans.py",
     "weights = torch.cat([group_call.weights, routing.dense() * mask], 1)",
     "weights = torch.cat([group_call.weights, routing.dense()], 1)",
     "tests/unit/test_plans.py -k 'equals_eager and fold'"),
    ("general slots numbered from 0, not after the group experts", "moce_plugin/model/plans.py",
     "call = SlotCall(first + routing.experts(), routing.weights * mask)",
     "call = SlotCall(routing.experts(), routing.weights * mask)",
     "tests/unit/test_plans.py -k 'equals_eager and slots'"),
    ("bin offsets exclude the bin's last row", "moce_plugin/model/dispatch.py",
     "torch.arange(num_bins, device=bins.device),\n                              right=True)",
     "torch.arange(num_bins, device=bins.device),\n                              right=False)",
     "tests/unit/test_plans.py -k 'equals_eager or sort_by_bin'"),
    ("eager reference forgets the token's group", "moce_plugin/model/plans.py",
     "columns = groups[:, None] * E + torch.arange(E, device=h.device)",
     "columns = 0 * groups[:, None] + torch.arange(E, device=h.device)",
     "tests/unit/test_layer.py -k 'fast_equals_naive and eager'"),
    # The few-token inference path (decode steps).
    ("gather plan drops the padding mask", "moce_plugin/model/plans.py",
     "    weights = routing.weights * mask\n    if general is not None:",
     "    weights = routing.weights\n    if general is not None:",
     "tests/unit/test_decode.py -k 'inference_step_equals_eager'"),
    ("gather plan forgets the token's group", "moce_plugin/model/plans.py",
     "ids = groups[:, None] * experts.experts_per_group + routing.experts()",
     "ids = 0 * groups[:, None] + routing.experts()",
     "tests/unit/test_decode.py -k 'kv_cache and per-token'"),
    ("dense plan's cached down layout ignores in-place edits", "moce_plugin/model/layer.py",
     "key = (version, down.data_ptr()",
     "key = (None, down.data_ptr()",
     "tests/unit/test_decode.py -k dense_plan_follows"),
    ("few-token plan rule inverted", "moce_plugin/model/plans.py",
     'return "dense" if experts <= DENSE_SLOT_FACTOR * slots else "gather"',
     'return "gather" if experts <= DENSE_SLOT_FACTOR * slots else "dense"',
     "tests/unit/test_decode.py -k 'few_token_plan or inference_rule'"),
    ("CUDA dense bound off by one", "moce_plugin/model/plans.py",
     "tokens * experts * rank * hidden <= CUDA_DENSE_MAX_WORK",
     "tokens * experts * rank * hidden < CUDA_DENSE_MAX_WORK",
     "tests/unit/test_decode.py -k inference_rule_on_cuda"),
    ("CUDA dense bound forgets the hidden size", "moce_plugin/model/plans.py",
     "tokens * experts * rank * hidden <= CUDA_DENSE_MAX_WORK",
     "tokens * experts * rank <= CUDA_DENSE_MAX_WORK",
     "tests/unit/test_decode.py -k inference_rule_on_cuda"),
    ("CUDA dense bound counts slots, not tokens", "moce_plugin/model/plans.py",
     "tokens * experts * rank * hidden <= CUDA_DENSE_MAX_WORK",
     "slots * experts * rank * hidden <= CUDA_DENSE_MAX_WORK",
     "tests/unit/test_decode.py -k inference_rule_on_cuda"),
    ("layer asks the inference rule without its device", "moce_plugin/model/layer.py",
     "self.adapter_dim, self.hidden_size, h.device.type,",
     "self.adapter_dim, self.hidden_size,",
     "tests/unit/test_decode.py -k inference_rule"),
    ("layer never tells the inference rule of its general experts", "moce_plugin/model/layer.py",
     "general=self.num_general > 0)", "general=False)",
     "tests/unit/test_decode.py -k 'inference_rule or inference_step_equals_eager'"),
    ("CPU sorted-slots bound taken on every device", "moce_plugin/model/plans.py",
     'if device_type == "cpu" and tokens <= CPU_SLOTS_MAX_TOKENS_PER_EXPERT * experts:',
     "if tokens <= CPU_SLOTS_MAX_TOKENS_PER_EXPERT * experts:",
     "tests/unit/test_decode.py -k inference_rule"),
    ("CPU sorted-slots bound by slots per token, not experts", "moce_plugin/model/plans.py",
     'if device_type == "cpu" and tokens <= CPU_SLOTS_MAX_TOKENS_PER_EXPERT * experts:',
     'if device_type == "cpu" and tokens <= CPU_SLOTS_MAX_TOKENS_PER_EXPERT * slots_per_token:',
     "tests/unit/test_decode.py -k inference_rule"),
    ("layer gives the inference rule its group's experts only", "moce_plugin/model/layer.py",
     "inference_plan(h.shape[0], self.slots_per_token, self.down.shape[0],",
     "inference_plan(h.shape[0], self.slots_per_token, self.experts_per_group,",
     "tests/unit/test_decode.py -k inference_rule"),
    ("dense plan leaks unchosen experts", "moce_plugin/model/plans.py",
     "z = (z.view(tokens, total, rank) * dense[:, :, None])",
     "z = (z.view(tokens, total, rank) * dense[:, :, None].clamp(min=1e-3))",
     "tests/unit/test_decode.py -k 'inference_step_equals_eager and dense'"),
    ("cached cluster ids ignore in-place edits", "moce_plugin/model/routing.py",
     "key = (ids._version, tuple(batch_shape), device)",
     "key = (tuple(batch_shape), device)",
     "tests/unit/test_decode.py -k cluster_ids_are_resolved"),
    # Compiled inference (vLLM): ids from the persistent buffer, the plan chosen at run time.
    ("compiled inference bakes the traced size's plan", "moce_plugin/model/layer.py",
     "if plan is None and not torch.is_grad_enabled() and torch.compiler.is_compiling():",
     "if False:",
     "tests/unit/test_compiled_inference.py"),
    ("token-id buffer read from its end", "moce_plugin/model/layer.py",
     "ids = self.token_ids[: lead_shape.numel()]",
     "ids = self.token_ids[-lead_shape.numel():]",
     "tests/unit/test_compiled_inference.py"),
    ("a copied layer keeps the original's op key", "moce_plugin/model/layer.py",
     "        super().__setstate__(state)\n        self._register_for_op()",
     "        super().__setstate__(state)",
     "tests/unit/test_compiled_inference.py"),
]


def run(name: str, rel: str, old: str, new: str, tests: str) -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "repo"
        shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".venv", ".venv-vllm", ".git",
                                                                  "outputs"))
        target = copy / rel
        text = target.read_text()
        if old not in text:
            print(f"STALE  {name}: pattern not found in {rel}")
            return False
        target.write_text(text.replace(old, new, 1))
        env = dict(os.environ, PYTHONPATH=str(copy))
        cmd = f"{sys.executable} -m pytest -q -x -p no:cacheprovider {tests}"
        proc = subprocess.run(cmd, shell=True, cwd=copy, env=env, capture_output=True, text=True)
        caught = proc.returncode != 0
        print(f"{'caught' if caught else 'MISSED'} {name}")
        return caught


if __name__ == "__main__":
    results = [run(*m) for m in MUTANTS]
    print(f"{sum(results)} of {len(results)} planted bugs caught")
    sys.exit(0 if all(results) else 1)
