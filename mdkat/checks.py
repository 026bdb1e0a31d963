"""`params.yaml` read and then checked by the registries that define its choices, before any work starts.

The schema (`mdkat.config`) knows keys, types and ranges; the data sources, the models and the report's
variants are checked by their owners. A stage asks for the checks it needs: `prepare` never loads torch or
a model, and choosing another model never fails on the report's list of variants.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mdkat.config import Params, load_params


def check(params: Params, *, data: bool = True, models: bool = True, variants: bool = False) -> Params:
    """Run the registries' checks on `params` (a `ConfigError` on the first fault); return `params`."""
    if data:
        from mdkat.data.prepare import check_params as check_source

        check_source(params)
    if models or variants:
        from mdkat.models import check_params as check_models
        from mdkat.models import check_variants

        (check_variants if variants else check_models)(params)
    return params


def load_checked(
    path: str | Path = "params.yaml",
    overrides: Sequence[str] = (),
    best: str | Path | None = None,
    *,
    data: bool = True,
    models: bool = True,
    variants: bool = False,
) -> Params:
    """`load_params`, then `check`."""
    return check(load_params(path, overrides, best=best), data=data, models=models, variants=variants)
