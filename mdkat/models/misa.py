"""MISA (Hazarika, Zimmermann and Poria, ACM MM 2020): modality-invariant and -specific representations.

    X_m --normalise--> sLSTM_m --> [h1_fwd; h1_bwd; h2_fwd; h2_bwd] --Linear, ReLU, LayerNorm--> u_m (B, d)
    u_m --E_c (one for all modalities), Linear + sigmoid--> h^c_m              (modality-invariant)
    u_m --E_p^m (one per modality),     Linear + sigmoid--> h^p_m              (modality-specific)
    h^c_m + h^p_m --D (shared), Linear--> reconstruction of u_m
    [h^p_t, h^p_a, h^p_v, h^c_t, h^c_a, h^c_v] as 6 tokens --transformer layer--> concat (B, 6d) --FC--> score

Loss = task + alpha L_sim + beta L_diff + gamma L_recon (`loss.misa.sim/diff/recon`):
- L_sim: central moment discrepancy (Zellinger et al., 2017) of the invariant vectors, K moments, averaged
  over the three modality pairs. The sigmoid keeps every feature in [0, 1], so CMD's range factors are 1.
- L_diff: soft orthogonality, ||A^T B||_F^2 of batch-centred, per-sample L2-normalised (B, d) matrices, for
  (h^c_m, h^p_m) of each modality and for each pair of specific vectors, summed. Divided by the d^2 entries
  as in the authors' code, so that their weights carry over (the paper writes the bare Frobenius norm).
- L_recon: mean squared error between D's output and u_m, averaged over modalities; the target is not
  detached, as in the authors' code.

As published: sLSTM = two bidirectional LSTMs with a LayerNorm between them, the final hidden states of both
concatenated; the LSTM's hidden size is its input size; ReLU projections; PyTorch's default transformer
layer (post-LN, ReLU, 2048-wide feed-forward, dropout 0.1) with 2 heads; head Linear(6d, 3d), dropout, ReLU,
Linear(3d, 1). Our choices:
- Text: the paper fine-tunes BERT (mean of its last layer); frozen 768-d features get the recurrent
  extractor of its GloVe variant instead, and, like audio and vision, the train-split normalisation of
  `encoders.Projection` (text: whitened top 32 principal components, as MDKAT) without its convolution:
  the LSTM's input weights are the projection. The LSTM hidden size follows the authors' rule, the
  normalised input's size (text 32, MOSI audio 5, vision 20), unless `rnn_width` sets it.
- Each modality runs its own LSTM over its own lengths, so unaligned data needs nothing else.
- One decoder D for all modalities, as in the paper's equation (the authors' code has one per modality).
- Task loss L1 (the pipeline's); the paper trains MOSI regression with MSE. The authors' optional
  adversarial similarity (gradient reversal) and shared/private discriminator (weight 0) are left out.
- L_diff's norms are not detached (the authors' code detaches them).

Published MOSI results (BERT text): the paper's MOSI table (as cited by later papers, not re-read here): MAE
0.783, Corr 0.761, Acc-2 81.8 / 83.4, F1 81.7 / 83.6 (negative/non-negative / negative/positive), Acc-7
42.3. MMSA's reproduction (thuiar/MMSA results/result-stat.md, unaligned): Acc-2 81.84 / 83.54, F1 81.82 /
83.58, Acc-7 41.37, MAE 0.7765, Corr 0.7781.

Trainable parameters at the default section with MOSI dims (768, 5, 20): 1,061,613.

Learning rate: the authors' 1e-4 (`model.misa.lr`, in place of `train.lr`). At the loop's 2e-3 this model
does not learn on the default synthetic data (training L1 stays at the median's 1.14-1.15; seed 1111): with
its losses on, the utterance vectors collapse to a constant (their std over the batch falls from 0.5 to
0.04 in 4 epochs: CMD, soft orthogonality and a reconstruction whose target is not detached are all
minimised by a constant), and with the head's dropout 0.5, 80-99 % of the head's ReLUs die in the first
epoch. Measured at 2e-3 without a fix: a detached reconstruction target, no head dropout, no gradient
clipping, no weight decay, MMSA's smaller weights (each alone or paired) all stay at valid MAE 1.17-1.18;
only the task loss alone without dropout learns (valid Corr 0.47 at epoch 4). At 1e-4 with the published
setting: valid Corr 0.31, MAE 1.14 at epoch 15; at 3e-4: Corr 0.35, MAE 1.10 at epoch 8, then it overfits
(training L1 0.70 by epoch 12). Its row in the models table is this setting's, untuned.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import model_validator
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from mdkat import MODALITIES
from mdkat.config import PerModalityCount, Positive, PositiveFloat, Probability, Section
from mdkat.data import Batch
from mdkat.models import losses
from mdkat.models.base import Model, ModelOutput, weighted_total
from mdkat.models.encoders import InputNormalisation, valid_mask


class MISAConfig(Section):
    """`model.misa`: sizes of the extractors, the shared/private spaces and the fusion layer."""

    width: Positive  # d_h, size of u_m, h^c_m and h^p_m
    rnn_width: PerModalityCount  # sLSTM hidden size per direction; 0: the normalised input's size
    input_pca: PerModalityCount  # whitened principal components kept per modality (0: standardise only)
    fusion_heads: Positive
    fusion_ff: Positive  # feed-forward width of the fusion transformer layer
    fusion_dropout: Probability
    dropout: Probability  # in the fully connected head
    cmd_moments: Positive  # K of the central moment discrepancy
    lr: PositiveFloat  # this model's learning rate, in place of train.lr (see the docstring)

    @model_validator(mode="after")
    def _heads_divide_width(self) -> MISAConfig:
        if self.width % self.fusion_heads:
            raise ValueError(f"width {self.width} is not divisible by fusion_heads {self.fusion_heads}")
        return self


@dataclass
class MISAOutput(ModelOutput):
    """`pooled_independent` holds h^c_m and `pooled_specific` h^p_m, each (B, d); and for L_recon:"""

    utterance: dict[str, Tensor] = field(default_factory=dict)  # (B, d) u_m
    decoded: dict[str, Tensor] = field(default_factory=dict)  # (B, d) D(h^c_m + h^p_m)


def cmd(x: Tensor, y: Tensor, moments: int) -> Tensor:
    """Central moment discrepancy of two batches (B, d) with values in [0, 1]: moments 1..`moments`."""
    x, y = x.float(), y.float()
    mx, my = x.mean(0), y.mean(0)
    total = torch.linalg.vector_norm(mx - my)  # its gradient at 0 is 0, not NaN (batch size 1)
    cx, cy = x - mx, y - my
    for k in range(2, moments + 1):
        total = total + torch.linalg.vector_norm(cx.pow(k).mean(0) - cy.pow(k).mean(0))
    return total


def difference(a: Tensor, b: Tensor) -> Tensor:
    """Soft orthogonality of two batches (B, d): mean squared entry of A^T B, rows centred and normalised."""
    with torch.autocast(a.device.type, enabled=False):  # the product in float32, also under CUDA autocast
        a = F.normalize(a.float() - a.float().mean(0), dim=1, eps=1e-6)
        b = F.normalize(b.float() - b.float().mean(0), dim=1, eps=1e-6)
        return (a.T @ b).pow(2).mean()


class StackedLSTM(nn.Module):
    """sLSTM: two bidirectional LSTMs, LayerNorm between, over valid steps: (B, T, k) -> (B, 4h)."""

    def __init__(self, d_in: int, hidden: int):
        super().__init__()
        self.first = nn.LSTM(d_in, hidden, batch_first=True, bidirectional=True)
        self.norm = nn.LayerNorm(2 * hidden)
        self.second = nn.LSTM(2 * hidden, hidden, batch_first=True, bidirectional=True)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        # packing needs the lengths on the CPU (the one host sync); a sample without steps reads one zero step
        packed = pack_padded_sequence(x, lengths.clamp_min(1).cpu(), batch_first=True, enforce_sorted=False)
        out, (h1, _) = self.first(packed)
        normed = PackedSequence(
            self.norm(out.data), out.batch_sizes, out.sorted_indices, out.unsorted_indices
        )
        _, (h2, _) = self.second(normed)  # h (2 directions, B, h), in the batch's order
        return torch.cat([h1[0], h1[1], h2[0], h2[1]], dim=-1)  # (B, 4h)


class MISA(Model):
    """Shared and private encoders over utterance vectors, CMD, orthogonality and reconstruction losses."""

    Config = MISAConfig
    LABEL = "MISA (Hazarika et al., 2020)"
    WEIGHTED_TERMS = ("sim", "diff", "recon")

    def __init__(
        self,
        cfg: MISAConfig,
        dims: dict[str, int],
        aligned: bool = False,
        sizes: Mapping[str, int] | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        d = cfg.width
        self.normalise = nn.ModuleDict(
            {m: InputNormalisation(dims[m], getattr(cfg.input_pca, m)) for m in MODALITIES}
        )
        hidden = {m: getattr(cfg.rnn_width, m) or self.normalise[m].size for m in MODALITIES}
        self.extract = nn.ModuleDict({m: StackedLSTM(self.normalise[m].size, hidden[m]) for m in MODALITIES})
        self.project = nn.ModuleDict(
            {m: nn.Sequential(nn.Linear(4 * hidden[m], d), nn.ReLU(), nn.LayerNorm(d)) for m in MODALITIES}
        )
        self.shared = nn.Sequential(nn.Linear(d, d), nn.Sigmoid())
        self.private = nn.ModuleDict({m: nn.Sequential(nn.Linear(d, d), nn.Sigmoid()) for m in MODALITIES})
        self.decoder = nn.Linear(d, d)
        self.fusion = nn.TransformerEncoderLayer(
            d, cfg.fusion_heads, cfg.fusion_ff, cfg.fusion_dropout, batch_first=True
        )
        tokens = 2 * len(MODALITIES)
        self.head = nn.Sequential(
            nn.Linear(tokens * d, tokens * d // 2),
            nn.Dropout(cfg.dropout),
            nn.ReLU(),
            nn.Linear(tokens * d // 2, 1),
        )

    def parameter_groups(self, lr: float) -> list[dict[str, Any]]:
        """Every parameter at `model.misa.lr`, whatever `train.lr` (`lr`) says."""
        return [{"params": list(self.parameters()), "lr": self.cfg.lr}]

    @property
    def decoupled(self) -> bool:
        """h^c_m comes from the shared encoder E_c, h^p_m from E_p^m."""
        return True

    def forward(self, batch: Batch) -> MISAOutput:
        mask = {m: valid_mask(batch.lengths(m), batch.features(m).shape[1]) for m in MODALITIES}  # (B, T_m)
        utterance = {
            m: self.project[m](
                self.extract[m](self.normalise[m](batch.features(m), mask[m]), batch.lengths(m))
            )
            for m in MODALITIES
        }  # u_m (B, d)
        shared = {m: self.shared(utterance[m]) for m in MODALITIES}  # h^c_m (B, d)
        private = {m: self.private[m](utterance[m]) for m in MODALITIES}  # h^p_m (B, d)
        decoded = {m: self.decoder(shared[m] + private[m]) for m in MODALITIES}  # (B, d)
        tokens = torch.stack([*private.values(), *shared.values()], dim=1)  # (B, 6, d)
        pred = self.head(self.fusion(tokens).flatten(1)).squeeze(-1)  # (B,)
        return MISAOutput(
            pred=pred,
            mask=mask,
            pooled_independent=shared,
            pooled_specific=private,
            utterance=utterance,
            decoded=decoded,
        )

    def loss(
        self, out: MISAOutput, batch: Batch, weights: Mapping[str, float]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Total loss and every term by name (detached), `task` with weight 1 and the others weighted."""
        shared, private = out.pooled_independent, out.pooled_specific
        pairs = list(itertools.combinations(MODALITIES, 2))
        terms = {
            "task": losses.l1(out.pred, batch.label),
            "sim": torch.stack([cmd(shared[a], shared[b], self.cfg.cmd_moments) for a, b in pairs]).mean(),
            "diff": sum(difference(shared[m], private[m]) for m in MODALITIES)
            + sum(difference(private[a], private[b]) for a, b in pairs),
            "recon": torch.stack(
                [(out.decoded[m].float() - out.utterance[m].float()).pow(2).mean() for m in MODALITIES]
            ).mean(),
        }
        total = weighted_total(terms, weights)
        return total, {name: value.detach() for name, value in terms.items()}
