"""lm-evaluation-harness model class for MoCE: every request gets its cluster from its
own context (through the model's cluster artifact, by the request-text rule of training), and
requests are scored in batches of one cluster at a time. A context that lm-eval rendered with
the chat template (``--apply_chat_template``) is clustered by its chat turns (user turns, as a
chat training row), not by the rendered string.

Python:
    from moce_plugin.lm_eval_model import MoCELM
    lm_eval.simple_evaluate(model=MoCELM(path="outputs/.../model"), tasks=["gsm8k"])
Command line (registers the model as `moce`, then runs lm_eval's own CLI):
    python -m moce_plugin lm-eval --model moce --model_args path=OUTPUT_DIR --tasks ...
"""

from __future__ import annotations

import logging
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ..clustering.text import Request
from ..model.routing import CLUSTER_IDS_KWARG
from .load import MoCEInferenceModel, load_moce_model

eval_logger = logging.getLogger("lm_eval.moce")


def pick_device(device: str | None) -> str:
    """As lm-eval's ``hf`` model: the requested device when it exists, else CUDA when there
    is one, else the CPU (lm-eval's CLI passes ``cuda:0`` unless ``--device`` is given)."""
    if device and not (str(device).startswith("cuda") and not torch.cuda.is_available()):
        return str(device)
    chosen = "cuda" if torch.cuda.is_available() else "cpu"
    if device:
        eval_logger.warning("device %r is not available; using %s", device, chosen)
    return chosen


@register_model("moce")
class MoCELM(HFLM):
    def __init__(
        self,
        path: str | None = None,
        moce: MoCEInferenceModel | None = None,
        cluster: int | None = None,
        base_model: str | None = None,
        device: str | None = None,
        batch_size: int | str = 8,
        **kwargs: Any,
    ) -> None:
        device = pick_device(device)
        if moce is None:
            if path is None:
                raise ValueError("MoCELM needs path=<MoCE output dir> (or moce=)")
            moce = load_moce_model(path, base_model=base_model, device=device)
        self.moce = moce
        self.forced_cluster = None if cluster is None else int(cluster)
        self._moce_cluster: int | None = None
        self._chats: dict[str, list[dict]] = {}  # rendered chat context -> its turns
        super().__init__(pretrained=moce.model, tokenizer=moce.tokenizer, device=device,
                         batch_size=batch_size, **kwargs)

    # ---- per-request clusters ---------------------------------------------------------
    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        rendered = super().apply_chat_template(chat_history, add_generation_prompt)
        self._chats[rendered] = [dict(m) for m in chat_history]
        return rendered

    def _clusters_of(self, contexts: Sequence[str]) -> list[int]:
        if self.forced_cluster is not None:
            return [self.forced_cluster] * len(contexts)
        requests: list[Request] = [self._chats.get(c, c) for c in contexts]
        return self.moce.assign_clusters(requests)

    def _by_cluster(self, requests: list, text_of: Callable[[Any], str], run: Callable) -> list:
        clusters = self._clusters_of([text_of(r) for r in requests])
        groups: dict[int, list[int]] = defaultdict(list)
        for i, c in enumerate(clusters):
            groups[c].append(i)
        results: list = [None] * len(requests)
        for cluster, indices in sorted(groups.items()):
            self._moce_cluster = cluster
            try:
                outs = run([requests[i] for i in indices])
            finally:
                self._moce_cluster = None
            for i, out in zip(indices, outs):
                results[i] = out
        return results

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return self._by_cluster(
            requests, lambda r: r.args[0],
            lambda reqs: super(MoCELM, self).loglikelihood(reqs, disable_tqdm=disable_tqdm))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return self._by_cluster(
            requests, lambda r: r.args[0],
            lambda reqs: super(MoCELM, self).loglikelihood_rolling(reqs,
                                                                   disable_tqdm=disable_tqdm))

    def generate_until(self, requests, disable_tqdm: bool = False):
        return self._by_cluster(
            requests, lambda r: r.args[0],
            lambda reqs: super(MoCELM, self).generate_until(reqs, disable_tqdm=disable_tqdm))

    def _cluster_tensor(self, batch: int) -> torch.Tensor:
        if self._moce_cluster is None:
            raise RuntimeError("MoCELM called the model outside a cluster group")
        return torch.full((batch,), self._moce_cluster, dtype=torch.long, device=self.device)

    # ---- model calls with cluster ids ----------------------------------------------------
    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        with torch.no_grad():
            return self.model(inps, **{CLUSTER_IDS_KWARG: self._cluster_tensor(inps.shape[0])}
                              ).logits

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs):
        generation_kwargs[CLUSTER_IDS_KWARG] = self._cluster_tensor(context.shape[0])
        return super()._model_generate(context, max_length, stop, **generation_kwargs)


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    sys.exit(cli_evaluate())


if __name__ == "__main__":
    main()
