"""The loss terms every model combines: task L1, unimodal L1, reconstruction, orthogonality.

- task: L1 of the fused prediction, as DMD and MISA train on MOSI/MOSEI (the metric is MAE).
- unimodal: the mean L1 of the per-modality heads (KT needs them; they also make each branch learn).
- reconstruction (MISA, DMD): decoders rebuild each modality's projected input from [C_m; S_m]; masked
  mean squared error over valid steps, with the target detached so that the projection cannot shrink
  itself to make the task trivial.
- orthogonality (MISA's difference loss, per step): the squared cosine similarity between C_m and S_m on
  valid steps, so that the independent and specific features carry different information; cosine makes
  it blind to scale, so it cannot be met by shrinking either side.
KA and KT terms live with their modules (`ka.py`, `kt.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def l1(pred: Tensor, label: Tensor) -> Tensor:
    """Mean absolute error."""
    return (pred.float() - label).abs().mean()


def unimodal_l1(unimodal: dict[str, Tensor], label: Tensor) -> Tensor:
    """Mean over modalities of each head's L1."""
    return torch.stack([l1(p, label) for p in unimodal.values()]).mean()


def _masked_step_mean(values: Tensor, mask: Tensor) -> Tensor:
    w = mask.to(values.dtype)
    return (values * w).sum() / w.sum().clamp_min(1.0)


def reconstruction(
    reconstructed: dict[str, Tensor], target: dict[str, Tensor], mask: dict[str, Tensor]
) -> Tensor:
    """Mean over modalities of the masked MSE between reconstruction and (detached) projected input."""
    terms = [
        _masked_step_mean((reconstructed[m].float() - target[m].detach().float()).pow(2).mean(-1), mask[m])
        for m in reconstructed
    ]
    return torch.stack(terms).mean()


def orthogonality(
    independent: dict[str, Tensor], specific: dict[str, Tensor], mask: dict[str, Tensor]
) -> Tensor:
    """Mean over modalities of the squared cosine similarity of C_m and S_m at valid steps."""
    terms = [
        _masked_step_mean(
            F.cosine_similarity(independent[m].float(), specific[m].float(), dim=-1).pow(2), mask[m]
        )
        for m in independent
    ]
    return torch.stack(terms).mean()
