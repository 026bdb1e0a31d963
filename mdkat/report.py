"""The ablation and multi-seed report: every variant of `report.variants` trained with every seed.

Each (variant, seed) trains with `params` + the variant's switches (`mdkat.models.ABLATIONS`) +
`train.seed` + the report's budget, is evaluated on the test split, and is written to
`<out>/runs/<variant>-<seed>.json` with a fingerprint of everything that produced it. A re-run skips the
units whose fingerprint still matches and resumes an interrupted unit from its checkpoint, so an
interrupted report continues where it stopped. The summary compares each variant with full MDKAT by a
paired t-test over seeds (the seed fixes the initialisation and batch order of both runs of a pair).

Outputs: `runs.csv` (one row per run), `ablation.csv` (variant, metric, n, mean, std, diff, diff_std,
p_value, significant) and `ablation.md`, which states the data source, budget, seeds and device.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from mdkat.config import Params, to_flat_dict, with_values
from mdkat.data import load_prepared
from mdkat.errors import MdkatError
from mdkat.io import atomic_open, write_json
from mdkat.metrics import METRIC_NAMES, regression_metrics
from mdkat.models import ABLATIONS
from mdkat.training import LOWER_IS_BETTER, fit, predict, resolve_device

REFERENCE = "mdkat"
RECORD = "mlflow_run.json"
# what a run's result depends on; tune/mlflow/report/ci settings do not change a trained model
_RUN_SECTIONS = ("data", "model", "loss", "train")
LABELS = {
    "mdkat": "MDKAT (all modules)",
    "no_cff": "w/o CFF",
    "no_amsa": "w/o AMSA",
    "no_ka": "w/o KA",
    "no_kt": "w/o KT",
    "no_decoupling": "w/o decoupling",
    "late_fusion": "late fusion (baseline)",
}


def run_params(params: Params, variant: str, seed: int) -> Params:
    """The parameters of one report run: the variant's switches, the seed and the report's budget."""
    values: dict[str, Any] = {**ABLATIONS[variant], "train.seed": seed}
    budget = params.report.budget
    if budget.epochs is not None:
        values["train.epochs"] = budget.epochs
    if budget.patience is not None:
        values["train.patience"] = budget.patience
    return with_values(params, values, f"report variant {variant!r}, seed {seed}")


def fingerprint(params: Params, manifest_sha256: str) -> str:
    """A hash of what a run's result depends on: its parameters and the data."""
    relevant = {k: v for k, v in to_flat_dict(params).items() if k.split(".", 1)[0] in _RUN_SECTIONS}
    relevant.pop("train.device", None)  # a GPU run answers the same question
    text = json.dumps({"params": relevant, "data": manifest_sha256}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _parent_tracker(params: Params, out_dir: Path, tags: dict[str, str]):
    from mdkat.tracking import Tracker, flat_params

    record = out_dir / RECORD
    if record.exists():
        tracker = Tracker.attach(record)
        tracker.reopen()
        return tracker
    tracker = Tracker.start(params.mlflow.experiment, "report", flat_params(params), tags)
    write_json(record, tracker.record())
    return tracker


def report(params: Params, data_dir: str | Path, out_dir: str | Path, *, track: bool = True) -> pd.DataFrame:
    """Train and test every (variant, seed) not done yet; write runs.csv, ablation.csv and ablation.md."""
    from mdkat.tracking import Tracker, flat_params, run_tags

    out_dir = Path(out_dir)
    (out_dir / "runs").mkdir(parents=True, exist_ok=True)
    data = load_prepared(data_dir)
    device = resolve_device(params.train.device)
    units = [(v, s) for v in params.report.variants for s in params.report.seeds]
    tags = {**run_tags(data.manifest, data.manifest_sha256), "report.budget": json.dumps(_budget(params))}
    parent = _parent_tracker(params, out_dir, tags) if track else None
    try:
        for i, (variant, seed) in enumerate(units, 1):
            unit = f"{variant}-{seed}"
            p = run_params(params, variant, seed)
            key = fingerprint(p, data.manifest_sha256)
            result_file = out_dir / "runs" / f"{unit}.json"
            if result_file.exists() and json.loads(result_file.read_text()).get("fingerprint") == key:
                print(f"[{i}/{len(units)}] {unit}: done before", file=sys.stderr)
                continue
            print(f"[{i}/{len(units)}] {unit}: training ({p.train.epochs} epochs at most)", file=sys.stderr)
            work = out_dir / "work" / unit
            stale = work / "fingerprint"
            resume = stale.exists() and stale.read_text() == key  # never resume another configuration
            work.mkdir(parents=True, exist_ok=True)
            stale.write_text(key)
            result = fit(p, data, work, resume=resume)
            pred = predict(result.model, data.test.to(device), p.train.eval_batch_size)
            test = regression_metrics(pred, data.test.label.numpy())
            row = {
                "variant": variant,
                "seed": seed,
                "fingerprint": key,
                "best_epoch": result.best_epoch,
                "seconds": result.seconds,
                "device": str(device),
                "test": test,
                "valid": result.best_valid,
            }
            if parent is not None:
                child = Tracker.start(
                    params.mlflow.experiment,
                    f"{variant} seed {seed}",
                    flat_params(p),
                    {**tags, "report.variant": variant, "report.seed": str(seed)},
                    parent=parent.run_id,
                )
                for epoch_row in result.history:
                    child.log_metrics(
                        {k: v for k, v in epoch_row.items() if k != "epoch"}, step=epoch_row["epoch"]
                    )
                child.log_metrics(test, prefix="test_")
                child.log_metrics(result.best_valid, prefix="best_valid_")
                child.log_metrics({"best_epoch": result.best_epoch, "train_seconds": result.seconds})
                child.finish()
                row["run_id"] = child.run_id
            write_json(result_file, row)
            print(
                f"[{i}/{len(units)}] {unit}: test MAE {test['mae']:.4f}, Corr {test['corr']:.4f}, "
                f"Non0 Acc-2 {test['acc2_non0']:.4f} ({result.seconds:.0f} s)",
                file=sys.stderr,
            )
        runs = collect(out_dir, params)
        table = summarize(runs, params.report.alpha)
        write_tables(out_dir, runs, table, params, data.manifest)
        if parent is not None:
            parent.log_artifacts([out_dir / n for n in ("runs.csv", "ablation.csv", "ablation.md")])
    except BaseException as e:
        if parent is not None:
            parent.finish("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    if parent is not None:
        parent.finish()
    return table


def _budget(params: Params) -> dict[str, Any]:
    p = run_params(params, REFERENCE, params.report.seeds[0]) if params.report.seeds else params
    return {"epochs": p.train.epochs, "patience": p.train.patience}


def collect(out_dir: Path, params: Params) -> pd.DataFrame:
    """One row per (variant, seed) of `params.report`: its test metrics, from `<out>/runs/*.json`."""
    rows = []
    for variant in params.report.variants:
        for seed in params.report.seeds:
            path = out_dir / "runs" / f"{variant}-{seed}.json"
            if not path.exists():
                raise MdkatError(f"{path}: missing; run the report to completion first")
            saved = json.loads(path.read_text())
            rows.append(
                {
                    "variant": variant,
                    "seed": seed,
                    **saved["test"],
                    "best_epoch": saved["best_epoch"],
                    "seconds": saved["seconds"],
                    "device": saved["device"],
                }
            )
    return pd.DataFrame(rows)


def summarize(runs: pd.DataFrame, alpha: float) -> pd.DataFrame:
    """Per (variant, metric): mean and std over seeds, paired difference to full MDKAT, its p-value."""
    rows = []
    reference = runs[runs.variant == REFERENCE].set_index("seed") if REFERENCE in set(runs.variant) else None
    for variant, group in runs.groupby("variant", sort=False):
        group = group.set_index("seed")
        for metric in METRIC_NAMES:
            values = group[metric].to_numpy(dtype=np.float64)
            row = {
                "variant": variant,
                "metric": metric,
                "n": len(values),
                "mean": float(np.mean(values)),
                "std": float(np.std(values, ddof=1)) if len(values) > 1 else math.nan,
                "diff": math.nan,
                "diff_std": math.nan,
                "p_value": math.nan,
                "significant": False,
            }
            if reference is not None and variant != REFERENCE:
                seeds = group.index.intersection(reference.index)
                diff = group.loc[seeds, metric].to_numpy(np.float64) - reference.loc[seeds, metric].to_numpy(
                    np.float64
                )
                row["diff"] = float(np.mean(diff))
                if len(diff) > 1:
                    row["diff_std"] = float(np.std(diff, ddof=1))
                    # identical runs give a zero-variance difference: no evidence either way, not p = NaN
                    p_value = float(
                        stats.ttest_rel(group.loc[seeds, metric], reference.loc[seeds, metric]).pvalue
                    )
                    row["p_value"] = 1.0 if math.isnan(p_value) and not np.any(diff) else p_value
                    row["significant"] = bool(row["p_value"] < alpha)
            rows.append(row)
    return pd.DataFrame(rows)


_SHOWN = (
    ("mae", "MAE ↓"),
    ("corr", "Corr"),
    ("acc2_non0", "Acc-2 (Non0)"),
    ("f1_non0", "F1 (Non0)"),
    ("acc2_has0", "Acc-2 (Has0)"),
    ("acc7", "Acc-7"),
    ("acc5", "Acc-5"),
)


def markdown(runs: pd.DataFrame, table: pd.DataFrame, params: Params, manifest: dict) -> str:
    """The report for people: where the numbers come from, mean ± std, paired differences to MDKAT."""
    cell = table.set_index(["variant", "metric"])
    source = manifest.get("source")
    lines = ["# Ablation and multi-seed report", ""]
    if source == "synthetic":
        lines += [
            "**These are results on synthetic data** (the generator of `mdkat.data.synthetic`, MOSI's "
            "shapes and split sizes), not on CMU-MOSI or CMU-MOSEI: they show how the modules behave on a "
            "problem with known structure, not the paper's numbers.",
            "",
        ]
    budget = _budget(params)
    devices = ", ".join(sorted(set(runs.device)))
    lines += [
        f"- data: `{source}` / `{manifest.get('dataset')}` "
        f"({'/'.join(str(manifest['counts'][s]) for s in ('train', 'valid', 'test'))} train/valid/test)",
        f"- seeds: {', '.join(str(s) for s in params.report.seeds)} (`train.seed`; the data are the same)",
        f"- budget: at most {budget['epochs']} epochs, early stopping patience {budget['patience']} "
        f"(`report.budget`), selected on validation `{params.train.select_on}`; device {devices}",
        f"- test split metrics; mean ± sample std over {len(params.report.seeds)} seeds; Δ = variant − MDKAT "
        f"paired by seed, p from a paired t-test (scipy `ttest_rel`), * where p < {params.report.alpha}",
        f"- training time: {runs.seconds.sum() / 60:.1f} min for {len(runs)} runs",
        "",
        "| variant | " + " | ".join(label for _, label in _SHOWN) + " |",
        "|---|" + "---:|" * len(_SHOWN),
    ]
    digits = 3
    for variant in table.variant.unique():
        cells = []
        for metric, _label in _SHOWN:
            r = cell.loc[(variant, metric)]
            cells.append(f"{r['mean']:.{digits}f} ± {r['std']:.{digits}f}")
        lines.append(f"| {LABELS.get(variant, variant)} | " + " | ".join(cells) + " |")
    if REFERENCE in set(table.variant):
        lines += ["", "Paired difference to MDKAT (Δ, p-value; for MAE a positive Δ is worse):", ""]
        lines += [
            "| variant | " + " | ".join(label for _, label in _SHOWN) + " |",
            "|---|" + "---:|" * len(_SHOWN),
        ]
        for variant in table.variant.unique():
            if variant == REFERENCE:
                continue
            cells = []
            for metric, _label in _SHOWN:
                r = cell.loc[(variant, metric)]
                worse = r["diff"] > 0 if metric in LOWER_IS_BETTER else r["diff"] < 0
                mark = "*" if r["significant"] else ""
                cells.append(f"{r['diff']:+.{digits}f}{mark} (p={r['p_value']:.3f}){' ↓' if worse else ''}")
            lines.append(f"| {LABELS.get(variant, variant)} | " + " | ".join(cells) + " |")
        lines += ["", "↓ marks a variant that is worse than MDKAT on average for that metric.", ""]
        lines += [_reading(table, params.report.alpha), ""]
    return "\n".join(lines) + "\n"


def _reading(table: pd.DataFrame, alpha: float) -> str:
    """One sentence on what the paired tests say, so that nobody reads noise as an ablation result."""
    others = table[table.variant != REFERENCE]
    shown = others[others.metric.isin([m for m, _ in _SHOWN])]
    hits = shown[shown.significant]
    if hits.empty:
        return (
            f"No variant differs from MDKAT significantly (p < {alpha}) in any metric shown: with these "
            "seeds and this budget the differences between variants are within the variation between seeds."
        )
    listed = "; ".join(
        f"{LABELS.get(r.variant, r.variant)} {r.metric} {r.diff:+.3f} (p={r.p_value:.3f})"
        for r in hits.itertuples()
    )
    return (
        f"Significant at p < {alpha} (uncorrected for the {len(shown)} comparisons, so about "
        f"{alpha * len(shown):.1f} are expected by chance): {listed}."
    )


def write_tables(
    out_dir: Path, runs: pd.DataFrame, table: pd.DataFrame, params: Params, manifest: dict
) -> None:
    """Write runs.csv, ablation.csv and ablation.md atomically."""
    for name, frame in (("runs.csv", runs), ("ablation.csv", table)):
        with atomic_open(out_dir / name) as f:
            f.write(frame.to_csv(index=False, lineterminator="\n").encode())
    with atomic_open(out_dir / "ablation.md") as f:
        f.write(markdown(runs, table, params, manifest).encode())
