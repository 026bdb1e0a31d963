"""KT: Knowledge Transfer, which balances the strengths of the modalities.

The abstract: KT is "for balancing the strengths of different modalities". We follow DMD's graph
distillation in spirit, with edges set by measured strength instead of learned: every modality has a
unimodal head (part of the task loss, see `mdkat.models.mdkat`); a running mean of each head's absolute
error (an exponential moving average with `momentum`, updated on training batches, kept in buffers so
that it survives a checkpoint) measures how strong the modality is. A weaker modality j is distilled
towards each stronger modality i with weight
    w_ij = 1 - exp(-max(err_j - err_i, 0) / temperature)
(zero from weaker to stronger, larger for a larger gap), and the teacher's prediction is detached, so
knowledge only flows from strong to weak:  loss = sum_ij w_ij mean_b |p_j - stopgrad(p_i)| / M.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mdkat.distributed import gather_rows


class KnowledgeTransfer(nn.Module):
    """Running per-modality errors (buffers) and the transfer loss between unimodal predictions."""

    error: Tensor
    updates: Tensor

    def __init__(self, modalities: tuple[str, ...], temperature: float, momentum: float):
        super().__init__()
        if temperature <= 0 or not 0.0 <= momentum < 1.0:
            raise ValueError(
                f"KT needs temperature > 0 and momentum in [0, 1), got {temperature}, {momentum}"
            )
        self.modalities, self.temperature, self.momentum = modalities, temperature, momentum
        self.register_buffer("error", torch.zeros(len(modalities)))  # (M,) running mean absolute error
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, unimodal: dict[str, Tensor], label: Tensor) -> None:
        """Fold one training batch's unimodal errors into the running errors."""
        # the global batch under torchrun (one gather for all modalities), so every rank keeps the same errors
        p, _ = gather_rows(torch.stack([unimodal[m].float() for m in self.modalities], dim=1))  # (G, M)
        label, _ = gather_rows(label)  # (G,)
        # contiguous columns: each mean sums in the order it always did
        batch_error = torch.stack([(p[:, i].contiguous() - label).abs().mean() for i in range(p.shape[1])])
        # torch.where rather than an if on the counter: no device-to-host sync in the training step
        moved = torch.lerp(self.error, batch_error, 1.0 - self.momentum)
        self.error.copy_(torch.where(self.updates == 0, batch_error, moved))
        self.updates += 1

    def weights(self) -> Tensor:
        """(M, M) transfer weights, w[i, j] from teacher i to student j; zero unless i is stronger."""
        gap = (self.error[None, :] - self.error[:, None]).clamp_min(0.0)  # gap[i, j] = err_j - err_i
        return 1.0 - torch.exp(-gap / self.temperature)

    def forward(self, unimodal: dict[str, Tensor]) -> Tensor:
        p = torch.stack([unimodal[m] for m in self.modalities])  # (M, B)
        distance = (p[None, :, :] - p[:, None, :].detach()).abs().mean(-1)  # [i, j]: |p_j - stopgrad p_i|
        return (self.weights() * distance).sum() / len(self.modalities)
