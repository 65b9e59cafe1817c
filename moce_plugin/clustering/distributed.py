"""Stage 1 on several processes: ``accelerate launch -m moce_plugin.clustering.cli CFG``.

Each rank embeds its share of the distinct texts into the shared embedding cache, the ranks
meet, rank 0 fits k-means on every row (read back from the cache in the rows' own order, so
the artifact does not depend on the number of ranks) and writes the artifact once; the other
ranks wait for it. A one-process run never touches ``torch.distributed``.

The rank layout comes from the variables every torch launcher sets (``accelerate launch``,
``torchrun``): ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .errors import ClusteringError

#: How long a rank waits for the others. Ranks finish embedding at different times and rank 0
#: fits k-means alone while the others wait, so torch's 30-minute default is too short for
#: millions of rows; a crashed rank is still noticed at once (the launcher stops the others).
WAIT_TIMEOUT = datetime.timedelta(hours=24)


def shard_of(key: str, world_size: int) -> int:
    """The rank that embeds the text with cache key ``key`` (a hex digest): by content, so
    every rank agrees without talking, whatever order it read the rows in, and a rerun
    with another number of ranks still finds the finished work in the cache."""
    return int(key[:15], 16) % world_size


@dataclass
class Ranks:
    """This process's place among the stage-1 processes (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    _group: Any = None  # gloo group for the coordination messages (CPU objects)
    _owns_default: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls) -> Ranks:
        """Join the launcher's process group (created here unless a caller, e.g. axolotl
        under ``accelerate launch``, already did); one process when ``WORLD_SIZE`` <= 1."""
        try:
            world_size = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
            local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
        except ValueError as exc:
            raise ClusteringError(
                f"RANK / WORLD_SIZE / LOCAL_RANK must be integers ({exc}); start several "
                "processes with `accelerate launch` or `torchrun`, which set them."
            ) from exc
        if world_size <= 1:
            return cls()
        import torch
        import torch.distributed as dist

        owns = False
        if not dist.is_initialized():
            if not os.environ.get("MASTER_ADDR") or not os.environ.get("MASTER_PORT"):
                raise ClusteringError(
                    f"WORLD_SIZE={world_size} but MASTER_ADDR/MASTER_PORT are not set: start "
                    "the ranks with `accelerate launch` or `torchrun`, or unset WORLD_SIZE for "
                    "one process."
                )
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(local_rank)
            dist.init_process_group(backend, timeout=WAIT_TIMEOUT)
            owns = True
        # Object messages travel over gloo (CPU) whatever the default backend is, with a
        # timeout long enough for rank 0's k-means.
        group = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
        return cls(dist.get_rank(), dist.get_world_size(), local_rank, group, owns)

    def close(self) -> None:
        if not self.distributed:
            return
        import torch.distributed as dist

        dist.destroy_process_group(self._group)
        if self._owns_default:
            dist.destroy_process_group()

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier(group=self._group)

    def check_all(self, error: BaseException | None) -> None:
        """Meet the other ranks and raise if any of them failed (a barrier that also carries
        each rank's error, so no rank waits forever on one that gave up)."""
        if not self.distributed:
            if error is not None:
                raise error
            return
        import torch.distributed as dist

        mine = None if error is None else _describe(error)
        errors: list[str | None] = [None] * self.world_size
        dist.all_gather_object(errors, mine, group=self._group)
        if error is not None:
            raise error
        failed = [(r, e) for r, e in enumerate(errors) if e is not None]
        if failed:
            r, msg = failed[0]
            raise ClusteringError(f"rank {r} of {self.world_size} failed: {msg}")

    def share_main_result(self, error: BaseException | None) -> None:
        """Rank 0 tells the others whether the artifact was written; they raise if not."""
        if not self.distributed:
            if error is not None:
                raise error
            return
        import torch.distributed as dist

        msg = [None if error is None else _describe(error)]
        dist.broadcast_object_list(msg, src=0, group=self._group)
        if error is not None:
            raise error
        if msg[0] is not None:
            raise ClusteringError(f"rank 0 failed, no artifact was written: {msg[0]}")

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. building the data sets' Arrow cache), then the
        others, which find its work done."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()


def _describe(error: BaseException) -> str:
    if isinstance(error, ClusteringError):
        return " ".join(str(error).split())
    return f"{type(error).__name__}: {str(error)[:300]}"
