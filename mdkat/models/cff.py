"""CFF: Cross-modal Feature Fusion, which enhances the modality-independent features.

The abstract states that CFF "enhances modality-independent features"; it gives no architecture. We
follow the cross-modal transformers of MulT and DMD (which DMD applies to its modality-independent
features): each modality's independent sequence C_m queries the other modalities' independent sequences
(their steps concatenated, padding masked), the attended information enters through a learned sigmoid
gate (so a modality can ignore partners with nothing to add), then a feed-forward layer. The enhanced
sequences are mean-pooled over valid steps and fused by a linear layer into one modality-independent
vector c. Without CFF (`model.mdkat.use_cff: false`) c is the plain average of the pooled C_m, with no
parameters. One softmax over the partners' joined steps (not one attention per pair, as MulT has) costs
half the attention calls; with unaligned data the partner with more steps (vision's 500 against text's
50) gets more of the attention mass by count, which the gate and the learned scores must outweigh.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mdkat.models.encoders import Attention, FeedForward, key_mask, masked_mean


class CrossModalLayer(nn.Module):
    """Queries from one modality attend to the others' steps; gated residual, then feed-forward."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.norm_q, self.norm_kv, self.norm_ff = (
            nn.LayerNorm(width),
            nn.LayerNorm(width),
            nn.LayerNorm(width),
        )
        self.attn = Attention(width, heads)
        self.gate = nn.Linear(2 * width, width)
        self.ffn = FeedForward(width, dropout)
        self.norm_out = nn.LayerNorm(width)

    def forward(self, x: Tensor, others: Tensor, others_mask: Tensor) -> Tensor:
        """x (B, T, d) queries; others (B, S, d) keys/values with mask (B, S) -> (B, T, d)."""
        q = self.norm_q(x)
        a = self.attn(q, self.norm_kv(others), key_mask(others_mask))  # (B, T, d)
        g = torch.sigmoid(self.gate(torch.cat([q, a], dim=-1)))  # (B, T, d) how much to take from the others
        x = x + g * a
        return self.norm_out(x + self.ffn(self.norm_ff(x)))


class CrossModalFusion(nn.Module):
    """Enhance each C_m with the other modalities, then pool and fuse them into c (B, d)."""

    def __init__(self, modalities: tuple[str, ...], width: int, heads: int, dropout: float):
        super().__init__()
        self.layers = nn.ModuleDict({m: CrossModalLayer(width, heads, dropout) for m in modalities})
        self.fuse = nn.Linear(len(modalities) * width, width)

    def forward(
        self, independent: dict[str, Tensor], mask: dict[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
        """Returns the enhanced sequences (B, T_m, d), their pooled vectors (B, d), and c (B, d)."""
        enhanced = {}
        for m, layer in self.layers.items():
            others = [n for n in self.layers if n != m]
            kv = torch.cat([independent[n] for n in others], dim=1)  # (B, sum of T_n, d)
            kv_mask = torch.cat([mask[n] for n in others], dim=1)  # (B, sum of T_n)
            enhanced[m] = layer(independent[m], kv, kv_mask)
        pooled = {m: masked_mean(h, mask[m]) for m, h in enhanced.items()}
        c = self.fuse(torch.cat([pooled[m] for m in self.layers], dim=-1))  # (B, d)
        return enhanced, pooled, c
