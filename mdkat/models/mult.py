"""MulT: Multimodal Transformer (Tsai et al., ACL 2019, "Multimodal Transformer for Unaligned Multimodal
Language Sequences").

    X_m --Conv1d (kernel k_m) + positions--> P_m                                (temporal convolutions)
    P_t + CM_{a->t}(P_t, P_a) || CM_{v->t}(P_t, P_v) --self-attention--> last valid step h_t  (B, 2d)
    (likewise h_a from CM_{t->a}, CM_{v->a} and h_v from CM_{t->v}, CM_{a->v})
    [h_t; h_a; h_v] (B, 6d) --residual MLP--> one score

The paper: a temporal Conv1d brings every modality to a common width d, sinusoidal positions are added,
and crossmodal transformers in all six directions let each target attend to the low-level features of
each source across time steps, so the modalities need no word alignment. Each target's two crossmodal
outputs are concatenated and passed through a self-attention transformer; the last element of the three
sequences is concatenated into a residual block and the output layer. The loss is the task L1 alone.

Chosen here (`crossmodal.py` holds the crossmodal blocks):
- The LAST VALID step of each target sequence, not index -1 as in the authors' code, which for a padded
  sample reads a padded step: with it, appended padding cannot change a prediction.
- Pre-LayerNorm layers on `encoders.Attention` / `FeedForward` (GELU), attention dropout folded into the
  residual dropout `dropout`; positions are added once by the projection (the authors' code re-adds them,
  scaled by sqrt(d), at every transformer's input). The authors' code masks future steps by default
  (`attn_mask`); the paper does not, and neither do we: every valid step is attended to.
- The paper's "textual embedding dropout" is `input_dropout.text`; audio and vision get none.
- Frozen 768-d BERT features replace the paper's GloVe vectors, standardised with the training split's
  statistics (`input_pca` 0); the projection has no bias, as the authors' Conv1d.
Defaults: the paper's MOSI hyper-parameters (appendix, Table 5): d = 40, 4 crossmodal blocks, 10 heads,
kernels L/V/A (1 or 3)/3/3 (we take 1 for text, as the authors' code), textual embedding dropout 0.2,
crossmodal block dropout 0.2, output dropout 0.1, Adam lr 1e-3, batch 128, gradient clip 0.8, 100 epochs;
the self-attention transformers have max(D, 3) = 4 layers (authors' code, `trans_*_mem`).

Published MOSI (paper Table 1, GloVe text; the aligned row as cited by later papers, the unaligned row not
re-checked): word-aligned Acc-7 40.0, Acc-2 83.0, F1 82.8, MAE 0.871, Corr 0.698; unaligned Acc-7 39.1,
Acc-2 81.1, F1 81.0, MAE 0.889, Corr 0.686.

Trainable parameters at the default section with MOSI dims (768, 5, 20): 1,559,881 (six crossmodal
transformers 475,680; three self-attention transformers 934,560; projections 33,720; head 115,921).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mdkat import MODALITIES
from mdkat.config import Positive, Probability
from mdkat.data import Batch
from mdkat.models import losses
from mdkat.models.base import Model, ModelOutput
from mdkat.models.crossmodal import MultimodalTransformer, ResidualHead
from mdkat.models.encoders import EncoderConfig, projections, valid_mask


class MulTConfig(EncoderConfig):
    """`model.mult`: projection, crossmodal blocks (`layers`), self-attention transformers, output dropout."""

    memory_layers: Positive  # self-attention layers over each target's concatenated crossmodal outputs
    out_dropout: Probability  # in the residual block of the head


@dataclass
class MulTOutput(ModelOutput):
    """`ModelOutput` with each target's last valid fused state."""

    last: dict[str, Tensor] = field(default_factory=dict)  # (B, 2d) h_m


class MulT(Model):
    """Crossmodal transformers in all six directions, self-attention per target, last valid steps, MLP."""

    Config = MulTConfig
    LABEL = "MulT (Tsai et al., 2019)"

    def __init__(
        self,
        cfg: MulTConfig,
        dims: dict[str, int],
        aligned: bool = False,
        sizes: Mapping[str, int] | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        d = cfg.width
        self.projection = projections(cfg, {m: dims[m] for m in MODALITIES})
        self.fusion = MultimodalTransformer(
            MODALITIES, d, cfg.heads, cfg.layers, cfg.memory_layers, cfg.dropout
        )
        fused = len(MODALITIES) * (len(MODALITIES) - 1) * d  # 6d
        self.head = ResidualHead(fused, fused, cfg.out_dropout)

    def forward(self, batch: Batch) -> MulTOutput:
        valid = {m: valid_mask(batch.lengths(m), batch.features(m).shape[1]) for m in MODALITIES}  # (B, T_m)
        projected = {m: self.projection[m](batch.features(m), valid[m]) for m in MODALITIES}  # (B, T_m, d)
        # a sample without steps attends to its zeroed step 0 rather than to nothing (NaN)
        lengths = {m: batch.lengths(m).clamp(min=1) for m in MODALITIES}  # (B,)
        mask = {m: valid_mask(lengths[m], valid[m].shape[1]) for m in MODALITIES}
        last = self.fusion(projected, mask, lengths)  # {m: (B, 2d)}
        pred = self.head(torch.cat([last[m] for m in MODALITIES], dim=-1))  # (B,)
        return MulTOutput(pred=pred, mask=valid, pooled_specific=last, projected=projected, last=last)

    def loss(
        self, out: ModelOutput, batch: Batch, weights: Mapping[str, float]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The task L1 (weights of absent terms are ignored)."""
        task = losses.l1(out.pred, batch.label)
        return task, {"task": task.detach()}
