"""MDKAT: multimodal decoupling with knowledge aggregation and transfer, as a reproducible pipeline."""

from mdkat.errors import MdkatError

MODALITIES = ("text", "audio", "vision")

__all__ = ["MODALITIES", "MdkatError"]
__version__ = "0.1.0"
