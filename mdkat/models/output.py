"""`ModelOutput`: what every model's forward returns and its loss reads."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class ModelOutput:
    """Predictions and the intermediate features the loss terms need; dicts are keyed by modality."""

    pred: Tensor  # (B,) sentiment score
    mask: dict[str, Tensor]  # (B, T_m) valid steps
    unimodal: dict[str, Tensor] = field(default_factory=dict)  # (B,) per-modality predictions
    independent: dict[str, Tensor] = field(default_factory=dict)  # (B, T_m, d) C_m
    specific: dict[str, Tensor] = field(default_factory=dict)  # (B, T_m, d) S_m
    pooled_independent: dict[str, Tensor] = field(default_factory=dict)  # (B, d)
    pooled_specific: dict[str, Tensor] = field(default_factory=dict)  # (B, d)
    projected: dict[str, Tensor] = field(default_factory=dict)  # (B, T_m, d) reconstruction targets
    reconstructed: dict[str, Tensor] = field(default_factory=dict)  # (B, T_m, d)
    importance: dict[str, Tensor] = field(default_factory=dict)  # (B, T_m) AMSA step importance
