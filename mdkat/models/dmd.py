"""DMD: Decoupled Multimodal Distilling (Li, Wang, Cui, CVPR 2023, "Decoupled Multimodal Distilling for
Emotion Recognition").

    X_m --Conv1d (kernel 5) + positions--> P_m
    P_m --shared E^com (one for all m)--> C_m        P_m --private E^prt_m--> S_m      (pointwise Conv1d)
    [S_m; C_m] --decoder D_m--> P'_m (rec)           P'_m --E^prt_m--> S'_m ~ S_m (cyc)
    C_m binned over time, flattened --residual head--> homogeneous logit l^homo_m, repr --HomoGD-->
    C_m --self-attention--> last valid step, [x3] --residual head--> shared logit
    S_* --crossmodal transformers (MulT)--> h_m (B, 2d) --residual head--> l^hetero_m, repr --HeteroGD-->
    [sigmoid(W_m h_m) for m; sigmoid(W_c [c_t; c_a; c_v])] (B, 9d) --residual head--> sentiment score

The paper: each modality's features are decoupled into a modality-irrelevant (homogeneous) space, by an
encoder shared by all modalities, and a modality-exclusive (heterogeneous) space, by one encoder per
modality; a decoder reconstructs the input from both parts (self-regression), the exclusive part is
recovered from the reconstruction (cycle consistency), the two parts are kept apart by a cosine
orthogonality term, and a margin (triplet) loss pulls together homogeneous features of same-label samples
across modalities and pushes different-label ones apart by a margin that grows with the label gap.
A graph distillation unit (GD-Unit) in each space distils between the unimodal predictions: a directed
graph over the modalities whose edge weight w_{i->j} (distillation from teacher i to student j) is
predicted from the two vertices' logits and representations, g([z_i; z_j]), and the unit's loss is
sum_{i != j} w_{i->j} |l_i - l_j|, the teacher's logit held fixed. HomoGD works on the homogeneous
features directly, HeteroGD on the exclusive features after MulT's crossmodal transformers.

Chosen here:
- Edge weights: softmax over each student's teachers, so `edges[b, j, :]` (student j) sums to 1 and the
  diagonal is 0 (the normalisation of graph distillation, Luo et al., ECCV 2018, which the authors' kernel
  builds on). The authors' code takes one softmax over all six edges, adds a fixed prior favouring L->A,
  L->V (and V->A in HeteroGD) and regularises the batch mean towards it; HeteroGD's code also distils the
  representations. Neither is in the paper's equation; only the logit term is kept.
- The authors flatten whole sequences (46 steps after the unpadded kernel-5 Conv1d of 50 aligned steps) into
  Linear layers (the margin loss's features and the homogeneous heads). That ties the model to one length
  and reads padded steps; here each sample's VALID steps are averaged into `bins` equal time bins first
  (46, the authors' flattened length, so the layers keep their size), which also serves unaligned data.
- Transformers read each sequence's last valid step (the code reads index -1, a padded step when padded);
  pre-LayerNorm layers, GELU, positions added once by the projection, no future masking (`crossmodal.py`).
  The authors' attention-probability dropouts (0.3/0.2/0.0) have no counterpart; `embed_dropout` acts on
  the transformers' inputs.
- Frozen 768-d BERT features, standardised, replace the fine-tuned BERT; `input_dropout.text` is the
  authors' text dropout 0.5. Reconstruction and cycle targets are detached (`losses.reconstruction`);
  orthogonality is `losses.orthogonality` (squared cosine per valid step).
- Loss weights reproduce the authors' sum (trains/singleTask/DMD.py): task + the seven auxiliary heads' L1
  (each weight 1; here their mean, weight 7) + 0.1 (rec + cyc, summed over modalities; here means,
  weight 0.3) + 0.01 (margin + orth summed over modalities: margin 0.01, orth 0.03) + 0.05 per GD-Unit.

Published MOSI (paper Table 1, word-aligned, fine-tuned BERT; quoted, not re-read here): Acc-7 45.6,
Acc-2 86.0, F1 86.0 (the paper reports no MAE/Corr).

Parameters, authors' MOSI configuration (aligned 50 steps, d = 50, 10 heads, nlevels 4, kernels 5/5/5)
without BERT, counted by hand from their layer definitions (trains/singleTask/model/dmd.py and the two
distillation kernels built in run.py, all in the optimizer): 4,750,732 = projections 198,250; E^prt, E^com
10,000; decoders 15,000; flattened-sequence Linear layers (46 x 50 = 2,300 inputs) proj_cosine 345,150,
align_c 345,150, homogeneous heads 703,953; self-attention on C 368,100 (4 layers of 30,650 + LayerNorm,
x 3); shared head 45,451; crossmodal 736,200 (6 x 122,700); memory 1,456,200 (3 x 485,400 at 2d = 100);
heterogeneous heads 60,903; gates 52,950; fusion head 406,351; GD kernels 3,649 + 3,425. proj_cosine_*
feed no output and no loss: the model the forward pass uses has 4,405,582. Ours at the default section
with MOSI dims: 4,407,982 (+0.05 %; the source's own LayerNorm in each crossmodal layer adds 2,400).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mdkat import MODALITIES
from mdkat.config import Positive, PositiveFloat, Probability
from mdkat.data import Batch
from mdkat.models import losses
from mdkat.models.base import Model, ModelOutput, weighted_total
from mdkat.models.crossmodal import MultimodalTransformer, ResidualHead, last_valid
from mdkat.models.encoders import Encoder, EncoderConfig, masked_mean, projections, valid_mask


class DMDConfig(EncoderConfig):
    """`model.dmd`: projection and transformers (EncoderConfig), binning, heads, GD-Units, margin."""

    memory_layers: Positive  # self-attention layers after the crossmodal transformers
    embed_dropout: Probability  # on the transformers' inputs
    out_dropout: Probability  # in every residual head
    bins: Positive  # time bins of the flattened homogeneous features
    homo_gd_hidden: Positive  # HomoGD: width of the logit and representation embeddings
    hetero_gd_hidden: Positive
    edge_scale: PositiveFloat  # edge scores are multiplied by this before the softmax
    margin_scale: PositiveFloat  # margin = margin_scale x |label gap| of a negative pair


@dataclass
class DMDOutput(ModelOutput):
    """`ModelOutput` with DMD's auxiliary predictions, graphs and the features its terms compare."""

    homo: dict[str, Tensor] = field(default_factory=dict)  # (B,) logits from C_m
    hetero: dict[str, Tensor] = field(default_factory=dict)  # (B,) logits from h_m (also `unimodal`)
    shared: Tensor | None = None  # (B,) logit from the self-attended C_*
    homo_edges: Tensor | None = None  # (B, M, M) [student, teacher]
    hetero_edges: Tensor | None = None  # (B, M, M)
    aligned_shared: dict[str, Tensor] = field(default_factory=dict)  # (B, d) margin-loss features of C_m
    cycled: dict[str, Tensor] = field(default_factory=dict)  # (B, T_m, d) E^prt_m(D_m([S_m; C_m]))


def time_bins(x: Tensor, lengths: Tensor, bins: int) -> Tensor:
    """Average each sample's valid steps into `bins` equal spans: x (B, T, d), lengths (B,) -> (B, bins, d).

    Bin k covers steps [floor(k L / K), ceil((k + 1) L / K)) of a sample of length L, so every bin holds at
    least one step even when L < K; padded steps get weight 0.
    """
    length = lengths.clamp(min=1)[:, None]  # (B, 1)
    k = torch.arange(bins, device=x.device)[None, :]  # (1, K)
    start = k * length // bins  # (B, K)
    end = ((k + 1) * length + bins - 1) // bins
    t = torch.arange(x.shape[1], device=x.device)[None, None, :]  # (1, 1, T)
    weight = ((t >= start[..., None]) & (t < end[..., None])).to(x.dtype)  # (B, K, T)
    return (weight / weight.sum(-1, keepdim=True)) @ x


class GraphDistillation(nn.Module):
    """A GD-Unit's dynamic graph: edge weights from the vertices' logits (B, M) and representations (B, M, r).

    Returns (B, M, M) with [b, j, i] the weight of distillation from teacher i to student j: non-negative,
    0 on the diagonal, each row (one student) summing to 1.
    """

    def __init__(self, repr_dim: int, hidden: int, scale: float):
        super().__init__()
        self.logit = nn.Linear(1, hidden)
        self.repr = nn.Linear(repr_dim, hidden)
        self.edge = nn.Linear(4 * hidden, 1)
        self.scale = scale

    def forward(self, logits: Tensor, reprs: Tensor) -> Tensor:
        z = torch.cat([self.logit(logits.unsqueeze(-1)), self.repr(reprs)], dim=-1)  # (B, M, 2h)
        b, m, h = z.shape
        pair = torch.cat(
            [z[:, :, None].expand(b, m, m, h), z[:, None, :].expand(b, m, m, h)], -1
        )  # (B, j, i, 4h)
        score = self.edge(pair).squeeze(-1).float() * self.scale  # (B, M, M)
        self_loop = torch.eye(m, dtype=torch.bool, device=z.device)
        return score.masked_fill(self_loop, float("-inf")).softmax(-1)


def distillation(logits: Tensor, edges: Tensor) -> Tensor:
    """sum_{j,i} w_{i->j} |l_j - l_i| per sample, teachers l_i held fixed, batch mean: (B, M), (B, M, M)."""
    logits = logits.float()
    gap = (logits[:, :, None] - logits.detach()[:, None, :]).abs()  # (B, student, teacher)
    return (edges * gap).sum((1, 2)).mean()


def margin_loss(features: Tensor, label: Tensor, scale: float, budget: int = 1 << 22) -> Tensor:
    """Triplet hinge over the B x M features (B, M, d): for anchor a, positive p (same label, a != p) and
    negative n (other label), max(0, scale |y_a - y_n| - cos(a, p) + cos(a, n)), averaged per anchor over its
    (p, n) pairs, then over anchors that have both. Anchors are processed in chunks of `budget` triplets."""
    x = F.normalize(features.float().flatten(0, 1), dim=-1)  # (N, d), N = B M
    y = label.float().repeat_interleave(features.shape[1])  # (N,)
    n = x.shape[0]
    cos = x @ x.T  # (N, N)
    same = (y[:, None] == y[None, :]) & ~torch.eye(n, dtype=torch.bool, device=x.device)
    other = y[:, None] != y[None, :]
    margin = scale * (y[:, None] - y[None, :]).abs()  # (N, N)
    pairs = same.sum(1) * other.sum(1)  # (N,)
    step = max(1, budget // (n * n))
    per_anchor = []
    for a in range(0, n, step):
        s = slice(a, a + step)
        hinge = F.relu(margin[s, None, :] - cos[s, :, None] + cos[s, None, :])  # (A, positive, negative)
        per_anchor.append((hinge * (same[s, :, None] & other[s, None, :])).sum((1, 2)))
    total = torch.cat(per_anchor) / pairs.clamp(min=1)  # (N,)
    return total.sum() / (pairs > 0).sum().clamp(min=1)


class DMD(Model):
    """Decoupled homogeneous/heterogeneous spaces, a graph distillation unit in each, and a gated fusion."""

    Config = DMDConfig
    LABEL = "DMD (Li et al., 2023)"
    WEIGHTED_TERMS = ("unimodal", "rec", "cyc", "margin", "orth", "homo_gd", "hetero_gd")

    def __init__(
        self,
        cfg: DMDConfig,
        dims: dict[str, int],
        aligned: bool = False,
        sizes: Mapping[str, int] | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        d, k, drop = cfg.width, cfg.bins, cfg.out_dropout
        self.projection = projections(cfg, {m: dims[m] for m in MODALITIES})
        # pointwise Conv1d encoders without bias, as the authors'
        self.private = nn.ModuleDict({m: nn.Linear(d, d, bias=False) for m in MODALITIES})
        self.shared = nn.Linear(d, d, bias=False)
        self.decoders = nn.ModuleDict({m: nn.Linear(2 * d, d, bias=False) for m in MODALITIES})
        self.align = nn.ModuleDict({m: nn.Linear(k * d, d) for m in MODALITIES})
        self.homo_heads = nn.ModuleDict({m: ResidualHead(k * d, d, drop) for m in MODALITIES})
        self.shared_encoders = nn.ModuleDict(
            {m: Encoder(d, cfg.heads, cfg.layers, cfg.dropout) for m in MODALITIES}
        )
        self.shared_head = ResidualHead(len(MODALITIES) * d, len(MODALITIES) * d, drop)
        self.fusion = MultimodalTransformer(
            MODALITIES, d, cfg.heads, cfg.layers, cfg.memory_layers, cfg.dropout
        )
        self.hetero_heads = nn.ModuleDict({m: ResidualHead(2 * d, 2 * d, drop) for m in MODALITIES})
        self.homo_gd = GraphDistillation(d, cfg.homo_gd_hidden, cfg.edge_scale)
        self.hetero_gd = GraphDistillation(2 * d, cfg.hetero_gd_hidden, cfg.edge_scale)
        self.gates = nn.ModuleDict({m: nn.Linear(2 * d, 2 * d) for m in MODALITIES})
        self.shared_gate = nn.Linear(len(MODALITIES) * d, len(MODALITIES) * d)
        fused = len(MODALITIES) * 3 * d  # 9d
        self.head = ResidualHead(fused, fused, drop)
        self.embed_dropout = nn.Dropout(cfg.embed_dropout)

    @property
    def decoupled(self) -> bool:
        """The shared encoder gives C_m, the private ones S_m."""
        return True

    def forward(self, batch: Batch) -> DMDOutput:
        valid = {m: valid_mask(batch.lengths(m), batch.features(m).shape[1]) for m in MODALITIES}  # (B, T_m)
        # a sample without steps reads its zeroed step 0 rather than nothing (NaN attention, empty bins)
        lengths = {m: batch.lengths(m).clamp(min=1) for m in MODALITIES}  # (B,)
        mask = {m: valid_mask(lengths[m], valid[m].shape[1]) for m in MODALITIES}
        projected = {m: self.projection[m](batch.features(m), valid[m]) for m in MODALITIES}  # (B, T_m, d)
        specific = {m: self.private[m](projected[m]) for m in MODALITIES}  # S_m (B, T_m, d)
        independent = {m: self.shared(projected[m]) for m in MODALITIES}  # C_m (B, T_m, d)
        reconstructed = {
            m: self.decoders[m](torch.cat([specific[m], independent[m]], -1)) for m in MODALITIES
        }  # (B, T_m, d)
        cycled = {m: self.private[m](reconstructed[m]) for m in MODALITIES}  # (B, T_m, d)

        # homogeneous space: heads over the time-binned C_m, then HomoGD
        binned = {m: time_bins(independent[m], lengths[m], self.cfg.bins).flatten(1) for m in MODALITIES}
        aligned_shared = {m: self.align[m](binned[m]) for m in MODALITIES}  # (B, d)
        homo_parts = {m: self.homo_heads[m].parts(binned[m]) for m in MODALITIES}
        homo = {m: homo_parts[m][2] for m in MODALITIES}  # (B,)
        homo_edges = self.homo_gd(
            torch.stack([homo[m] for m in MODALITIES], 1),
            torch.stack([homo_parts[m][0] for m in MODALITIES], 1),  # (B, M, d) the heads' W1 x
        )
        shared_last = torch.cat(
            [
                last_valid(self.shared_encoders[m](self.embed_dropout(independent[m]), mask[m]), lengths[m])
                for m in MODALITIES
            ],
            dim=-1,
        )  # (B, 3d)
        shared = self.shared_head(shared_last)  # (B,)

        # heterogeneous space: MulT over S_*, heads, then HeteroGD
        h = self.fusion({m: self.embed_dropout(specific[m]) for m in MODALITIES}, mask, lengths)  # (B, 2d)
        hetero_parts = {m: self.hetero_heads[m].parts(h[m]) for m in MODALITIES}
        hetero = {m: hetero_parts[m][2] for m in MODALITIES}  # (B,)
        hetero_edges = self.hetero_gd(
            torch.stack([hetero[m] for m in MODALITIES], 1),
            torch.stack([hetero_parts[m][1] for m in MODALITIES], 1),  # (B, M, 2d) residual outputs
        )

        # the authors' gates replace each feature by sigmoid(W x) (they do not multiply x by it)
        gated = [torch.sigmoid(self.gates[m](h[m])) for m in MODALITIES]
        gated.append(torch.sigmoid(self.shared_gate(shared_last)))
        pred = self.head(torch.cat(gated, dim=-1))  # (B,)

        return DMDOutput(
            pred=pred,
            mask=valid,
            unimodal=hetero,
            independent=independent,
            specific=specific,
            pooled_independent={m: masked_mean(independent[m], mask[m]) for m in MODALITIES},
            pooled_specific={m: masked_mean(specific[m], mask[m]) for m in MODALITIES},
            projected=projected,
            reconstructed=reconstructed,
            homo=homo,
            hetero=hetero,
            shared=shared,
            homo_edges=homo_edges,
            hetero_edges=hetero_edges,
            aligned_shared=aligned_shared,
            cycled=cycled,
        )

    def loss(
        self, out: DMDOutput, batch: Batch, weights: Mapping[str, float]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Total loss and every term by name (detached), `task` with weight 1 and the others weighted."""
        label = batch.label
        mask = {m: valid_mask(batch.lengths(m).clamp(min=1), out.mask[m].shape[1]) for m in MODALITIES}
        auxiliary = [*out.homo.values(), *out.hetero.values(), out.shared]
        terms = {
            "task": losses.l1(out.pred, label),
            "unimodal": torch.stack([losses.l1(p, label) for p in auxiliary]).mean(),
            "rec": losses.reconstruction(out.reconstructed, out.projected, mask),
            "cyc": losses.reconstruction(out.cycled, out.specific, mask),
            "margin": margin_loss(
                torch.stack([out.aligned_shared[m] for m in MODALITIES], 1), label, self.cfg.margin_scale
            ),
            "orth": losses.orthogonality(out.independent, out.specific, mask),
            "homo_gd": distillation(torch.stack([out.homo[m] for m in MODALITIES], 1), out.homo_edges),
            "hetero_gd": distillation(torch.stack([out.hetero[m] for m in MODALITIES], 1), out.hetero_edges),
        }
        total = weighted_total(terms, weights)
        return total, {name: value.detach() for name, value in terms.items()}
