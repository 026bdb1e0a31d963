"""`Batch`: named modalities with their lengths and labels, the one batch type of every later stage."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from mdkat import MODALITIES


@dataclass
class Batch:
    """A batch (or a whole split) of samples; padded steps lie after each sample's length."""

    text: torch.Tensor  # (B, T_text, d_text) float32
    audio: torch.Tensor  # (B, T_audio, d_audio)
    vision: torch.Tensor  # (B, T_vision, d_vision)
    text_len: torch.Tensor  # (B,) int64
    audio_len: torch.Tensor  # (B,) int64
    vision_len: torch.Tensor  # (B,) int64
    label: torch.Tensor  # (B,) float32, sentiment in [-3, 3]
    id: list[str]
    # (B,) int64, each sample's position in its split: per-sample state (Self-MM's unimodal labels) is
    # indexed by it; a batch made without it numbers its samples 0..B-1
    index: torch.Tensor | None = None
    # BERT word pieces, where the source has them (prepared format, optional keys): (B, L) int64 each
    text_ids: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None  # 1 on word pieces, 0 on padding
    text_segment: torch.Tensor | None = None  # token type ids

    def __post_init__(self) -> None:
        if self.index is None:
            self.index = torch.arange(len(self.label), device=self.label.device)

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> Batch:
        """Wrap a split's numpy arrays (prepared format) without copying them."""
        tensors = {
            f.name: torch.from_numpy(arrays[f.name])
            for f in dataclasses.fields(cls)
            if f.name not in ("id", "index") and f.name in arrays
        }
        return cls(**tensors, id=arrays["id"].tolist())

    @property
    def has_tokens(self) -> bool:
        """Whether the batch carries BERT word pieces."""
        return self.text_ids is not None

    def __len__(self) -> int:
        return len(self.label)

    def features(self, modality: str) -> torch.Tensor:
        """The (B, T, d) features of a named modality."""
        return getattr(self, modality)

    def lengths(self, modality: str) -> torch.Tensor:
        """The (B,) valid lengths of a named modality."""
        return getattr(self, f"{modality}_len")

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The same batch on `device`."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def select(self, index: torch.Tensor) -> Batch:
        """The samples at `index` (a 1-D CPU index tensor), in that order, on the batch's device.

        The index stays on the CPU so that picking the ids never waits for the GPU.
        """
        ids = [self.id[i] for i in index.tolist()]
        on_device = index.to(self.label.device, non_blocking=True)
        return dataclasses.replace(self._map(lambda t: t.index_select(0, on_device)), id=ids)

    def _map(self, fn) -> Batch:
        tensors = {
            f: None if getattr(self, f) is None else fn(getattr(self, f))
            for f in (*TENSOR_FIELDS, *OPTIONAL_FIELDS)
        }
        return Batch(**tensors, id=self.id)


TENSOR_FIELDS = (*MODALITIES, *(f"{m}_len" for m in MODALITIES), "label", "index")
OPTIONAL_FIELDS = ("text_ids", "text_mask", "text_segment")
