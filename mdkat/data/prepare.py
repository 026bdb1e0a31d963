"""The `prepare` stage: any of the three sources into the prepared format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mdkat.config import DataConfig, to_flat_dict
from mdkat.data.prepared import write_prepared


def prepare(cfg: DataConfig, out: str | Path) -> dict[str, Any]:
    """Read or generate the data that `cfg.source` names and write it to `out`; return the manifest.

    A real source that fails raises; nothing ever falls back to synthetic data.
    """
    if cfg.source == "synthetic":
        from mdkat.data.synthetic import generate

        generated = generate(cfg)
        splits, info = generated.splits, generated.info
    elif cfg.source == "mmsa":
        from mdkat.data.mmsa import load_mmsa

        splits, info = load_mmsa(cfg)
    else:
        from mdkat.data.cmu_sdk import load_cmu_sdk

        splits, info = load_cmu_sdk(cfg)
    info["params"] = to_flat_dict(cfg, "data.")
    return write_prepared(out, splits, info)
