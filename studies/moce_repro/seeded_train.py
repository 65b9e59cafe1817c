"""`axolotl train` with the global RNGs seeded before the model is built.

    python -m studies.moce_repro.seeded_train SEED config.yml

axolotl's ``seed`` reaches the data shuffle and the trainer (which seeds torch only once the
model and its LoRA adapters exist), so LoRA's initialisation would be the same for every
seed. Seeding here first makes it depend on SEED too. MoCE adapters are seeded by
``moce.init_seed`` and do not depend on this.
"""

from __future__ import annotations

import runpy
import sys


def seed_everything(seed: int) -> None:
    from transformers import set_seed

    set_seed(seed)


def main(argv: list[str]) -> None:
    if len(argv) != 2 or not argv[0].isdigit():
        raise SystemExit("usage: seeded_train.py SEED CONFIG.yml")
    seed_everything(int(argv[0]))
    sys.argv = ["axolotl.cli.train", argv[1]]
    runpy.run_module("axolotl.cli.train", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
