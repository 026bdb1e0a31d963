"""What every model is: `Model` (its config type, loss terms, ablations) and `ModelOutput`.

A model differs from another in `forward` and `loss` only; the one training loop needs nothing else. Each
model class names its config type (`Config`, validated from `params.yaml`'s `model.<name>` section), the
loss terms it weights next to the task L1 (`WEIGHTED_TERMS`, weighted by `loss.<name>.<term>`), its
report label and its ablation variants.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn

from mdkat.config import Section


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


@dataclass(frozen=True)
class Ablation:
    """A report variant of a model: its label and the config values it changes."""

    label: str
    changes: Mapping[str, Any]


class Model(nn.Module):
    """The interface of every model of the registry.

    Built as `cls(config, dims, aligned, sizes)`: `dims` the feature size of each modality, `aligned` whether
    the modalities share one time axis, `sizes` the number of samples of each split (the prepared data's
    manifest says all three); a model that keeps per-sample state (Self-MM) sizes its buffers by `sizes`,
    indexed by `Batch.index`, and the others ignore it.
    """

    Config: ClassVar[type[Section]]
    LABEL: ClassVar[str]  # in the report's tables
    WEIGHTED_TERMS: ClassVar[tuple[str, ...]] = ()  # loss terms next to `task`, each with a weight
    ABLATIONS: ClassVar[Mapping[str, Ablation]] = {}
    LEARNED_INPUTS: ClassVar[tuple[str, ...]] = ()  # modalities whose inputs a trained encoder produces
    spec: dict[str, Any]  # what rebuilds the model from a file (set by `mdkat.models.build`)

    @property
    def decoupled(self) -> bool:
        """Whether the modality-independent features have an encoder of their own (diagnostics probe them)."""
        return False

    @classmethod
    def loss_terms(cls, cfg: Any) -> tuple[str, ...]:
        """The terms computed under `cfg` (`task` first, weight 1); switched-off modules drop theirs."""
        return ("task", *cls.WEIGHTED_TERMS)

    def parameter_groups(self, lr: float) -> list[dict[str, Any]]:
        """The optimizer's parameter groups, all at `lr` unless a part has its own rate (BERT)."""
        return [{"params": list(self.parameters()), "lr": lr}]

    def forward(self, batch) -> ModelOutput:  # pragma: no cover - the interface
        raise NotImplementedError

    def loss(
        self, out: ModelOutput, batch, weights: Mapping[str, float]
    ) -> tuple[Tensor, dict[str, Tensor]]:  # pragma: no cover - the interface
        """Total loss and every term by name (detached)."""
        raise NotImplementedError


def weighted_total(terms: Mapping[str, Tensor], weights: Mapping[str, float]) -> Tensor:
    """`task` + the weighted sum of the other terms."""
    return terms["task"] + sum(weights[name] * value for name, value in terms.items() if name != "task")
