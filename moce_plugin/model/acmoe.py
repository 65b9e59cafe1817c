"""ACMoE adaptive-clustering router transform (Nielsen et al., ICLR 2025, Def. 1-2, Thm. 1).

Each expert k defines a cluster: the tokens routed to it. Feature q gets the weight
``m_qk ~ 1 / s_qk`` where ``s_qk`` is the dispersion of feature q among the cluster's tokens,
so features along which an expert's tokens cluster tightly count more. A token previously
assigned to expert k is routed on ``M_k x`` instead of ``x`` (``M_k = diag(m_.k)``): the
router's projection then works in a space where clusters are better separated.

Choices where the paper leaves freedom (documented in docs/acmoe.md):

* dispersion: mean absolute deviation per feature (the authors' implementation; Theorem 1's
  pairwise mean absolute difference is twice the MAD up to a constant for symmetric data);
* clusters live inside a MoCE group: expert ``e`` of group ``c`` is cluster ``(c, e)``;
* the assignment is the token's top-1 expert in the previous converted MoCE layer; the first
  converted layer has no previous one and routes with the plain linear router;
* statistics are estimated on the current batch's real tokens (padding and packing gaps are
  excluded), blended into a running estimate (EMA) that eval/generation use and that clusters
  with fewer than 2 tokens in a batch fall back to; all of it under ``no_grad`` (the weights
  are a stop-gradient transform, as in the paper);
* ``eps`` is relative to the mean dispersion (scale-free for hidden states of any size);
  weights are clipped at ``clamp`` times their mean and normalised to mean 1.
"""

from __future__ import annotations

import torch


def cluster_mad(
    x: torch.Tensor, clusters: torch.Tensor, valid: torch.Tensor, num_clusters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster, per-feature mean absolute deviation of ``x`` [T, d].

    Returns (mad [K, d], counts [K]); clusters without real tokens get mad 0, count 0.
    """
    x = x.detach().float()
    d = x.shape[-1]
    w = valid.to(x.dtype)
    onehot = torch.zeros(x.shape[0], num_clusters, dtype=x.dtype, device=x.device)
    onehot.scatter_(1, clusters.clamp(0, num_clusters - 1)[:, None], 1.0)
    onehot = onehot * w[:, None]
    counts = onehot.sum(0)  # [K]
    denom = counts.clamp(min=1.0)[:, None]
    mean = onehot.T @ x / denom  # [K, d]
    dev = (x - mean.index_select(0, clusters.clamp(0, num_clusters - 1))).abs()
    mad = onehot.T @ dev / denom
    assert mad.shape == (num_clusters, d)
    return mad, counts


def feature_weights(mad: torch.Tensor, eps: float, clamp: float) -> torch.Tensor:
    """``M`` as a [K, d] matrix of per-cluster feature weights (Definition 1)."""
    scale = mad.mean().clamp(min=1e-12)
    w = 1.0 / (mad + eps * scale)
    w = torch.minimum(w, clamp * w.mean())
    return w / w.mean()


def transform(x: torch.Tensor, weights: torch.Tensor, clusters: torch.Tensor) -> torch.Tensor:
    """Row t of ``x`` scaled by its cluster's feature weights: ``M_{k(t)} x_t``."""
    return x * weights.index_select(0, clusters).to(x.dtype)
