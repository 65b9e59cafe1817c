"""What the reproduction runs are, where they live, and the axolotl config of each.

Every run trains SmolLM2-135M-Instruct on the same rows, in the same order, for the same
number of steps with the same optimiser; only the adapter / MoCE block differs.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
WORK = Path(os.environ.get("MOCE_REPRODUCE_DIR", ROOT / "outputs" / "reproduce"))
DATA_DIR = WORK / "data"
TRAIN_FILE = DATA_DIR / "train.jsonl"
HELDOUT_FILE = DATA_DIR / "heldout.jsonl"
CLUSTERS = WORK / "clusters"
RUNS_DIR = WORK / "runs"
SETTINGS_FILE = WORK / "settings.json"
DEFAULT_BASE_MODEL = ROOT / "examples" / "models" / "SmolLM2-135M-Instruct"
DOMAINS = ("alpaca", "code_alpaca", "gsm8k")
DOMAIN_NAMES = {"alpaca": "general (Alpaca)", "code_alpaca": "code (Code Alpaca)",
                "gsm8k": "math (GSM8K)"}
ENV = {"AXOLOTL_DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}


@dataclass
class Settings:
    """Sizes shared by every run; written once by prepare.py so all runs agree."""

    train_per_domain: int = 200
    heldout_per_domain: int = 60   # rows held out (never trained on)
    eval_per_domain: int = 60      # of which scored by held-out answer loss (was 20)
    gsm8k_generate: int = 20       # held-out GSM8K questions answered by greedy generation
    max_new_tokens: int = 160
    max_chars: int = 1500          # skip very long rows: keeps CPU steps short
    steps: int = 40
    sequence_len: int = 512
    micro_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-3
    experts_per_group: int = 4
    adapter_dim: int = 64
    lora_r: int = 64
    seed: int = 0
    base_model: str = str(DEFAULT_BASE_MODEL)
    data_dir: str = str(ROOT.parent / "shared" / "data")

    def save(self) -> None:
        WORK.mkdir(parents=True, exist_ok=True)
        SETTINGS_FILE.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls) -> Settings:
        if not SETTINGS_FILE.is_file():
            raise SystemExit(
                f"{SETTINGS_FILE} not found: run `python -m studies.moce_repro.prepare` first."
            )
        return cls(**json.loads(SETTINGS_FILE.read_text()))


@dataclass(frozen=True)
class Run:
    name: str
    label: str
    kind: str                       # "base" | "lora" | "moce"
    moce: dict[str, Any] | None = None
    clustered: bool = True          # MoCE runs: use the cluster artifact (else one group)
    experts: int | None = None      # unclustered runs: experts in the one group (None: C x E)
    steps_multiplier: int = 1       # x Settings.steps
    curve_points: int = 0           # > 0: held-out loss at this many checkpoints (curve)
    seed: int | None = None         # None: the original single-seed runs (axolotl seed 42)

    @property
    def config(self) -> str:
        """The run definition without its seed: what seeds are pooled over."""
        return self.name.split("@", 1)[0]

    def with_seed(self, seed: int) -> Run:
        return replace(self, name=f"{self.config}@s{seed}", seed=seed)


# Runs of the seeded study; "@sN" after a name picks seed N (run directory "moce@s1").
SEEDS = (1, 2, 3)
LONG_MULTIPLIER = 3
CURVE_POINTS = 6


# The paper's comparisons (Table 1) and ablations (Tables 3-4) at this scale. "moce" is also
# the E=4 point of the experts-per-group ablation; "moce_e1" (one expert per group, top-1)
# is both the E=1 point and "MoCE without token routing".
RUNS: dict[str, Run] = {r.name: r for r in [
    Run("base", "base model (no training)", "base"),
    Run("lora", "LoRA r=64, all linear layers", "lora"),
    Run("lora_mlp", "LoRA r=64, MLP only (gate/up/down)", "lora"),
    Run("pesc", "PESC: one group of C*E experts, top-2 (no clustering)", "moce",
        {"top_k": 2}, clustered=False),
    Run("moce", "MoCE: C groups (elbow) x 4 experts, top-2", "moce", {"top_k": 2}),
    Run("moce_v", "MoCE (V): + 4 general experts, top-2", "moce",
        {"top_k": 2, "num_general_experts": 4, "general_top_k": 2}),
    Run("moce_top1", "MoCE, top-1", "moce", {"top_k": 1}),
    Run("moce_soft", "MoCE, soft merging", "moce", {"top_k": "soft"}),
    Run("moce_e1", "MoCE, 1 expert per group (no token routing)", "moce",
        {"experts_per_group": 1, "top_k": 1}),
    Run("moce_e2", "MoCE, 2 experts per group, top-2", "moce",
        {"experts_per_group": 2, "top_k": 2}),
    Run("moce_acmoe", "MoCE, ACMoE router, top-2", "moce", {"top_k": 2, "router": "acmoe"}),
    # The paper's PESC baseline (Camelidae style): a few experts, top-2, same adapter dim,
    # so that MoCE has more adapter parameters than PESC, as in the paper.
    Run("pesc8", "PESC (Camelidae): 8 experts, top-2", "moce", {"top_k": 2},
        clustered=False, experts=8),
    Run("pesc4", "PESC: 4 experts, top-2", "moce", {"top_k": 2}, clustered=False, experts=4),
    # Hypothesis: MoCE loses to PESC because a token picks its pair among E experts of its
    # group (6 pairs) instead of C x E (66 pairs). Each group gets C x E experts here.
    Run("moce_pairs", "MoCE, C groups x (C*E) experts, top-2 (as many pairs as PESC)", "moce",
        {"top_k": 2, "experts_per_group": "CxE"}),
    # Longer training, held-out loss at intermediate checkpoints.
    Run("lora_mlp_long", f"LoRA r=64, MLP only, {LONG_MULTIPLIER}x steps", "lora",
        steps_multiplier=LONG_MULTIPLIER, curve_points=CURVE_POINTS),
    Run("pesc_long", f"PESC: C*E experts, top-2, {LONG_MULTIPLIER}x steps", "moce",
        {"top_k": 2}, clustered=False, steps_multiplier=LONG_MULTIPLIER,
        curve_points=CURVE_POINTS),
    Run("moce_long", f"MoCE: C x 4 experts, top-2, {LONG_MULTIPLIER}x steps", "moce",
        {"top_k": 2}, steps_multiplier=LONG_MULTIPLIER, curve_points=CURVE_POINTS),
]}

# Named sets of runs for `run.py <group>`; "study" is every run of the seeded study.
GROUPS: dict[str, list[str]] = {
    "main3": [f"{c}@s{s}" for s in SEEDS for c in ("lora_mlp", "pesc", "moce")],
    "paper": [f"{c}@s{s}" for s in SEEDS for c in ("pesc8", "pesc4")],
    "hypothesis": [f"moce_pairs@s{s}" for s in SEEDS],
    "long": [f"{c}@s{s}" for s in SEEDS for c in ("lora_mlp_long", "pesc_long", "moce_long")],
}
GROUPS["study"] = [n for g in ("main3", "paper", "hypothesis", "long") for n in GROUPS[g]]
_SEEDED = re.compile(r"^(?P<config>[a-z0-9_]+)@s(?P<seed>\d+)$")


def get_run(name: str) -> Run:
    """A run by name: a RUNS key, or ``<key>@s<N>`` for seed N."""
    if name in RUNS:
        return RUNS[name]
    match = _SEEDED.match(name)
    if match and match["config"] in RUNS:
        run = RUNS[match["config"]]
        if run.kind == "base":
            raise SystemExit(f"run {name!r}: the base model is not trained, it has no seed")
        return run.with_seed(int(match["seed"]))
    raise SystemExit(f"unknown run {name!r}; choose from {list(RUNS)} (add @s<N> for seed N), "
                     f"a group {list(GROUPS)} or 'all'")


def run_dir(run: Run) -> Path:
    return RUNS_DIR / run.name


def num_clusters() -> int:
    meta = json.loads((CLUSTERS / "metadata.json").read_text())
    return int(meta["num_clusters"])


def cpu_settings() -> dict[str, Any]:
    return dict(attn_implementation="sdpa", bf16=False, fp16=False, tf32=False,
                lora_mlp_kernel=False, lora_qkv_kernel=False, lora_o_kernel=False,
                lora_embedding_kernel=False)


def train_config(run: Run, s: Settings) -> dict[str, Any]:
    """The axolotl YAML (as a dict) of one training run."""
    out = run_dir(run)
    steps = s.steps * run.steps_multiplier
    cfg: dict[str, Any] = dict(
        base_model=s.base_model,
        datasets=[dict(path=str(TRAIN_FILE), type="alpaca", ds_type="json")],
        dataset_prepared_path=str(out / "prepared"),  # per run: runs may go in parallel
        val_set_size=0,
        output_dir=str(out / "model"),
        sequence_len=s.sequence_len,
        sample_packing=True,
        micro_batch_size=s.micro_batch_size,
        gradient_accumulation_steps=s.gradient_accumulation_steps,
        max_steps=steps,
        learning_rate=s.learning_rate,
        optimizer="adamw_torch",
        lr_scheduler="cosine",
        warmup_steps=max(1, steps // 20),
        logging_steps=1,
        # Checkpoints let an interrupted run resume; only the newest is kept, except for
        # curve runs, whose checkpoints are scored on the held-out rows after training.
        save_steps=max(1, steps // (run.curve_points or 4)),
        # (axolotl turns an unset limit into 4, so curve runs name theirs).
        save_total_limit=run.curve_points + 1 if run.curve_points else 1,
        auto_resume_from_checkpoints=True,
        # axolotl's seed shuffles the data and seeds the trainer (sampler order); the
        # adapter init is seeded by moce.init_seed, LoRA's by seeded_train.py.
        seed=42 if run.seed is None else run.seed,
        dataloader_num_workers=0,
    )
    import torch

    if not torch.cuda.is_available():
        cfg.update(cpu_settings())
    else:
        cfg.update(bf16="auto", attn_implementation="sdpa")
    if run.kind == "lora":
        cfg.update(adapter="lora", lora_r=s.lora_r, lora_alpha=s.lora_r, lora_dropout=0.0)
        if run.config.startswith("lora_mlp"):  # the same layers MoCE adapts
            cfg.update(lora_target_modules=["gate_proj", "up_proj", "down_proj"])
        else:
            cfg.update(lora_target_linear=True)
    elif run.kind == "moce":
        cfg.update(plugins=["moce_plugin.MoCEPlugin"], moce=moce_block(run, s, num_clusters()))
    else:
        raise ValueError(f"run {run.name} does not train")
    return cfg


def clustering_settings(s: Settings) -> dict[str, Any]:
    """The `moce.clustering` block stage 1 runs with; every clustered run's YAML carries the
    same, as training refuses an artifact made with other settings."""
    return dict(k_max=8, seed=s.seed)


def moce_block(run: Run, s: Settings, k: int) -> dict[str, Any]:
    """The `moce:` block of a MoCE/PESC run, with k clusters."""
    moce = dict(experts_per_group=s.experts_per_group, adapter_dim=s.adapter_dim,
                adapter_scaling=1.0, adapter_activation="sigmoid", router_aux_loss_coef=0.01)
    moce.update(run.moce or {})
    if moce["experts_per_group"] == "CxE":  # as many experts per group as PESC in all
        moce["experts_per_group"] = k * s.experts_per_group
    if run.seed is not None:
        moce["init_seed"] = run.seed
    if run.clustered:
        moce.update(num_clusters=k, cluster_artifact=str(CLUSTERS),
                    clustering=clustering_settings(s))
    else:  # PESC: one group, C x E experts (same as MoCE in all) unless `experts` says
        moce.update(num_clusters=1,
                    experts_per_group=run.experts or k * moce["experts_per_group"])
    return moce


def adapter_params(moce: dict[str, Any], hidden: int, layers: int) -> int:
    """Trainable parameters of a `moce:` block (moce_plugin.model.layer.MoCEExperts): per
    layer a router row and a down + up adapter per expert; general experts likewise."""
    grouped = moce["num_clusters"] * moce["experts_per_group"]
    general = moce.get("num_general_experts", 0)
    per_layer = (grouped + general) * hidden * (1 + 2 * moce["adapter_dim"])
    return layers * per_layer


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
