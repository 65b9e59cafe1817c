"""Generate with a trained MoCE model; each prompt's cluster is assigned automatically.

    moce-generate OUTPUT_DIR --prompt "Write a haiku about rain"
    moce-generate OUTPUT_DIR --prompts-file prompts.txt   # one prompt a line
    moce-generate OUTPUT_DIR --interactive

Errors (a folder that is not a MoCE output, a damaged file, a different base model) are
printed as one line that says what to do, exit status 2; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import sys

from ..model.cluster_ids import check_cluster_ids
from ..utils import cli_errors
from .load import MoCEInferenceModel, MoCELoadError, add_loading_arguments, load_moce_model

PROG = "moce_plugin.generate"


def _check_clusters_assignable(moce: MoCEInferenceModel, cluster: int | None) -> None:
    """Without a cluster artifact the CLI user must say which cluster (the Python API's
    message names ``cluster=``; this one names the flags)."""
    groups = moce.config.groups
    if cluster is not None:
        check_cluster_ids(cluster, groups, allow_ignore=False, what="--cluster",
                          fix=f": use --cluster 0..{groups - 1}.")
        return
    if moce.cluster_model is None and groups > 1:
        raise MoCELoadError(
            "this model has no cluster artifact (it was trained on a cluster_id column), so "
            f"prompts can't be assigned a cluster: pass --cluster <0..{groups - 1}> or "
            "--cluster-artifact <dir written by preprocess/cluster.py>."
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="MoCE output directory (or an exported one)")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--prompts-file", help="a text file, one prompt per line")
    src.add_argument("--interactive", action="store_true", help="read prompts from stdin")
    parser.add_argument("--cluster", type=int, help="force this cluster instead of assigning")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--cluster-artifact", help="override the cluster artifact directory")
    parser.add_argument("--prompt-format", choices=["alpaca", "chat", "raw"],
                        help="prompt template (default: the training data's)")
    parser.add_argument("--device", default=None, help="e.g. cuda, cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--no-stream", action="store_true", help="print only finished outputs")
    add_loading_arguments(parser)
    args = parser.parse_args(argv)
    with cli_errors(args.debug, PROG):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    moce = load_moce_model(args.model, base_model=args.base_model,
                           cluster_artifact=args.cluster_artifact, device=args.device,
                           prompt_format=args.prompt_format,
                           allow_different_base=args.allow_different_base)
    _check_clusters_assignable(moce, args.cluster)

    def run_one(prompt: str) -> None:
        cluster = args.cluster if args.cluster is not None else moce.assign_clusters([prompt])[0]
        print(f"[cluster {cluster}] ", end="", flush=True)
        if args.no_stream:
            print(moce.generate([prompt], cluster=cluster, max_new_tokens=args.max_new_tokens)[0])
            return
        for piece in moce.stream(prompt, cluster=cluster, max_new_tokens=args.max_new_tokens):
            print(piece, end="", flush=True)
        print()

    if args.prompt is not None:
        run_one(args.prompt)
    elif args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts = [line.rstrip("\n") for line in f if line.strip()]
        for start in range(0, len(prompts), args.batch_size):
            chunk = prompts[start:start + args.batch_size]
            clusters = ([args.cluster] * len(chunk) if args.cluster is not None
                        else moce.assign_clusters(chunk))
            outs = moce.generate(chunk, cluster=clusters, max_new_tokens=args.max_new_tokens)
            for prompt, cluster, out in zip(chunk, clusters, outs):
                print(f"### [cluster {cluster}] {prompt}\n{out}\n")
    else:
        print("Enter a prompt (empty line or Ctrl-D to quit).", file=sys.stderr)
        for line in sys.stdin:
            if not line.strip():
                break
            run_one(line.rstrip("\n"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
