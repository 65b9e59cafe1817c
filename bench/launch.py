"""The one way the benches and the e2e tests start a package command on N processes, as users
do: ``accelerate launch`` with its torchrun launcher (``--multi_gpu`` without a config file:
gloo on CPU ranks, NCCL on GPUs) for N > 1, one plain ``python -m`` process otherwise."""

from __future__ import annotations

import socket
import sys
from pathlib import Path


def free_port() -> int:
    """A TCP port free now on 127.0.0.1 (for the rendezvous of one launch)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def module_command(module: str, args: list[str], nproc: int = 1) -> list[str]:
    """``python -m MODULE ARGS`` on one process, or under ``accelerate launch`` on ``nproc``."""
    if nproc > 1:
        accelerate = str(Path(sys.executable).parent / "accelerate")
        cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", str(nproc),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port())]
    else:
        cmd = [sys.executable]
    return [*cmd, "-m", module, *args]
