"""``moce-cluster`` (also ``python preprocess/cluster.py``): stage 1 of MoCE from an axolotl YAML.

    moce-cluster CONFIG.yml [options]

Reads the YAML's ``datasets:`` (loaded as axolotl loads them) and its ``moce:`` block
(``num_clusters``, ``cluster_artifact``, ``clustering: {...}``), embeds every example, picks k
by the elbow method when ``num_clusters: auto``, and writes the artifact directory named by
``moce.cluster_artifact``. Command-line options override the YAML. See docs/clustering.md.
``axolotl preprocess CONFIG.yml`` runs the same step when the artifact is missing.
``accelerate launch -m moce_plugin.clustering.cli CONFIG.yml`` shares the embedding between the
launched processes (GPUs, nodes); rank 0 writes the artifact.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from ..utils import check_replaceable
from .artifact import ARTIFACT_KIND, ClusterModel
from .distributed import Ranks
from .errors import ClusteringError
from .options import ClusteringOptions, resolve_num_clusters
from .pipeline import check_locations, rows_from_yaml, run_clustering


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """One flag per ClusteringOptions field (generated, so the CLI cannot drift from it)."""
    p = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[0].split(": ", 1)[-1],
        epilog="Every option defaults to the YAML's moce/moce.clustering value, then to the "
        "default shown. Exit code 2 on a configuration or data problem.",
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
    return p


def resolve_config(
    cfg: Any,
    overrides: Mapping[str, Any] | None = None,
    num_clusters: int | str | None = None,
    output: str | None = None,
    source: str = "the config",
) -> tuple[ClusteringOptions, int | str, str]:
    """(options, k, artifact dir) from an axolotl config mapping; arguments win over it."""
    if not isinstance(cfg, Mapping):
        raise ClusteringError(f"{source} is not an axolotl YAML mapping.")
    moce = cfg.get("moce")
    if not isinstance(moce, Mapping):
        raise ClusteringError(f"{source} has no `moce:` block.")
    clustering = dict(moce.get("clustering") or {})
    clustering.update({k: v for k, v in (overrides or {}).items() if v is not None})
    options = ClusteringOptions.from_dict(clustering)
    k = resolve_num_clusters(num_clusters or moce.get("num_clusters"))
    output = output or moce.get("cluster_artifact")
    if not output:
        raise ClusteringError(
            "no output: set moce.cluster_artifact in the YAML (training reads it) or pass --output."
        )
    return options, k, str(output)


def cluster_config(
    cfg: Any, progress: bool = True, log: Callable[[str], None] = print, **resolve_kwargs: Any
) -> ClusterModel:
    """Stage 1 for an axolotl config (YAML mapping or axolotl's DictDefault);
    ``resolve_kwargs`` are :func:`resolve_config`'s overrides."""
    os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
    options, k, out = resolve_config(cfg, **resolve_kwargs)
    check_locations(Path(out), options)
    check_replaceable(out, ARTIFACT_KIND)  # before the data and the encoder are loaded
    # Under `accelerate launch` / `torchrun` (WORLD_SIZE > 1) the ranks share the embedding
    # work; one process otherwise.
    ranks = Ranks.from_env()
    try:
        with ranks.main_first():  # rank 0 builds the datasets' Arrow cache, the others reuse it
            rows = rows_from_yaml(cfg, options.text_template)
        return run_clustering(rows, out, k, options, progress=progress, log=log, ranks=ranks)
    finally:
        ranks.close()


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        try:
            cfg = yaml.safe_load(args.config.read_text()) or {}
        except OSError as exc:
            raise ClusteringError(f"cannot read {args.config}: {exc.strerror}") from exc
        overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(ClusteringOptions)}
        log = (lambda _msg: None) if args.quiet else print
        cluster_config(cfg, progress=not args.quiet, log=log, overrides=overrides,
                       num_clusters=args.num_clusters, output=args.output,
                       source=str(args.config))
    except (ClusteringError, yaml.YAMLError) as exc:
        if args.debug:
            traceback.print_exc()
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # `python -m moce_plugin.clustering.cli`, e.g. under accelerate launch
    sys.exit(main(prog="moce-cluster"))
