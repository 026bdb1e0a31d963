"""Data: three sources (`synthetic`, `mmsa`, `cmu-sdk`) into one prepared format, and reading it back."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mdkat.data.batch import Batch
from mdkat.data.prepared import SPLITS, DataError, manifest_digest, read_manifest, read_split


@dataclass
class Prepared:
    """The three splits of a prepared directory, each as one CPU-resident `Batch`."""

    train: Batch
    valid: Batch
    test: Batch
    manifest: dict[str, Any]
    manifest_sha256: str  # identifies the exact data a run saw (logged as a tag): `manifest_digest`


def load_prepared(directory: str | Path, splits: tuple[str, ...] = SPLITS) -> Prepared:
    """Read a prepared directory, checking every file against the manifest's SHA-256.

    `splits` limits what is read (training never needs `test`); splits not read are None.
    """
    manifest = read_manifest(directory)
    batches = {
        s: Batch.from_arrays(read_split(directory, s, manifest)) if s in splits else None for s in SPLITS
    }
    return Prepared(**batches, manifest=manifest, manifest_sha256=manifest_digest(directory))


__all__ = ["Batch", "DataError", "Prepared", "load_prepared"]
