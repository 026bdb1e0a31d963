"""AMSA: Adaptive Masked Self-Attention, which refines the modality-specific features.

The abstract names AMSA a module "for feature refinement"; the name says the rest: self-attention whose
mask is adaptive. We learn an importance score a_t = sigmoid(logit_t) per time step and use it twice:
- as an additive key bias log a_t (soft, differentiable: a low score lowers a step's attention weight);
- as a hard key mask for steps below `threshold` times the sample's highest score, and for padded steps,
  which therefore get exactly zero attention. Relative to the sample's maximum, so at least one step is
  always kept and the mask does not depend on how much padding follows.
The refined sequence is pooled with the importance scores as weights over the kept steps. Distractor
frames (sentiment-looking steps that carry no label information) are what this is meant to silence.
Without AMSA (`model.mdkat.use_amsa: false`) the specific sequence is mean-pooled over valid steps.

Where the score comes from is our choice, measured on the synthetic data (README, "Results"):
- logit_t = w . P_t, from the projected input of step t, not from the encoded sequence: self-attention
  spreads every step's content over the whole sequence, and a score read from the encoded S_m never
  learned to tell cue steps apart (cue AUC 0.51);
- on aligned data (one time axis for all modalities) the logit of step t is the sum of every modality's
  w_m . P_{m,t}, one score per moment shared by the three AMSAs: a sentiment cue is a moment (a word with
  the voice and face that go with it), and a weak modality cannot find its cues alone (audio's and
  vision's own features allow a cue AUC of 0.68 at best; the shared score reaches 0.90). Unaligned, each
  modality scores its own steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mdkat.models.encoders import SelfAttentionLayer


class AdaptiveMaskedSelfAttention(nn.Module):
    """(B, T, d), mask (B, T), logit (B, T) -> refined (B, T, d), pooled (B, d), importance (B, T)."""

    def __init__(self, width: int, heads: int, dropout: float, threshold: float):
        super().__init__()
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"model.mdkat.amsa_threshold must lie in [0, 1), got {threshold}")
        self.threshold = threshold
        self.score = nn.Linear(width, 1)
        self.layer = SelfAttentionLayer(width, heads, dropout)
        self.norm = nn.LayerNorm(width)

    def logit(self, projected: Tensor) -> Tensor:
        """This modality's importance logits (B, T) from its projected input (B, T, d)."""
        return self.score(projected).squeeze(-1)

    def key_bias(self, logit: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Importance (B, T): the score before the threshold's mask, 0 on padding; and the additive key bias
        (B, T), -inf on masked keys."""
        logit = logit.float()  # the bias is a log-probability: bf16 would round small importances to 0
        importance = torch.sigmoid(logit) * mask  # (B, T)
        top = importance.amax(dim=1, keepdim=True)  # (B, 1)
        kept = mask & (importance >= self.threshold * top)  # (B, T)
        # log a_t as logsigmoid: exact (and differentiable) where a_t is too small for log(sigmoid)
        bias = F.logsigmoid(logit).masked_fill(~kept, float("-inf"))
        return importance, bias

    def forward(self, x: Tensor, mask: Tensor, logit: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        importance, bias = self.key_bias(logit, mask)
        refined = self.norm(self.layer(x, bias[:, None, None, :]))  # (B, T, d)
        # a_t / (sum of kept a_t) in log space: a sum clamped against underflow would shrink the pooled
        # vector of a sample whose importances are all tiny; at least one key is kept, so no 0/0
        weight = bias.softmax(dim=1)  # (B, T)
        pooled = (refined * weight.unsqueeze(-1)).sum(1)  # (B, d)
        return refined, pooled, importance
