"""Put on PYTHONPATH of a launched stage-1 process (see tests/e2e/test_cluster_distributed.py):
with MOCE_TEST_ENCODER=bag, the sentence-transformers encoder the CLI builds is replaced by the
cheap deterministic ``BagEncoder``; with MOCE_TEST_KILL_RANK=r and MOCE_TEST_KILL_AFTER=n, rank r
SIGKILLs itself on its (n+1)-th encode call, i.e. after n batches (shards) are in the cache."""

from __future__ import annotations

import os
import signal

if os.environ.get("MOCE_TEST_ENCODER") == "bag":
    from fake_encoder import BagEncoder

    import moce_plugin.clustering.encode as _encode

    class _LaunchedBagEncoder(BagEncoder):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__()
            self.calls = 0
            kill_rank = os.environ.get("MOCE_TEST_KILL_RANK")
            self.kill_after = (
                int(os.environ["MOCE_TEST_KILL_AFTER"])
                if kill_rank is not None and kill_rank == os.environ.get("RANK", "0")
                else None
            )

        def encode(self, texts):
            if self.kill_after is not None and self.calls >= self.kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
            self.calls += 1
            return super().encode(texts)

    _encode.SentenceTransformerEncoder = _LaunchedBagEncoder
