"""Test-only axolotl plugin: what every MoCE layer saw in each forward of a preference run.

A pre-hook on each MoCE layer records the cluster ids it ran with, whether grad was on (the
policy's forward) or off (the reference's), and the backbone's input_ids; the first
``MAX_FORWARDS`` forwards go to ``<output_dir>/preference_ids.pt``. At the start of training
the reference's logits on a probe batch are saved too, and again at the end, beside the
logits of the model as loaded (step 0): the reference must stay the step-0 model."""

from __future__ import annotations

from pathlib import Path

import torch
from axolotl.integrations.base import BasePlugin
from transformers import TrainerCallback

from moce_plugin.model.layer import MoCEMLP
from moce_plugin.model.routing import current_cluster_ids

MAX_FORWARDS = 6
PROBE_IDS = torch.arange(4, 28).view(2, 12)
PROBE_CLUSTERS = torch.tensor([[0] * 12, [2] * 12])


def _reference_logits(trainer) -> torch.Tensor:
    """The logits of whatever TRL uses as the reference, called the way TRL calls it."""
    from trl.trainer.utils import use_adapter

    model = trainer.model
    with torch.no_grad():
        if trainer.ref_model is None:
            unwrapped = trainer.accelerator.unwrap_model(model)
            with use_adapter(unwrapped, adapter_name=None):
                return model(input_ids=PROBE_IDS, moce_cluster_ids=PROBE_CLUSTERS).logits.float()
        return trainer.ref_model(input_ids=PROBE_IDS,
                                 moce_cluster_ids=PROBE_CLUSTERS).logits.float()


class _Probe(TrainerCallback):
    def __init__(self, plugin, out: Path) -> None:
        self.plugin = plugin
        self.out = out

    def on_train_end(self, args, state, control, **kwargs):
        self.plugin.flush(self.out)
        trainer = self.plugin.trainer
        if not hasattr(trainer, "ref_model"):  # ORPO: no reference
            return control
        torch.save(_reference_logits(trainer), self.out / "ref_logits_end.pt")
        return control


class PreferenceIdsPlugin(BasePlugin):
    def __init__(self):
        super().__init__()
        self.forwards: list[dict] = []
        self.current: dict | None = None
        self.trainer = None

    def post_model_load(self, cfg, model):
        was = model.training
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=PROBE_IDS, moce_cluster_ids=PROBE_CLUSTERS).logits
        model.train(was)
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        torch.save(logits.float(), Path(cfg.output_dir) / "start_logits.pt")

    def post_trainer_create(self, cfg, trainer):
        self.trainer = trainer
        ref = getattr(trainer, "ref_model", None)
        models = [trainer.model] + ([ref] if ref is not None else [])
        for model in models:
            backbone = next(m for m in model.modules() if hasattr(m, "_moce_config"))
            backbone.register_forward_pre_hook(self._on_backbone, with_kwargs=True)
            for name, module in model.named_modules():
                if isinstance(module, MoCEMLP):
                    module.register_forward_pre_hook(
                        lambda m, a, _n=name: self._on_layer(_n))

    def add_callbacks_post_trainer(self, cfg, trainer):
        return [_Probe(self, Path(cfg.output_dir))]

    def _on_backbone(self, module, args, kwargs):
        if len(self.forwards) >= MAX_FORWARDS or not module.training and torch.is_grad_enabled():
            self.current = None
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.current = {"grad": torch.is_grad_enabled(), "input_ids": ids.detach().cpu(),
                        "attention_mask": kwargs["attention_mask"].detach().cpu(),
                        "layers": {}}
        self.forwards.append(self.current)

    def _on_layer(self, name):
        if self.current is not None:
            self.current["layers"][name] = current_cluster_ids().detach().cpu().clone()

    def flush(self, out: Path) -> None:
        torch.save(self.forwards, out / "preference_ids.pt")
