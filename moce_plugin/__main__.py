"""``python -m moce_plugin <command> [options]``: every MoCE command behind one entry point.

Each command is also a console script (``moce-cluster``, ``moce-generate``, ``moce-export``,
``moce-usage``) running the same ``main``; ``python -m moce_plugin <command> --help`` lists
its options. The older ``python -m moce_plugin.<generate|export|usage|lm_eval_model>`` paths
keep working as thin shims.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from typing import NamedTuple

PROG = "python -m moce_plugin"


class Command(NamedTuple):
    module: str
    script: str | None  # the console script running the same main, if any
    summary: str


COMMANDS: dict[str, Command] = {
    "cluster": Command("moce_plugin.clustering.cli", "moce-cluster",
                       "stage 1: embed and cluster a YAML's datasets into a cluster artifact"),
    "generate": Command("moce_plugin.outputs.generate", "moce-generate",
                        "generate from a MoCE output or export, clusters chosen per prompt"),
    "export": Command("moce_plugin.outputs.export", "moce-export",
                      "merge LoRA and write a self-contained Hugging Face folder"),
    "usage": Command("moce_plugin.outputs.usage", "moce-usage",
                     "expert-usage report (JSON + PNG) of a MoCE output on some rows"),
    "lm-eval": Command("moce_plugin.outputs.lm_eval", None,
                       "lm-evaluation-harness with the `moce` model class (needs lm-eval)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"usage: {PROG} <command> [options]   ({PROG} <command> --help for its options)",
             "", "commands:"]
    for name, cmd in COMMANDS.items():
        also = f" (also `{cmd.script}`)" if cmd.script else ""
        lines.append(f"  {name:<{width}}  {cmd.summary}{also}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"{PROG}: error: unknown command {name!r}; commands: {', '.join(COMMANDS)} "
              f"(`{PROG} --help` describes them).", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name].module)
    # The sub-command's argparse names itself from argv[0]; lm-eval's parser reads sys.argv.
    saved, sys.argv = sys.argv, [f"{PROG} {name}", *rest]
    try:
        if name == "lm-eval":
            module.main()
            return 0
        return module.main(rest) or 0
    finally:
        sys.argv = saved


if __name__ == "__main__":
    raise SystemExit(main())
