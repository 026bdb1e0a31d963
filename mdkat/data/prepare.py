"""The `prepare` stage: the data source that `data.source` names, into the prepared format.

A data source is one module of `mdkat/data/` with a function `(DataConfig) -> (splits, info)` and one line
in `SOURCES`; an unknown name is an error before anything is read, never another source's loader.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from mdkat.config import DataConfig, Params, to_flat_dict
from mdkat.data.prepared import DataError, write_prepared
from mdkat.redact import redact

# data.source -> "module:function" reading it; imported only when chosen (h5py for one, pickles for another)
SOURCES = {
    "synthetic": "mdkat.data.synthetic:load",
    "mmsa": "mdkat.data.mmsa:load_mmsa",
    "cmu-sdk": "mdkat.data.cmu_sdk:load_cmu_sdk",
}


def check_params(params: Params) -> None:
    """`data.source` names a registered source."""
    if params.data.source not in SOURCES:
        raise params.error("data.source", f"expected one of {list(SOURCES)}, got {params.data.source!r}")


def prepare(cfg: DataConfig, out: str | Path) -> dict[str, Any]:
    """Read or generate the data that `cfg.source` names and write it to `out`; return the manifest.

    A real source that fails raises; nothing ever falls back to synthetic data.
    """
    if cfg.source not in SOURCES:  # also for callers that did not go through check_params
        raise DataError(f"data.source: expected one of {list(SOURCES)}, got {cfg.source!r}")
    if cfg.tokenizer is not None and cfg.source != "cmu-sdk":
        raise DataError(
            f"data.tokenizer is set, but only cmu-sdk data are tokenised here (data.source is "
            f"{cfg.source!r}: mmsa pickles carry their word pieces, synthetic data have no words); set it "
            "to null"
        )
    module, function = SOURCES[cfg.source].split(":")
    splits, info = getattr(importlib.import_module(module), function)(cfg)
    # the manifest is cached and shared: a password in data.url must not travel with it
    info["params"] = {key: redact(value) for key, value in to_flat_dict(cfg, "data.").items()}
    return write_prepared(out, splits, info)
