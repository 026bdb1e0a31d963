"""Late fusion: the baseline MDKAT is measured against.

Each modality gets its own projection and self-attention encoder (the same building blocks as MDKAT),
is mean-pooled over valid steps, and the three vectors are concatenated into an MLP. No decoupling, no
cross-modal interaction before the head, no auxiliary losses: the task L1 is its only loss term.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mdkat import MODALITIES
from mdkat.config import LossConfig, ModelConfig
from mdkat.data import Batch
from mdkat.models import losses
from mdkat.models.encoders import Encoder, Projection, masked_mean, valid_mask
from mdkat.models.mdkat import regression_head
from mdkat.models.output import ModelOutput


class LateFusion(nn.Module):
    """Per-modality encoders, masked mean pooling, concatenation, MLP."""

    def __init__(self, cfg: ModelConfig, dims: dict[str, int]):
        super().__init__()
        d = cfg.width
        self.projection = nn.ModuleDict(
            {
                m: Projection(dims[m], d, getattr(cfg.conv_kernel, m), getattr(cfg.input_dropout, m))
                for m in MODALITIES
            }
        )
        self.encoders = nn.ModuleDict({m: Encoder(d, cfg.heads, cfg.layers, cfg.dropout) for m in MODALITIES})
        self.head = regression_head(len(MODALITIES) * d, d, cfg.dropout)

    @staticmethod
    def loss_terms(cfg: ModelConfig) -> tuple[str, ...]:
        """Only the task L1."""
        return ("task",)

    def forward(self, batch: Batch) -> ModelOutput:
        mask = {m: valid_mask(batch.lengths(m), batch.features(m).shape[1]) for m in MODALITIES}
        pooled = {
            m: masked_mean(self.encoders[m](self.projection[m](batch.features(m), mask[m]), mask[m]), mask[m])
            for m in MODALITIES
        }  # (B, d) each
        pred = self.head(torch.cat([pooled[m] for m in MODALITIES], dim=-1)).squeeze(-1)  # (B,)
        return ModelOutput(pred=pred, mask=mask, pooled_specific=pooled)

    def loss(self, out: ModelOutput, batch: Batch, weights: LossConfig) -> tuple[Tensor, dict[str, Tensor]]:
        """The task L1 (weights of absent terms are ignored)."""
        task = losses.l1(out.pred, batch.label)
        return task, {"task": task.detach()}
