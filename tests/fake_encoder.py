"""A cheap deterministic sentence encoder for clustering tests."""

from __future__ import annotations

import hashlib

import numpy as np


class BagEncoder:
    """Sum of per-word pseudo-random vectors (seeded by sha256): texts sharing words land
    close, so k-means finds real structure, and equal texts always embed equally."""

    signature = "bag-of-words-test-encoder-v1"

    def __init__(self, dim: int = 24) -> None:
        self.dim = dim
        self.batch_size = 64

    def _word(self, word: str) -> np.ndarray:
        seed = int(hashlib.sha256(word.lower().encode()).hexdigest()[:8], 16)
        return np.random.default_rng(seed).normal(size=self.dim)

    def encode(self, texts: list[str]) -> np.ndarray:
        out = [sum((self._word(w) for w in t.split()), np.zeros(self.dim)) for t in texts]
        return np.asarray(out, np.float32)
