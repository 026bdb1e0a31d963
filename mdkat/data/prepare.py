"""The `prepare` stage: any of the three sources into the prepared format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mdkat.config import DataConfig, to_flat_dict
from mdkat.data.prepared import write_prepared
from mdkat.tracking import redact


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
    # the manifest is cached and shared: a password in data.url must not travel with it
    info["params"] = {key: redact(value) for key, value in to_flat_dict(cfg, "data.").items()}
    return write_prepared(out, splits, info)
