"""The ``moce:`` block of an axolotl YAML, validated by pydantic.

This is the single description of a MoCE model: the plugin validates it at config
load, the layers are built from it, and :mod:`moce_plugin.outputs.folder` writes it next to every
checkpoint (``moce_config.json``) so a trained model can be rebuilt without the YAML.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ..errors import ConfigError

# Activations accepted for the adapter bottleneck; anything in transformers' ACT2FN works,
# these are the ones we test.
AdapterActivation = Literal["sigmoid", "silu", "gelu", "relu", "tanh", "identity"]


class MoCEConfig(BaseModel):
    """Hyper-parameters of the Mixture-of-Clustered-Experts adapters.

    Defaults follow the paper (Eo et al., 2025, App. A): 4 experts per group, top-2,
    adapter dim 64, scaling 1.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    num_clusters: int | Literal["auto"] | None = Field(
        default=None,
        description="Number of sequence-level clusters C = number of expert groups. "
        "Taken from the cluster artifact when omitted or 'auto'.",
    )
    experts_per_group: int = Field(default=4, ge=1, description="Experts E in each group.")
    top_k: int | Literal["soft"] = Field(
        default=2,
        description="Experts each token uses inside its group: an integer (top-k with "
        "weights renormalised over the chosen k) or 'soft' (weighted merge of all experts).",
    )
    num_general_experts: int = Field(
        default=0,
        ge=0,
        description="General experts shared by all clusters, with their own router: "
        "0 = plain MoCE, >0 = the paper's (V) variant.",
    )
    general_top_k: int | Literal["soft"] | None = Field(
        default=None, description="Routing of the general experts; defaults to top_k."
    )
    adapter_dim: int = Field(default=64, ge=1, description="Bottleneck width r of each adapter.")
    adapter_scaling: float = Field(default=1.0, description="Multiplier of the adapter outputs.")
    adapter_activation: AdapterActivation = Field(
        default="sigmoid", description="Non-linearity of the adapter bottleneck (paper: sigmoid)."
    )
    router_aux_loss_coef: float = Field(
        default=0.01, ge=0.0, description="Weight of the load-balancing loss in the training loss."
    )
    layers: list[int] | Literal["all"] = Field(
        default="all",
        description="Decoder layers to convert: 'all' or a list of indices "
        "(negative indices count from the end).",
    )
    router: Literal["linear", "acmoe"] = Field(
        default="linear",
        description="Token-level router: 'linear' (paper) or 'acmoe' (adaptive-clustering "
        "router of Nielsen et al. 2025, see docs/acmoe.md).",
    )
    acmoe_eps: float = Field(
        default=0.1, gt=0, description="ACMoE: dispersion floor, relative to the mean dispersion."
    )
    acmoe_clamp: float = Field(
        default=5.0, gt=1, description="ACMoE: feature weights are clipped at this x their mean."
    )
    acmoe_momentum: float = Field(
        default=0.9, ge=0, lt=1, description="ACMoE: EMA momentum of the running dispersions."
    )
    cluster_artifact: str | None = Field(
        default=None,
        description="Directory written by preprocess/cluster.py. Without it, every dataset "
        "must carry an integer column named by `cluster_column`.",
    )
    cluster_column: str = Field(
        default="cluster_id", description="Per-example cluster id column in the raw data."
    )
    clustering: dict[str, Any] = Field(
        default_factory=dict,
        description="Options of preprocess/cluster.py (embedding model, text template, k_max, "
        "seed, ...); see docs/clustering.md. Training reads only the artifact. A plain mapping "
        "here (the model layer knows nothing of stage 1); the plugin validates it as "
        "ClusteringOptions (integration.args.MoCEOptions).",
    )
    train_base_model: bool = Field(
        default=False,
        description="With `adapter:` unset, also train the base weights (full fine-tune). "
        "Default: the base is frozen and only MoCE trains, as in the paper.",
    )
    init_seed: int = Field(default=0, description="Seed of the adapter/router initialisation.")

    @field_validator("num_clusters", "top_k", "general_top_k")
    @classmethod
    def _positive_count(cls, v: int | str | None, info: ValidationInfo) -> int | str | None:
        # The one non-integer value each field accepts, named in the message.
        if isinstance(v, int) and v < 1:
            word = "'auto'" if info.field_name == "num_clusters" else "'soft'"
            raise ValueError(f"moce.{info.field_name} must be >= 1 or {word}, got {v}")
        return v

    @model_validator(mode="after")
    def _check_consistency(self) -> MoCEConfig:
        if isinstance(self.top_k, int) and self.top_k > self.experts_per_group:
            raise ValueError(
                f"moce.top_k={self.top_k} is larger than moce.experts_per_group="
                f"{self.experts_per_group}; lower top_k or add experts."
            )
        if self.general_top_k is not None and self.num_general_experts == 0:
            raise ValueError(
                "moce.general_top_k is set but moce.num_general_experts is 0; "
                "set num_general_experts > 0 for the (V) variant or drop general_top_k."
            )
        gk = self.resolved_general_top_k
        if self.num_general_experts and isinstance(gk, int) and gk > self.num_general_experts:
            raise ValueError(
                f"general top-k {gk} exceeds moce.num_general_experts={self.num_general_experts}; "
                "set moce.general_top_k explicitly (e.g. 1 or 'soft')."
            )
        if self.cluster_artifact is None and self.num_clusters in (None, "auto"):
            raise ValueError(
                "moce.num_clusters is required when no moce.cluster_artifact is given "
                "(the number of expert groups must be known); run preprocess/cluster.py "
                "and set moce.cluster_artifact, or set num_clusters to an integer."
            )
        if isinstance(self.layers, list) and not self.layers:
            raise ValueError("moce.layers is an empty list; use 'all' or list layer indices.")
        return self

    # ---- derived values -------------------------------------------------------------
    @property
    def resolved_general_top_k(self) -> int | str:
        return self.top_k if self.general_top_k is None else self.general_top_k

    @property
    def groups(self) -> int:
        if not isinstance(self.num_clusters, int):
            raise ConfigError(
                "moce.num_clusters is not resolved yet; it is read from the cluster artifact "
                "when the plugin loads (moce.cluster_artifact)."
            )
        return self.num_clusters

    def resolve_layers(self, num_layers: int) -> list[int]:
        if self.layers == "all":
            return list(range(num_layers))
        out = []
        for i in self.layers:
            j = i + num_layers if i < 0 else i
            if not 0 <= j < num_layers:
                raise ConfigError(
                    f"moce.layers contains {i}, but the model has {num_layers} decoder layers "
                    f"(valid: 0..{num_layers - 1} or negative from the end)."
                )
            out.append(j)
        return sorted(set(out))
