"""Models: one registry, from which the choices of `model.name` and each model's loss terms come.

Every model takes `(ModelConfig, dims)`, maps a `Batch` to a `ModelOutput` in `forward`, and has
`loss(output, batch, weights) -> (total, {term: value})` and a static `loss_terms(cfg)`; the one training
loop needs nothing else.
"""

from __future__ import annotations

from torch import nn

from mdkat.config import ModelConfig
from mdkat.models.late_fusion import LateFusion
from mdkat.models.mdkat import MDKAT
from mdkat.models.output import ModelOutput

REGISTRY: dict[str, type[nn.Module]] = {"mdkat": MDKAT, "late_fusion": LateFusion}

# The ablation table's rows: the parameters each variant sets on top of the full model.
ABLATIONS: dict[str, dict[str, object]] = {
    "mdkat": {},
    "no_cff": {"model.use_cff": False},
    "no_amsa": {"model.use_amsa": False},
    "no_ka": {"model.use_ka": False},
    "no_kt": {"model.use_kt": False},
    "no_decoupling": {"model.use_decoupling": False},
    "late_fusion": {"model.name": "late_fusion"},
}


def build(cfg: ModelConfig, dims: dict[str, int]) -> nn.Module:
    """The model `cfg.name` for inputs of feature sizes `dims` ({modality: d_m})."""
    return REGISTRY[cfg.name](cfg, dims)


def loss_terms(cfg: ModelConfig) -> tuple[str, ...]:
    """The loss terms model `cfg.name` computes under `cfg`'s switches."""
    return REGISTRY[cfg.name].loss_terms(cfg)


__all__ = ["ABLATIONS", "REGISTRY", "ModelOutput", "build", "loss_terms"]
