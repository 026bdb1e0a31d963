"""Self-MM (Yu, Xu, Yuan, Wu, AAAI 2021, "Learning Modality-Specific Representations with Self-Supervised
Multi-Task Learning for Multimodal Sentiment Analysis").

    text: masked mean over valid steps --dropout, linear--> h_t
    audio, vision: LSTM over valid steps (packed) --final state--> dropout, linear --> h_a, h_v
    h_m --dropout, linear, ReLU--> F_m --linear, ReLU, linear--> y_m          (unimodal tasks)
    [h_t; h_a; h_v] --dropout, linear, ReLU--> F_f --linear, ReLU, linear--> y_f = pred   (multimodal task)
    ULGM: F_f, F_m, the class centres and the human label y --> generated unimodal label y_s^m per sample

The paper. Each unimodal head learns from a label generated for it, per training sample, by the unimodal
label generation module (ULGM); the fused head learns from the human label y. For each representation
i in {f, t, a, v}, positive and negative centres are the means of the stored representations F_i(j) of
the training samples j whose label under i is positive or negative (the human label for f, the generated
one for t, a, v; zero labels belong to neither):
    C_i^p = sum_j 1[y_i(j) > 0] F_i(j) / sum_j 1[y_i(j) > 0]          (C_i^n likewise with y_i(j) < 0)
    D_i^p = ||F_i - C_i^p||^2 / sqrt(d_i),   alpha_i = (D_i^n - D_i^p) / (D_i^p + eps)
Assuming that labels relate to the relative distances both by ratio (y_s / y_f = alpha_s / alpha_f) and by
difference (y_s - y_f = alpha_s - alpha_f), the new estimate is their mean:
    y_s = (y alpha_s / alpha_f + y + alpha_s - alpha_f) / 2 = y + delta_sf,
    delta_sf = (alpha_s - alpha_f) (y + alpha_f) / (2 alpha_f),
clipped to [-H, H]. It is folded into the sample's label with a momentum that grows with the epoch n:
    y_s^(n) = (n - 1) / (n + 1) y_s^(n-1) + 2 / (n + 1) y_s,
i.e. the n-th label is the mean of all estimates weighted by their epoch. Unimodal labels start as y and the
first update is in the second epoch (the centres need every sample's representation): the sample's first
update moves its label 2/3 of the way to the new estimate, the second 1/2, the third 2/5.
    loss = |y_f - y| + sum_m w_m |y_m - y_s^m|,   w_m = tanh(|y_s^m - y|)      (means over the batch)
w_m steers each unimodal head to the samples whose generated label differs from the human one; it is zero
while the labels are equal, so a unimodal head learns from a sample only from the third epoch on (the loss
reads a batch's labels before their update, as in the authors' trainer).

Chosen here (the widths, dropouts and H of MMSA's MOSI entry: thuiar/MMSA, config_regression.json,
"self_mm"; the ULGM as in the authors' trainer, thuiar/Self-MM trains/SELF_MM.py, and MMSA's):
- Text: frozen 768-d features replace fine-tuned BERT's [CLS]. Without fine-tuning [CLS] is no sentence
  summary, so the text path is the mean of the standardised features over the valid steps (the usual
  sentence vector of a frozen BERT: its states are already contextual, which an LSTM would only repeat),
  then a trainable linear layer to `encoder_out.text` (768, the [CLS] width the post-layers read) in
  place of fine-tuning. `text_pooling: first` reads step 0 instead: [CLS] when the text comes from the
  fine-tuned BERT of `model.text_encoder: bert`.
- Inputs are standardised per feature with the training split's statistics (`Projection`'s buffers, set
  by `fit_input_statistics`), without the projection's convolution and positions: the LSTMs and the mean
  read the features themselves, as in the paper. Padded steps are zeroed, and a sample without valid
  steps reads one zero step.
- Per-sample counts instead of epochs: a sample's n is the number of training forwards that have seen it
  (the loop shows every sample once per epoch, so n is the epoch); its label is updated from its second
  forward on. Centres are taken over the samples seen so far, from the representation stored at each
  one's last forward (the authors' trainer stores a batch's representations after updating its labels and
  recomputes the centres after every batch: the same order here).
- The update runs in `forward`, in training mode only, under `no_grad` on detached float32 copies; the
  loss's targets are the labels read before it, as in the authors' trainer (loss first, then the update).
  In eval mode the unimodal targets are the human labels (so the unimodal term is zero there, and the
  validation loss is the task L1, as the authors validate).
- `squared_distance`: the paper's ||.||^2 / sqrt(d) (the sqrt(d) cancels in alpha). The authors' released
  trainer, which produced the published numbers, uses the plain L2 norm; `false` selects it.
- eps = 1e-8 as in the authors' code, also in the ratio's alpha_f; a NaN estimate (0 / 0) keeps y.
- No gradient accumulation (MMSA steps every 4 batches of 16) nor per-part learning rates: the one loop.

State (buffers, in every checkpoint, sized by `sizes["train"]`, indexed by `Batch.index`): the human label,
the three generated labels, the four stored representations and the forward count of each training
sample. A model built without `sizes` has empty buffers: it predicts, but cannot train.

Published MOSI (regression, test split): paper (fine-tuned BERT; as cited by later papers, the table not
re-read here): Acc-2 84.00 / 85.98 (negative vs. non-negative / non-zero), F1 84.42 / 85.95, MAE 0.713,
Corr 0.798. MMSA's reproduction (thuiar/MMSA results/result-stat.md, unaligned, unchanged since May
2021): Acc-2 83.44 / 85.46, F1 83.36 / 85.43, Acc-7 46.67, MAE 0.708, Corr 0.796.

Trainable parameters at the default section with MOSI dims (768, 5, 20): 749,924, of which 590,592 are the
text linear layer and 104,576 the first fusion layer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from mdkat import MODALITIES
from mdkat.config import (
    PerModality,
    PerModalityCount,
    PerModalityRate,
    Positive,
    PositiveFloat,
    Probability,
    Section,
)
from mdkat.data import Batch
from mdkat.distributed import gather_rows
from mdkat.models import losses
from mdkat.models.base import Model, ModelOutput, weighted_total
from mdkat.models.encoders import InputNormalisation, LastState, masked_mean, valid_mask

SEQUENTIAL = ("audio", "vision")  # read by an LSTM
REPRESENTATIONS = ("fusion", *MODALITIES)  # F_f, F_t, F_a, F_v: what the ULGM measures
EPS = 1e-8  # the authors' MIN


class AudioVision(Section):
    """One positive integer for each LSTM-read modality."""

    audio: Positive
    vision: Positive


class AudioVisionRate(Section):
    """One probability for each LSTM-read modality."""

    audio: Probability
    vision: Probability


class SelfMMConfig(Section):
    """`model.self_mm`: subnetwork widths, dropouts and the ULGM's label bound and distance."""

    input_pca: PerModalityCount  # whitened principal components per modality (0: standardise only)
    text_pooling: Literal["mean", "first"]  # frozen features: mean over valid steps; fine-tuned BERT: [CLS]
    text_dropout: Probability  # on the pooled text, before its linear layer
    lstm_hidden: AudioVision  # LSTM units
    lstm_dropout: AudioVisionRate  # on the LSTM's final state
    encoder_out: PerModality  # dim of h_m
    post_dim: PerModality  # dim of F_m (the ULGM's unimodal representations) and of the head's hidden layer
    post_dropout: PerModalityRate  # on h_m before its post-layer
    fusion_dim: Positive  # dim of F_f and of the fused head's hidden layer
    fusion_dropout: Probability  # on [h_t; h_a; h_v]
    label_bound: PositiveFloat  # H: generated labels are clipped to [-H, H]
    squared_distance: bool  # the paper's ||.||^2 / sqrt(d); false: the authors' code's ||.||


@dataclass
class SelfMMOutput(ModelOutput):
    """`ModelOutput` with the fusion representation and the unimodal heads' targets."""

    fused: Tensor | None = None  # (B, fusion_dim) F_f
    targets: dict[str, Tensor] = field(default_factory=dict)  # (B,) y_s^m, the human label in eval mode


def head(width: int) -> nn.Sequential:
    """The classifier on a representation: linear, ReLU, linear to one score."""
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1))


def relative_distance(f: Tensor, positive: Tensor, negative: Tensor, squared: bool) -> Tensor:
    """alpha = (D^n - D^p) / (D^p + eps) of representations f (B, d) to centres (d,): (B,)."""
    if squared:  # the paper: ||F - C||^2 / sqrt(d)
        scale = math.sqrt(f.shape[-1])
        d_p = (f - positive).pow(2).sum(-1) / scale
        d_n = (f - negative).pow(2).sum(-1) / scale
    else:  # the authors' code: ||F - C||
        d_p = (f - positive).norm(dim=-1)
        d_n = (f - negative).norm(dim=-1)
    return (d_n - d_p) / (d_p + EPS)


def unimodal_estimate(label: Tensor, alpha_s: Tensor, alpha_f: Tensor, bound: float) -> Tensor:
    """The mean of the ratio and the difference relations, clipped to [-bound, bound]; y where it is NaN."""
    ratio = label * alpha_s / (alpha_f + EPS)  # y_s / y = alpha_s / alpha_f
    difference = label + alpha_s - alpha_f  # y_s - y = alpha_s - alpha_f
    estimate = 0.5 * (ratio + difference)
    return torch.where(torch.isnan(estimate), label, estimate).clamp(-bound, bound)


class UnimodalLabels(nn.Module):
    """The ULGM: per training sample, the human label, the generated unimodal labels, the stored
    representations and the number of training forwards that have seen it (buffers, so that a checkpoint
    resumes them exactly and a weights' average copies them)."""

    human: Tensor
    generated: Tensor
    visits: Tensor

    def __init__(self, n: int, dims: Mapping[str, int], bound: float, squared: bool):
        super().__init__()
        self.bound, self.squared = bound, squared
        self.register_buffer("human", torch.zeros(n))  # (N,) y
        self.register_buffer("generated", torch.zeros(n, len(MODALITIES)))  # (N, 3) y_s^t, y_s^a, y_s^v
        self.register_buffer("visits", torch.zeros(n, dtype=torch.long))  # (N,) training forwards seen
        for name in REPRESENTATIONS:
            self.register_buffer(f"memory_{name}", torch.zeros(n, dims[name]))  # (N, d_i) last F_i

    def memory(self, name: str) -> Tensor:
        """(N, d_i) the representation F_i stored for each training sample."""
        return getattr(self, f"memory_{name}")

    def labels(self, name: str) -> Tensor:
        """(N,) the labels under representation `name`: human for the fusion, generated for a modality."""
        return self.human if name == "fusion" else self.generated[:, MODALITIES.index(name)]

    def centres(self, name: str) -> tuple[Tensor, Tensor]:
        """(d_i,), (d_i,): the means of the stored F_i of the seen samples with positive / negative labels."""
        seen, labels, memory = self.visits > 0, self.labels(name), self.memory(name)
        centres = []
        for side in (labels > 0, labels < 0):
            weight = (seen & side).to(memory.dtype)  # (N,)
            centres.append(weight @ memory / weight.sum().clamp_min(1.0))
        return centres[0], centres[1]

    def estimate(self, index: Tensor, features: Mapping[str, Tensor]) -> Tensor:
        """(B, 3) new unimodal label estimates of the samples at `index`, whose F_i are (B, d_i)."""
        alpha = {
            name: relative_distance(features[name], *self.centres(name), squared=self.squared)
            for name in REPRESENTATIONS
        }  # (B,) each
        label = self.human[index]  # (B,)
        return torch.stack(
            [unimodal_estimate(label, alpha[m], alpha["fusion"], self.bound) for m in MODALITIES], dim=-1
        )

    @torch.no_grad()
    def step(self, index: Tensor, label: Tensor, features: Mapping[str, Tensor]) -> Tensor:
        """One training batch: (B, 3) the labels to train on now, then the update of its samples' state."""
        # under torchrun: the update from the global batch (G samples) on every rank, so that the state
        # stays identical; this rank trains on its own rows of it
        rows = len(index)
        index, offset = gather_rows(index)
        # centres and distances in float32, also under the training loop's bf16 autocast
        with torch.autocast(index.device.type, enabled=False):
            features = {name: gather_rows(features[name].detach().float())[0] for name in REPRESENTATIONS}
            label = gather_rows(label.detach().float())[0]  # (G,); features F_i (G, d_i)
            first = self.visits[index] == 0  # (B,)
            self.human[index] = label
            self.generated[index] = torch.where(first[:, None], label[:, None], self.generated[index])
            targets = self.generated[index]  # (B, 3), a copy: the loss reads the labels before the update
            n = (self.visits[index] + 1).float()[:, None]  # (B, 1) this forward's number: the paper's epoch
            # (n - 1) / (n + 1) of the old label and 2 / (n + 1) of the new estimate
            moved = torch.lerp(targets, self.estimate(index, features), 2.0 / (n + 1.0))
            self.generated[index] = torch.where(first[:, None], targets, moved)  # a first forward only starts
            for name in REPRESENTATIONS:
                self.memory(name)[index] = features[name]
            self.visits[index] += 1
        return targets[offset : offset + rows]


class SelfMM(Model):
    """Unimodal and fused heads on LSTM / pooled representations; unimodal labels generated by the ULGM."""

    Config = SelfMMConfig
    LABEL = "Self-MM (Yu et al., 2021)"
    WEIGHTED_TERMS = ("unimodal",)

    def __init__(
        self,
        cfg: SelfMMConfig,
        dims: dict[str, int],
        aligned: bool = False,
        sizes: Mapping[str, int] | None = None,
    ):
        super().__init__()
        out, post = cfg.encoder_out, cfg.post_dim
        self.text_pooling = cfg.text_pooling
        self.normalise = nn.ModuleDict(
            {m: InputNormalisation(dims[m], getattr(cfg.input_pca, m)) for m in MODALITIES}
        )
        self.text_dropout = nn.Dropout(cfg.text_dropout)
        self.text = nn.Linear(self.normalise["text"].size, out.text)
        self.sequential = nn.ModuleDict(
            {
                m: LastState(
                    self.normalise[m].size,
                    getattr(cfg.lstm_hidden, m),
                    getattr(out, m),
                    getattr(cfg.lstm_dropout, m),
                )
                for m in SEQUENTIAL
            }
        )
        widths = {"fusion": cfg.fusion_dim, **{m: getattr(post, m) for m in MODALITIES}}
        inputs = {m: getattr(out, m) for m in MODALITIES}
        inputs["fusion"] = sum(inputs.values())
        rates = {"fusion": cfg.fusion_dropout, **{m: getattr(cfg.post_dropout, m) for m in MODALITIES}}
        self.post_dropout = nn.ModuleDict({name: nn.Dropout(rates[name]) for name in REPRESENTATIONS})
        self.post = nn.ModuleDict({name: nn.Linear(inputs[name], widths[name]) for name in REPRESENTATIONS})
        self.heads = nn.ModuleDict({name: head(widths[name]) for name in REPRESENTATIONS})
        self.stateful = sizes is not None and "train" in sizes
        self.ulgm = UnimodalLabels(
            sizes["train"] if self.stateful else 0, widths, cfg.label_bound, cfg.squared_distance
        )

    def encode(self, batch: Batch, mask: dict[str, Tensor]) -> dict[str, Tensor]:
        """h_m (B, encoder_out_m) of each modality."""
        x = {m: self.normalise[m](batch.features(m), mask[m]) for m in MODALITIES}  # (B, T_m, k_m)
        pooled = masked_mean(x["text"], mask["text"]) if self.text_pooling == "mean" else x["text"][:, 0]
        h = {"text": self.text(self.text_dropout(pooled))}  # (B, out_t)
        h.update({m: self.sequential[m](x[m], batch.lengths(m)) for m in SEQUENTIAL})  # (B, out_m)
        return h

    def forward(self, batch: Batch) -> SelfMMOutput:
        mask = {m: valid_mask(batch.lengths(m), batch.features(m).shape[1]) for m in MODALITIES}
        h = self.encode(batch, mask)
        h["fusion"] = torch.cat([h[m] for m in MODALITIES], dim=-1)  # (B, sum out_m)
        features = {
            name: torch.relu(self.post[name](self.post_dropout[name](h[name]))) for name in REPRESENTATIONS
        }  # F_i (B, d_i)
        scores = {name: self.heads[name](features[name]).squeeze(-1) for name in REPRESENTATIONS}  # (B,)
        if self.training:
            if not self.stateful:
                raise ValueError(
                    "Self-MM keeps generated labels per training sample: build it with sizes['train'] "
                    "(the number of training samples) to train it"
                )
            generated = self.ulgm.step(batch.index, batch.label, features)  # (B, 3)
            targets = {m: generated[:, i] for i, m in enumerate(MODALITIES)}
        else:
            targets = {m: batch.label.float() for m in MODALITIES}
        return SelfMMOutput(
            pred=scores["fusion"],
            mask=mask,
            unimodal={m: scores[m] for m in MODALITIES},
            pooled_specific={m: features[m] for m in MODALITIES},
            fused=features["fusion"],
            targets=targets,
        )

    def loss(
        self, out: SelfMMOutput, batch: Batch, weights: Mapping[str, float]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Task L1 and the unimodal L1s to the generated labels, each sample weighted by tanh(|y_s - y|)."""
        label = batch.label.float()
        terms = []
        for m in MODALITIES:
            target = out.targets[m]  # (B,) y_s^m
            weight = torch.tanh((target - label).abs())  # (B,) w_m
            terms.append((weight * (out.unimodal[m].float() - target).abs()).mean())
        unimodal = torch.stack(terms).sum()
        named = {"task": losses.l1(out.pred, batch.label), "unimodal": unimodal}
        return weighted_total(named, weights), {k: v.detach() for k, v in named.items()}
