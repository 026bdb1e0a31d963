"""KA: Knowledge Aggregation, a loss that keeps a sample's modality-independent features alike.

The abstract: KA ensures "the semantic similarity of modality-independent features". We read it as a
prototype-contrastive loss, in the spirit of DMD's homogeneous graph and of supervised contrastive
learning: each modality's pooled independent vector is projected (one head shared by all modalities) and
L2-normalised; the mean over modalities, normalised again, is the sample's prototype. Each modality is
pulled to its own sample's prototype and pushed from the other samples' prototypes, with each negative
weighted by how different its label is, w = 1 - exp(-|y_i - y_j| / LABEL_SCALE): samples with nearly
equal sentiment are hardly pushed apart, since their independent features should agree too.
    loss = mean over m, i of  -s_ii + log(exp(s_ii) + sum_{j != i} w_ij exp(s_ij)),  s = cos / temperature
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mdkat.distributed import gather_rows, gather_rows_with_grad

LABEL_SCALE = 1.0  # label units (the [-3, 3] scale): a gap of one point gives a weight of 0.63


class KnowledgeAggregation(nn.Module):
    """Pooled independent features {m: (B, d)} and labels (B,) -> scalar loss."""

    def __init__(self, width: int, temperature: float):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"model.mdkat.ka_temperature must be positive, got {temperature}")
        self.temperature = temperature
        self.head = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))

    def forward(self, pooled: dict[str, Tensor], label: Tensor) -> Tensor:
        z = F.normalize(self.head(torch.stack(list(pooled.values()))), dim=-1)  # (M, B, d)
        prototype = F.normalize(z.mean(0), dim=-1)  # (B, d)
        labels, offset = label, 0
        if self.training:  # under torchrun: the other ranks' samples are negatives too (G = global batch)
            prototype, offset = gather_rows_with_grad(prototype)  # (G, d)
            labels, _ = gather_rows(label)  # (G,)
        s = torch.einsum("mbd,cd->mbc", z, prototype) / self.temperature  # (M, B, G)
        gap = (label[:, None] - labels[None, :]).abs()  # (B, G)
        weight = 1.0 - torch.exp(-gap / LABEL_SCALE)
        own = torch.arange(len(label), device=label.device)  # sample i's prototype is column offset + i
        weight[own, own + offset] = 1.0
        logits = s + torch.log(weight.clamp_min(1e-12))  # a weight of 0 removes the negative
        positive = s[:, own, own + offset]  # (M, B)
        return (torch.logsumexp(logits, dim=-1) - positive).mean()
