"""Late fusion: the baseline MDKAT is measured against.

Each modality gets its own projection and self-attention encoder (the same building blocks as MDKAT),
is mean-pooled over valid steps, and the three vectors are concatenated into an MLP. No decoupling, no
cross-modal interaction before the head, no auxiliary losses: the task L1 is its only loss term.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from mdkat import MODALITIES
from mdkat.data import Batch
from mdkat.models import losses
from mdkat.models.base import Model, ModelOutput
from mdkat.models.encoders import (
    Encoder,
    EncoderConfig,
    masked_mean,
    projections,
    regression_head,
    valid_mask,
)


class LateFusionConfig(EncoderConfig):
    """`model.late_fusion`: the same projection and encoders as MDKAT's, nothing else."""


class LateFusion(Model):
    """Per-modality encoders, masked mean pooling, concatenation, MLP."""

    Config = LateFusionConfig
    LABEL = "late fusion (baseline)"

    def __init__(
        self,
        cfg: LateFusionConfig,
        dims: dict[str, int],
        aligned: bool = False,
        sizes: Mapping[str, int] | None = None,
    ):
        super().__init__()
        d = cfg.width
        self.projection = projections(cfg, {m: dims[m] for m in MODALITIES})
        self.encoders = nn.ModuleDict({m: Encoder(d, cfg.heads, cfg.layers, cfg.dropout) for m in MODALITIES})
        self.head = regression_head(len(MODALITIES) * d, d, cfg.dropout)

    def forward(self, batch: Batch) -> ModelOutput:
        mask = {m: valid_mask(batch.lengths(m), batch.features(m).shape[1]) for m in MODALITIES}
        pooled = {
            m: masked_mean(self.encoders[m](self.projection[m](batch.features(m), mask[m]), mask[m]), mask[m])
            for m in MODALITIES
        }  # (B, d) each
        pred = self.head(torch.cat([pooled[m] for m in MODALITIES], dim=-1)).squeeze(-1)  # (B,)
        return ModelOutput(pred=pred, mask=mask, pooled_specific=pooled)

    def loss(
        self, out: ModelOutput, batch: Batch, weights: Mapping[str, float]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The task L1 (weights of absent terms are ignored)."""
        task = losses.l1(out.pred, batch.label)
        return task, {"task": task.detach()}
