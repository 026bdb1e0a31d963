"""Crossmodal transformers (MulT, Tsai et al., ACL 2019), shared by MulT and DMD.

A crossmodal transformer reinforces a target modality with a source: at every layer the target's steps
(queries) attend to the source's low-level steps (keys/values, the same at every layer), then a
feed-forward block. Layers are pre-LayerNorm, like `encoders.SelfAttentionLayer`; the source has its own
LayerNorm (MulT's code reuses the target's). Padded source steps get no attention (`key_mask`), so a
target step's output depends on the source's valid steps only.

`MultimodalTransformer` is MulT's fusion: six directional crossmodal transformers (V->L, A->L, L->A, V->A,
L->V, A->V); each target's two outputs are concatenated (width 2d), run through a self-attention encoder,
and read at the target's LAST VALID step. MulT's code reads index -1, which for a padded sample is a
padded step; the last valid step keeps predictions independent of appended padding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mdkat.models.encoders import Attention, Encoder, FeedForward, key_mask


class CrossModalLayer(nn.Module):
    """x + Attn(LN x, LN' y), then x + FFN(LN'' x): target x (B, Tx, d) attends to source y (B, Ty, d)."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.norm_target, self.norm_source, self.norm_ffn = (nn.LayerNorm(width) for _ in range(3))
        self.attn = Attention(width, heads)
        self.ffn = FeedForward(width, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, y: Tensor, attn_mask: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.norm_target(x), self.norm_source(y), attn_mask))
        return x + self.ffn(self.norm_ffn(x))


class CrossModalTransformer(nn.Module):
    """Crossmodal layers: target (B, Tx, d), source (B, Ty, d), source mask (B, Ty) -> (B, Tx, d)."""

    def __init__(self, width: int, heads: int, layers: int, dropout: float):
        super().__init__()
        self.layers = nn.ModuleList(CrossModalLayer(width, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(width)

    def forward(self, target: Tensor, source: Tensor, source_mask: Tensor) -> Tensor:
        attn_mask = key_mask(source_mask)  # (B, 1, 1, Ty)
        x = target
        for layer in self.layers:
            x = layer(x, source, attn_mask)  # the source stays the low-level sequence at every layer
        return self.norm(x)


def last_valid(x: Tensor, lengths: Tensor) -> Tensor:
    """The step at `lengths[b] - 1` of each sample: x (B, T, d), lengths (B,) -> (B, d)."""
    index = (lengths.clamp(min=1) - 1).clamp(max=x.shape[1] - 1)  # (B,)
    return x.gather(1, index.view(-1, 1, 1).expand(-1, 1, x.shape[2])).squeeze(1)


def direction(source: str, target: str) -> str:
    """ModuleDict key of the crossmodal transformer from `source` to `target`."""
    return f"{source}_to_{target}"


class MultimodalTransformer(nn.Module):
    """MulT's fusion of M modalities: {m: (B, T_m, d)} -> {m: (B, 2d)} for M = 3 (M-1 sources per target).

    Per target m: [CM_{s->m} for every other s] concatenated (B, T_m, (M-1) d), a self-attention encoder of
    `memory_layers` over m's valid steps, then m's last valid step.
    """

    def __init__(
        self,
        modalities: Sequence[str],
        width: int,
        heads: int,
        layers: int,
        memory_layers: int,
        dropout: float,
    ):
        super().__init__()
        self.modalities = tuple(modalities)
        self.crossmodal = nn.ModuleDict(
            {
                direction(s, t): CrossModalTransformer(width, heads, layers, dropout)
                for t in self.modalities
                for s in self.modalities
                if s != t
            }
        )
        memory_width = (len(self.modalities) - 1) * width
        self.memory = nn.ModuleDict(
            {m: Encoder(memory_width, heads, memory_layers, dropout) for m in self.modalities}
        )

    def forward(
        self, x: dict[str, Tensor], mask: dict[str, Tensor], lengths: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """x {m: (B, T_m, d)}, mask {m: (B, T_m)} (at least one valid step each), lengths {m: (B,)}."""
        out = {}
        for t in self.modalities:
            h = torch.cat(
                [self.crossmodal[direction(s, t)](x[t], x[s], mask[s]) for s in self.modalities if s != t],
                dim=-1,
            )  # (B, T_t, (M-1) d)
            out[t] = last_valid(self.memory[t](h, mask[t]), lengths[t])  # (B, (M-1) d)
        return out


class ResidualHead(nn.Module):
    """MulT's output block: r = x + W2 dropout(relu(W1 x)), then a linear layer to one score.

    (B, D) -> (B,); `hidden` is W1's width (MulT: D; DMD's heads over flattened sequences: a bottleneck).
    """

    def __init__(self, width: int, hidden: int, dropout: float):
        super().__init__()
        self.proj1, self.proj2 = nn.Linear(width, hidden), nn.Linear(hidden, width)
        self.out = nn.Linear(width, 1)
        self.drop = nn.Dropout(dropout)

    def parts(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """W1 x (B, hidden), the residual output r (B, D) and the score (B,)."""
        hidden = self.proj1(x)
        r = x + self.proj2(self.drop(F.relu(hidden)))
        return hidden, r, self.out(r).squeeze(-1)

    def forward(self, x: Tensor) -> Tensor:
        return self.parts(x)[2]
