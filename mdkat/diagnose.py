"""Diagnostics: does each module do what the paper says it does, measured against the generator's truth?

Only synthetic data has a truth: which steps carry the sentiment cues, and the latent factors (the shared
z_c, each modality's own z_m). The truth is regenerated from the manifest's recorded `data.*` parameters
and must match the prepared labels, ids and lengths exactly, or nothing is measured. Then:

- `amsa_cue_auc` {modality: AUC}: ROC AUC of AMSA's step importance (the sigmoid score, before its hard
  mask), over the valid steps of the test split, against the true cue steps. 0.5 is chance.
- `probe_r2` {"independent"|"specific": {modality: {"shared", "own"}}}: test R² of a ridge probe, fitted on
  the train split, that reads z_c ("shared") or the modality's own factor ("own") from the pooled
  independent features C_m and the pooled specific features S_m (as the model pools them for its head).
  Decoupling does what it claims when C_m decodes z_c better than z_m and S_m the reverse.
- `kt_error` {modality: error}: KT's running mean absolute error of each unimodal head, as trained.

A module that is switched off (or that a model does not have) gives `null`. No framework of the field
measures whether its modules do what they claim; these numbers are what the report's diagnostics columns
and the MLflow runs of synthetic data show.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mdkat import MODALITIES
from mdkat.config import DataConfig, Params
from mdkat.data import Batch, Prepared, load_prepared
from mdkat.data.synthetic import SplitTruth, generate
from mdkat.errors import MdkatError
from mdkat.io import write_json
from mdkat.models import ModelOutput
from mdkat.training import check_inputs, eval_outputs, model_from_file, resolve_device

PROBE_ALPHAS = np.logspace(-3, 3, 13)  # ridge penalties, chosen by leave-one-out on train


class DiagnosticsError(MdkatError):
    """Data that diagnostics cannot be measured on (not synthetic, or not what its manifest says)."""


def regenerate_truth(data: Prepared, where: str) -> dict[str, SplitTruth]:
    """The generator's truth for `data`, after checking that it regenerates the prepared labels and ids."""
    manifest = data.manifest
    if manifest.get("source") != "synthetic":
        raise DiagnosticsError(
            f"{where}: diagnostics need synthetic data, whose truth is known; this is "
            f"{manifest.get('source')!r} data"
        )
    cfg = _data_config(manifest.get("params", {}), where)
    generated = generate(cfg)
    for split in ("train", "valid", "test"):
        prepared: Batch | None = getattr(data, split)
        if prepared is None:
            continue
        arrays = generated.splits[split]
        same = (
            list(arrays["id"]) == prepared.id
            and np.array_equal(arrays["label"], prepared.label.numpy())
            and all(np.array_equal(arrays[f"{m}_len"], prepared.lengths(m).numpy()) for m in MODALITIES)
        )
        if not same:
            raise DiagnosticsError(
                f"{where}: the generator, run with the manifest's parameters, does not give the prepared "
                f"{split} split's labels, ids or lengths; the data were changed after prepare, or come from "
                "another version of the generator: run prepare again"
            )
    return generated.truth


def _data_config(flat: dict[str, Any], where: str) -> DataConfig:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        node = nested
        *sections, leaf = key.removeprefix("data.").split(".")
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = value
    try:
        return DataConfig.model_validate(nested)
    except Exception as e:  # a manifest of another version of the pipeline
        raise DiagnosticsError(f"{where}: the manifest's data parameters do not validate: {e}") from None


def _cat(parts: list[ModelOutput], field: str, modality: str) -> np.ndarray | None:
    values = [getattr(p, field).get(modality) for p in parts]
    if any(v is None for v in values):
        return None
    return torch.cat(values).float().cpu().numpy().astype(np.float64)


def cue_auc(importance: np.ndarray, cue: np.ndarray, lengths: np.ndarray) -> float:
    """ROC AUC of per-step `importance` (N, T) against `cue` (N, T) over the valid steps of each sample."""
    from sklearn.metrics import roc_auc_score

    valid = np.arange(cue.shape[1])[None, :] < lengths[:, None]
    return float(roc_auc_score(cue[valid], importance[valid]))


def probe_r2(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    """Test R² of a ridge probe (standardised features, penalty by leave-one-out) fitted on train."""
    from sklearn.linear_model import RidgeCV
    from sklearn.metrics import r2_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), RidgeCV(alphas=PROBE_ALPHAS)).fit(train_x, train_y)
    return float(r2_score(test_y, probe.predict(test_x)))


@dataclass
class _Split:
    outputs: list[ModelOutput]
    truth: SplitTruth
    lengths: dict[str, np.ndarray]


def diagnose(model: nn.Module, data: Prepared, truth: dict[str, SplitTruth], batch_size: int) -> dict:
    """`amsa_cue_auc`, `probe_r2` and `kt_error` of `model` on `data` (train and test splits)."""
    splits = {
        name: _Split(
            [out for _, out in eval_outputs(model, getattr(data, name), batch_size)],
            truth[name],
            {m: getattr(data, name).lengths(m).numpy() for m in MODALITIES},
        )
        for name in ("train", "test")
    }
    test = splits["test"]
    auc: dict[str, float] | None = None
    if all(_cat(test.outputs, "importance", m) is not None for m in MODALITIES):
        auc = {
            m: cue_auc(_cat(test.outputs, "importance", m), test.truth.cue[m], test.lengths[m])
            for m in MODALITIES
        }
    probes: dict[str, Any] = {}
    decoupled = getattr(model, "decoupled", False)
    for kind, field in (("independent", "pooled_independent"), ("specific", "pooled_specific")):
        if kind == "independent" and not decoupled:  # C_m is S_m, or there is no C_m at all
            probes[kind] = None
            continue
        pooled = {
            m: (_cat(splits["train"].outputs, field, m), _cat(test.outputs, field, m)) for m in MODALITIES
        }
        if any(x is None for pair in pooled.values() for x in pair):  # a model without pooled features
            probes[kind] = None
            continue
        probes[kind] = {}
        for i, m in enumerate(MODALITIES):
            train_x, test_x = pooled[m]
            factors = {"shared": 0, "own": 1 + i}  # columns of SplitTruth.factors: z_c, z_t, z_a, z_v
            probes[kind][m] = {
                name: probe_r2(
                    train_x, splits["train"].truth.factors[:, col], test_x, test.truth.factors[:, col]
                )
                for name, col in factors.items()
            }
    kt = getattr(model, "kt", None)
    kt_error = None if kt is None else dict(zip(MODALITIES, kt.error.cpu().tolist(), strict=True))
    return {"amsa_cue_auc": auc, "probe_r2": probes, "kt_error": kt_error}


def flat_diagnostics(result: dict) -> dict[str, float]:
    """`{amsa_cue_auc.text: 0.91, probe_r2.independent.text.shared: 0.5, ...}`: numbers only, nulls left
    out (MLflow metrics, table columns)."""
    flat: dict[str, float] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else key)
        elif isinstance(node, int | float):
            flat[prefix] = float(node)

    walk(result, "")
    return flat


def diagnose_files(
    params: Params, data_dir: str | Path, model_file: str | Path, out: str | Path | None = None
) -> dict:
    """Diagnostics of `model_file` on the synthetic data in `data_dir` (written to `out` if given)."""
    data = load_prepared(data_dir)
    truth = regenerate_truth(data, str(data_dir))
    model = model_from_file(model_file, resolve_device(params.train.device))
    check_inputs(model, data.manifest, model_file, data_dir)
    result = diagnose(model, data, truth, params.train.eval_batch_size)
    if out is not None:
        write_json(out, result)
    return result
