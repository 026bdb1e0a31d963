"""Sentiment regression metrics, with the field's (MMSA's) definitions, as one pure function.

- `mae`: mean |p - t|; `corr`: Pearson's r, from numpy sums rather than BLAS so that its last bits do not
  depend on the CPU.
- `acc7` / `acc5`: agreement of round(clip(x, -3, 3)) / round(clip(x, -2, 2)), numpy's round-half-to-even.
- `acc2_has0` / `f1_has0`: (t >= 0) vs (p >= 0) over all samples (zero counts as positive).
- `acc2_non0` / `f1_non0`: samples with t == 0 dropped, then (t > 0) vs (p > 0) (a zero prediction is
  negative).
F1 is scikit-learn's support-weighted F1 with (y_true, y_pred) in that order. Values are fractions at full
precision. Undefined values are NaN, never a crash: `corr` when either side is constant (with a warning),
the Non0 pair when every label is zero.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Metric:
    """One metric: everything the pipeline knows about it lives here (early stopping, CI, reports)."""

    name: str
    label: str  # in tables and reports
    lower_is_better: bool
    # the CI check's allowed worsening (absolute) against its baseline: 3 standard deviations of the CI
    # profile's test value over training seeds 1111-1115 (`python -m mdkat.ci spread`, README), rounded
    # up; a change that costs more than the seeds' own variation fails, another CPU's rounding does not
    ci_tolerance: float


# in the order of the field's tables
METRICS = (
    Metric("mae", "MAE", lower_is_better=True, ci_tolerance=0.042),
    Metric("corr", "Corr", lower_is_better=False, ci_tolerance=0.025),
    Metric("acc7", "Acc-7", lower_is_better=False, ci_tolerance=0.034),
    Metric("acc5", "Acc-5", lower_is_better=False, ci_tolerance=0.037),
    Metric("acc2_has0", "Acc-2 (Has0)", lower_is_better=False, ci_tolerance=0.013),
    Metric("f1_has0", "F1 (Has0)", lower_is_better=False, ci_tolerance=0.013),
    Metric("acc2_non0", "Acc-2 (Non0)", lower_is_better=False, ci_tolerance=0.011),
    Metric("f1_non0", "F1 (Non0)", lower_is_better=False, ci_tolerance=0.011),
)
BY_NAME = {m.name: m for m in METRICS}
METRIC_NAMES = tuple(BY_NAME)


def is_better(metric: str, value: float, best: float | None) -> bool:
    """Whether `value` of `metric` improves on `best` (NaN never does)."""
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value < best if BY_NAME[metric].lower_is_better else value > best


def worsening(metric: str, value: float, reference: float) -> float:
    """How much worse `value` is than `reference` (negative: better), in the metric's own units."""
    return value - reference if BY_NAME[metric].lower_is_better else reference - value


def _binary(true: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    from sklearn.metrics import f1_score  # scikit-learn loads in ~1 s; reading params.yaml needs only names

    acc = float(np.mean(true == pred))
    # zero_division=0 is sklearn's default value, without its warning when a class is never predicted.
    f1 = float(f1_score(true, pred, average="weighted", zero_division=0))
    return acc, f1


def _pearson(p: np.ndarray, t: np.ndarray) -> float:
    # np.corrcoef's formula with numpy sums instead of its matrix product: BLAS sums in an order that
    # depends on the CPU kernel, and the last bits of this value land in files that must not (manifests).
    p, t = p - p.mean(), t - t.mean()
    n1 = p.size - 1
    r = np.sum(p * t) / n1 / np.sqrt(np.sum(p * p) / n1) / np.sqrt(np.sum(t * t) / n1)
    return float(np.clip(r, -1, 1))


def regression_metrics(pred, true) -> dict[str, float]:
    """MAE, Corr, Acc-7, Acc-5 and Has0/Non0 Acc-2 and F1 of predictions `pred` against labels `true`."""
    p = np.asarray(pred, dtype=np.float64).reshape(-1)
    t = np.asarray(true, dtype=np.float64).reshape(-1)
    if p.shape != t.shape:
        raise ValueError(f"regression_metrics: {p.size} predictions for {t.size} labels")
    if p.size == 0:
        raise ValueError("regression_metrics: no samples")
    if not (np.isfinite(p).all() and np.isfinite(t).all()):
        raise ValueError("regression_metrics: predictions and labels must be finite")

    if np.ptp(p) == 0 or np.ptp(t) == 0:
        warnings.warn(
            "regression_metrics: constant predictions or labels, corr is undefined (NaN)", stacklevel=2
        )
        corr = float("nan")
    else:
        corr = _pearson(p, t)

    out = {
        "mae": float(np.mean(np.abs(p - t))),
        "corr": corr,
        "acc7": float(np.mean(np.round(np.clip(p, -3, 3)) == np.round(np.clip(t, -3, 3)))),
        "acc5": float(np.mean(np.round(np.clip(p, -2, 2)) == np.round(np.clip(t, -2, 2)))),
    }
    out["acc2_has0"], out["f1_has0"] = _binary(t >= 0, p >= 0)
    nonzero = t != 0
    if nonzero.any():
        out["acc2_non0"], out["f1_non0"] = _binary(t[nonzero] > 0, p[nonzero] > 0)
    else:
        out["acc2_non0"] = out["f1_non0"] = float("nan")
    return out
