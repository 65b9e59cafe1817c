"""Plants the layer / loss bugs that once survived the suite (issue 17, item 11) one at a time
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
     "probs, chosen, safe_groups, valid, self.num_groups",
     "probs, chosen, safe_groups, torch.ones_like(valid), self.num_groups",
     "tests/unit/test_layer.py -k aux_loss_value"),
    ("per-group loss averaged plainly, not token-weighted", "moce_plugin/model/losses.py",
     "loss = (per_group * tokens).sum() / tokens.sum().clamp(min=1.0)",
     "loss = per_group[tokens > 0].mean()",
     "tests/unit/test_layer.py -k aux_loss_value"),
    ("top-1 weight renormalised to 1", "moce_plugin/model/layer.py",
     "    if top_k > 1:\n        # Renormalised", "    if top_k >= 1:\n        # Renormalised",
     "tests/unit/test_layer.py -k 'fast_equals_naive and top1'"),
]


def run(name: str, rel: str, old: str, new: str, tests: str) -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "repo"
        shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".venv", ".git", "outputs"))
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
