"""Stage 1 of MoCE: cluster the training data of an axolotl YAML into a cluster artifact.

    python preprocess/cluster.py CONFIG.yml [options]

Reads the YAML's ``datasets:`` (loaded as axolotl loads them) and its ``moce:`` block
(``num_clusters``, ``cluster_artifact``, ``clustering: {...}``), embeds every example, picks k
by the elbow method when ``num_clusters: auto``, and writes the artifact directory named by
``moce.cluster_artifact``. Command-line options override the YAML. See docs/clustering.md.

All logic lives in :mod:`moce_plugin.clustering`; this file only parses arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import yaml

os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
# Run as a script from a checkout: make the package importable without installing it.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moce_plugin.clustering import (  # noqa: E402
    ClusteringError,
    ClusteringOptions,
    resolve_num_clusters,
    rows_from_yaml,
    run_clustering,
)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    """One flag per ClusteringOptions field (generated, so the CLI cannot drift from it)."""
    p = argparse.ArgumentParser(
        prog="preprocess/cluster.py",
        description=__doc__.split("\n\n")[0],
        epilog="Every option defaults to the YAML's moce/moce.clustering value, then to the "
        "default shown. Exit code 2 on a configuration or data problem.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("config", type=Path, help="axolotl YAML with `datasets:` and a `moce:` block")
    p.add_argument(
        "--num-clusters",
        default=None,
        help="k, or 'auto' for the elbow method over k=1..k_max (YAML: moce.num_clusters; "
        "default auto)",
    )
    p.add_argument(
        "--output",
        default=None,
        help="artifact directory (YAML: moce.cluster_artifact, required in one of the two)",
    )
    for f in dataclasses.fields(ClusteringOptions):
        kwargs: dict[str, Any] = {
            "default": None,
            "help": f"{f.metadata['help']} (YAML: moce.clustering.{f.name}; default {f.default!r})",
        }
        if f.type in ("bool", bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.type in ("int", int):
            kwargs["type"] = int
        p.add_argument(_flag(f.name), **kwargs)
    p.add_argument("--quiet", action="store_true", help="no progress bar or log lines")
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    # ArgumentDefaultsHelpFormatter would print "(default: None)": the help texts say it.
    p.formatter_class = argparse.HelpFormatter
    return p


def resolve(args: argparse.Namespace, cfg: dict) -> tuple[ClusteringOptions, int | str, str]:
    """Merge YAML and command line (command line wins)."""
    if not isinstance(cfg, dict):
        raise ClusteringError(f"{args.config} is not an axolotl YAML mapping.")
    moce = cfg.get("moce")
    if not isinstance(moce, dict):
        raise ClusteringError(f"{args.config} has no `moce:` block.")
    clustering = dict(moce.get("clustering") or {})
    for f in dataclasses.fields(ClusteringOptions):
        value = getattr(args, f.name)
        if value is not None:
            clustering[f.name] = value
    options = ClusteringOptions.from_dict(clustering)
    k = resolve_num_clusters(args.num_clusters or moce.get("num_clusters"))
    output = args.output or moce.get("cluster_artifact")
    if not output:
        raise ClusteringError(
            "no output: set moce.cluster_artifact in the YAML (training reads it) or pass --output."
        )
    return options, k, str(output)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        try:
            cfg = yaml.safe_load(args.config.read_text()) or {}
        except OSError as exc:
            raise ClusteringError(f"cannot read {args.config}: {exc.strerror}") from exc
        options, k, output = resolve(args, cfg)
        rows = rows_from_yaml(cfg, options.text_template)
        log = (lambda _msg: None) if args.quiet else print
        run_clustering(rows, output, k, options, progress=not args.quiet, log=log)
    except (ClusteringError, yaml.YAMLError) as exc:
        if args.debug:
            traceback.print_exc()
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
