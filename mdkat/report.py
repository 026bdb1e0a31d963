"""The multi-seed report's two tables: every variant of a table trained with every seed.

The ablation table (`report.variants`) holds the chosen model (`model.name`, the reference), its
ablations (`Model.ABLATIONS`) and other models; the models table (`report.models`) puts the field's
baselines of the registry beside it, each with its own `model.<name>` section and loss weights. Both
share `<out>/runs/`: a unit of both tables (the reference's seeds) trains once.

Each (variant, seed) trains with `params` + the variant's values + `train.seed` + the report's budget, is
evaluated on the test split, and is written to `<out>/runs/<variant>-<seed>.json` with a fingerprint of
everything that produced it. A re-run skips the units whose fingerprint still matches and resumes an
interrupted unit from its checkpoint, so an interrupted report continues where it stopped. The summary
compares each variant with full MDKAT by a paired t-test over seeds (the seed fixes the initialisation and
batch order of both runs of a pair) against the reference.

Outputs per table (`TABLES`): one row per run (`runs.csv`, `models_runs.csv`), the summary (`ablation.csv`,
`models.csv`: variant, metric, n, mean, std, diff, diff_std, p_value, significant, and p_holm: Holm's
step-down correction over every comparison of the table) and the page for people (`ablation.md`,
`models.md`), which states the data source, budget, seeds and device.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import stats

from mdkat.config import Params, with_values
from mdkat.data import load_prepared
from mdkat.data.synthetic import SplitTruth
from mdkat.diagnose import diagnose, flat_diagnostics, regenerate_truth
from mdkat.errors import MdkatError
from mdkat.evaluation import evaluate_model
from mdkat.fingerprint import code_digest, fingerprint
from mdkat.io import atomic_open, write_json
from mdkat.metrics import METRICS
from mdkat.models import model_class, variant_label, variant_values
from mdkat.tracking import Tracker, flat_params, run_tags, what_tags
from mdkat.training import fit


@dataclass(frozen=True)
class Table:
    """One table of the report: its variants' key in `report`, its files and its title."""

    variants_key: str
    runs_file: str
    summary_file: str
    page: str
    record: str  # the parent MLflow run of the table
    title: str


TABLES = {
    "ablation": Table(
        "variants",
        "runs.csv",
        "ablation.csv",
        "ablation.md",
        "mlflow_run.json",
        "Ablation and multi-seed report",
    ),
    "models": Table(
        "models", "models_runs.csv", "models.csv", "models.md", "mlflow_run_models.json", "Model comparison"
    ),
}


def variants_of(params: Params, table: str) -> tuple[str, ...]:
    """The variants of `table`: `report.variants` or `report.models`."""
    return getattr(params.report, TABLES[table].variants_key)


def run_params(params: Params, variant: str, seed: int) -> Params:
    """The parameters of one report run: the variant's values, the seed and the report's budget."""
    values: dict[str, Any] = {**variant_values(params, variant), "train.seed": seed}
    budget = params.report.budget
    if budget.epochs is not None:
        values["train.epochs"] = budget.epochs
    if budget.patience is not None:
        values["train.patience"] = budget.patience
    return with_values(params, values, f"report variant {variant!r}, seed {seed}")


def _parent_tracker(params: Params, out_dir: Path, tags: dict[str, str], table: str) -> Tracker:
    record = out_dir / TABLES[table].record
    if record.exists():
        tracker = Tracker.attach(record)
        tracker.reopen()
        return tracker
    name = "report" if table == "ablation" else f"report {table}"
    tracker = Tracker.start(params.mlflow.experiment, name, flat_params(params), tags)
    write_json(record, tracker.record())
    return tracker


@dataclass(frozen=True)
class Unit:
    """One (variant, seed) to train: everything a worker process needs (picklable)."""

    variant: str
    seed: int
    params: Params
    fingerprint: str
    data_dir: str
    work: Path
    resume: bool
    truth: dict[str, SplitTruth] | None
    threads: int | None  # torch threads in a worker process; None: leave the process's setting


def claim_work(work: Path, key: str) -> bool:
    """Make `work` the folder of the run with fingerprint `key`; True when it holds that run's checkpoint.

    A folder of another configuration is emptied before the new fingerprint is written: the fingerprint
    file is written for every planned unit before any trains, so a report killed early must not leave an
    old checkpoint under the new fingerprint.
    """
    stale = work / "fingerprint"
    if stale.exists() and stale.read_text() == key:
        return True
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    stale.write_text(key)
    return False


def run_unit(unit: Unit) -> dict[str, Any]:
    """Train and test one unit (and diagnose it against the truth, when there is one); its result row."""
    if unit.threads is not None:
        torch.set_num_threads(unit.threads)
    data = load_prepared(unit.data_dir)
    p = unit.params
    result = fit(p, data, unit.work, resume=unit.resume, progress=unit.threads is None)
    test = evaluate_model(result.model, data, p.train.eval_batch_size)[1]["test"]
    diagnostics = (
        None if unit.truth is None else diagnose(result.model, data, unit.truth, p.train.eval_batch_size)
    )
    return {
        "variant": unit.variant,
        "seed": unit.seed,
        "fingerprint": unit.fingerprint,
        "best_epoch": result.best_epoch,
        "seconds": result.seconds,
        "device": str(next(result.model.parameters()).device),
        "test": test,
        "valid": result.best_valid,
        "diagnostics": diagnostics,
        "history": result.history,
    }


def report(
    params: Params,
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    table: str = "ablation",
    workers: int = 1,
    track: bool = True,
) -> pd.DataFrame:
    """Train and test every (variant, seed) of `table` not done yet; write the table's files (`TABLES`).

    With `workers` > 1 the units train in that many processes with one torch thread each (small models
    use a second thread poorly, a second process fully); results are recorded here, as they arrive.
    """
    if workers < 1:
        raise MdkatError(f"--workers must be at least 1, got {workers}")
    if table not in TABLES:
        raise MdkatError(f"--table: expected one of {list(TABLES)}, got {table!r}")
    out_dir = Path(out_dir)
    (out_dir / "runs").mkdir(parents=True, exist_ok=True)
    data = load_prepared(data_dir)
    # every unit's parameters first: a variant that does not validate fails before any training
    planned = [
        (v, s, run_params(params, v, s)) for v in variants_of(params, table) for s in params.report.seeds
    ]
    tags = {
        **run_tags(data.manifest, data.manifest_sha256),
        "report.budget": json.dumps(_budget(params)),
        "report.table": table,
    }
    # on synthetic data every run is also measured against the truth (mdkat.diagnose)
    truth = regenerate_truth(data, str(data_dir)) if data.manifest.get("source") == "synthetic" else None
    code = {m: code_digest(m) for m in {p.model.name for _, _, p in planned}}
    todo = []
    for i, (variant, seed, p) in enumerate(planned, 1):
        name, key = f"{variant}-{seed}", fingerprint(p, data.manifest_sha256, code[p.model.name])
        result_file = out_dir / "runs" / f"{name}.json"
        if result_file.exists() and json.loads(result_file.read_text()).get("fingerprint") == key:
            print(f"[{i}/{len(planned)}] {name}: done before", file=sys.stderr)
            continue
        work = out_dir / "work" / name
        resume = claim_work(work, key)
        threads = 1 if workers > 1 else None
        todo.append(Unit(variant, seed, p, key, str(data_dir), work, resume, truth, threads))
    print(f"{len(todo)} of {len(planned)} runs to train, {workers} worker(s)", file=sys.stderr)
    parent = _parent_tracker(params, out_dir, tags, table) if track else None
    with parent.ending() if parent else contextlib.nullcontext(), contextlib.ExitStack() as stack:
        if workers > 1 and len(todo) > 1:
            pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(workers))
            results = pool.imap_unordered(run_unit, todo)
        else:
            results = map(run_unit, todo)
        for done, row in enumerate(results, 1):
            unit = next(u for u in todo if (u.variant, u.seed) == (row["variant"], row["seed"]))
            history = row.pop("history")
            if parent is not None:
                row["run_id"] = _log_unit(parent, unit, tags, row, history)
            write_json(out_dir / "runs" / f"{unit.variant}-{unit.seed}.json", row)
            test = row["test"]
            print(
                f"[{done}/{len(todo)}] {unit.variant}-{unit.seed}: test MAE {test['mae']:.4f}, "
                f"Corr {test['corr']:.4f}, Non0 Acc-2 {test['acc2_non0']:.4f} ({row['seconds']:.0f} s)",
                file=sys.stderr,
            )
        runs = collect(out_dir, params, table)
        summary = summarize(runs, params.report.alpha, params.model.name)
        write_tables(out_dir, runs, summary, params, data.manifest, table)
        if parent is not None:
            files = TABLES[table]
            parent.log_artifacts([out_dir / n for n in (files.runs_file, files.summary_file, files.page)])
    return summary


def _log_unit(parent: Tracker, unit: Unit, tags: dict[str, str], row: dict, history: list[dict]) -> str:
    child = Tracker.start(
        unit.params.mlflow.experiment,
        f"{unit.variant} seed {unit.seed}",
        flat_params(unit.params),
        {
            **tags,
            **what_tags(unit.params, unit.variant),
            "report.variant": unit.variant,
            "report.seed": str(unit.seed),
        },
        parent=parent.run_id,
    )
    with child.ending():
        for epoch_row in history:
            child.log_metrics({k: v for k, v in epoch_row.items() if k != "epoch"}, step=epoch_row["epoch"])
        child.log_metrics(row["test"], prefix="test_")
        child.log_metrics(row["valid"], prefix="best_valid_")
        child.log_metrics({"best_epoch": row["best_epoch"], "train_seconds": row["seconds"]})
        if row["diagnostics"] is not None:
            child.log_metrics(flat_diagnostics(row["diagnostics"]), prefix="diag.")
    return child.run_id


def _budget(params: Params) -> dict[str, Any]:
    p = run_params(params, params.model.name, params.report.seeds[0]) if params.report.seeds else params
    return {"epochs": p.train.epochs, "patience": p.train.patience}


def collect(out_dir: Path, params: Params, table: str = "ablation") -> pd.DataFrame:
    """One row per (variant, seed) of `table`: its test metrics, from `<out>/runs/*.json`."""
    rows = []
    for variant in variants_of(params, table):
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
                    **{f"diag.{k}": v for k, v in flat_diagnostics(saved.get("diagnostics") or {}).items()},
                }
            )
    return pd.DataFrame(rows)


def summarize(runs: pd.DataFrame, alpha: float, reference: str) -> pd.DataFrame:
    """Per (variant, metric): mean and std over seeds, paired difference to `reference`, its p-value."""
    rows = []
    ref = runs[runs.variant == reference].set_index("seed") if reference in set(runs.variant) else None
    for variant, group in runs.groupby("variant", sort=False):
        group = group.set_index("seed")
        for metric in (m.name for m in METRICS):
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
            if ref is not None and variant != reference:
                seeds = group.index.intersection(ref.index)
                mine, theirs = group.loc[seeds, metric], ref.loc[seeds, metric]
                diff = mine.to_numpy(np.float64) - theirs.to_numpy(np.float64)
                row["diff"] = float(np.mean(diff))
                if len(diff) > 1:
                    row["diff_std"] = float(np.std(diff, ddof=1))
                    # identical runs give a zero-variance difference: no evidence either way, not p = NaN
                    p_value = float(stats.ttest_rel(mine, theirs).pvalue)
                    row["p_value"] = 1.0 if math.isnan(p_value) and not np.any(diff) else p_value
                    row["significant"] = bool(row["p_value"] < alpha)
            rows.append(row)
    table = pd.DataFrame(rows)
    table["p_holm"] = holm(table["p_value"].to_numpy(np.float64))
    return table


def holm(p_values: np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values over the finite entries (NaN stays NaN): controls the chance of
    any false positive among all the table's comparisons, which 7 variants x 8 metrics make likely."""
    adjusted = np.full_like(p_values, np.nan)
    finite = np.flatnonzero(np.isfinite(p_values))
    order = finite[np.argsort(p_values[finite], kind="stable")]
    m, running = len(order), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def _header(first: str) -> list[str]:
    labels = [m.label + (" ↓" if m.lower_is_better else "") for m in METRICS]
    return [f"| {first} | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]


def markdown(
    runs: pd.DataFrame, table: pd.DataFrame, params: Params, manifest: dict, kind: str = "ablation"
) -> str:
    """The report for people: where the numbers come from, mean ± std, paired differences to the reference."""
    reference = params.model.name
    name = variant_label(params, reference)
    cell = table.set_index(["variant", "metric"])
    source = manifest.get("source")
    lines = [f"# {TABLES[kind].title}", ""]
    if kind == "models":
        lines += [
            "Every model of the registry trained by the one training loop on the same data, seeds and "
            "budget, each with its own `model.<name>` section (its authors' MOSI hyper-parameters) and loss "
            "weights, and the loop's optimiser settings (`train`), which are ours, not each paper's.",
            "",
        ]
    if source == "synthetic":
        lines += [
            "**These are results on synthetic data** (the generator of `mdkat.data.synthetic`, MOSI's "
            "shapes and split sizes), not on CMU-MOSI or CMU-MOSEI: they show how the "
            + ("models compare" if kind == "models" else "modules behave")
            + " on a problem with known structure, not the papers' numbers.",
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
        f"- test split metrics; mean ± sample std over {len(params.report.seeds)} seeds; Δ = variant − "
        f"{name} paired by seed, p from a paired t-test (scipy `ttest_rel`), * where "
        f"p < {params.report.alpha}, † where it stays below after Holm's correction over the table",
        f"- training time: {runs.seconds.sum() / 60:.1f} min for {len(runs)} runs",
        "",
        *_header("variant"),
    ]
    digits = 3
    for variant in table.variant.unique():
        cells = []
        for metric in METRICS:
            r = cell.loc[(variant, metric.name)]
            cells.append(f"{r['mean']:.{digits}f} ± {r['std']:.{digits}f}")
        lines.append(f"| {variant_label(params, variant)} | " + " | ".join(cells) + " |")
    if reference in set(table.variant):
        lines += ["", f"Paired difference to {name} (Δ, p-value; ↓: lower is better):", ""]
        lines += _header("variant")
        for variant in table.variant.unique():
            if variant == reference:
                continue
            cells = []
            for metric in METRICS:
                r = cell.loc[(variant, metric.name)]
                worse = r["diff"] > 0 if metric.lower_is_better else r["diff"] < 0
                mark = ("*" if r["significant"] else "") + ("†" if r["p_holm"] < params.report.alpha else "")
                cells.append(f"{r['diff']:+.{digits}f}{mark} (p={r['p_value']:.3f}){' ▼' if worse else ''}")
            lines.append(f"| {variant_label(params, variant)} | " + " | ".join(cells) + " |")
        lines += ["", f"▼ marks a variant that is worse than {name} on average for that metric.", ""]
        lines += [_reading(table, params, TABLES[kind].summary_file), ""]
    lines += _diagnostics_table(runs, params)
    return "\n".join(lines) + "\n"


# diagnostics columns: (title, column pattern with {m} for the modality); cells show text / audio / vision
_DIAGNOSTICS = (
    ("AMSA cue AUC", "diag.amsa_cue_auc.{m}"),
    ("C_m → z_c (R²)", "diag.probe_r2.independent.{m}.shared"),
    ("C_m → z_m", "diag.probe_r2.independent.{m}.own"),
    ("S_m → z_c", "diag.probe_r2.specific.{m}.shared"),
    ("S_m → z_m", "diag.probe_r2.specific.{m}.own"),
    ("KT error", "diag.kt_error.{m}"),
)


def _diagnostics_table(runs: pd.DataFrame, params: Params) -> list[str]:
    """Mean over seeds of each diagnostic, text / audio / vision in one cell; – where a module is off."""
    if not any(c.startswith("diag.") for c in runs.columns):
        return []
    lines = [
        "## Diagnostics against the generator's truth (`mdkat.diagnose`)",
        "",
        "Means over seeds, each cell text / audio / vision. AMSA cue AUC: how well AMSA's step importance "
        "ranks the true cue steps (0.5 = chance). Probes: test R² of a ridge read-out of z_c (shared "
        "factor) or z_m (the modality's own factor) from the pooled independent (C_m) or specific (S_m) "
        "features; decoupling works when C_m carries z_c better than z_m and S_m the reverse. KT error: "
        "the running mean absolute error of each unimodal head. – : the module is off.",
        "",
        "| variant | " + " | ".join(title for title, _ in _DIAGNOSTICS) + " |",
        "|---|" + "---:|" * len(_DIAGNOSTICS),
    ]
    means = runs.groupby("variant", sort=False).mean(numeric_only=True)
    for variant in runs.variant.unique():
        cells = []
        for _, pattern in _DIAGNOSTICS:
            columns = [pattern.format(m=m) for m in ("text", "audio", "vision")]
            if not all(c in means.columns and pd.notna(means.loc[variant, c]) for c in columns):
                cells.append("–")
                continue
            cells.append(" / ".join(f"{means.loc[variant, c]:.2f}" for c in columns))
        lines.append(f"| {variant_label(params, variant)} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _reading(table: pd.DataFrame, params: Params, summary_file: str = "ablation.csv") -> str:
    """What the paired tests say, one line per variant, so that nobody reads noise as an ablation result."""
    alpha, name = params.report.alpha, variant_label(params, params.model.name)
    others = table[table.variant != params.model.name]
    by_name = {m.name: m for m in METRICS}

    def listed(found: list) -> str:
        return ", ".join(f"{by_name[r.metric].label} {r.diff:+.3f} (p={r.p_value:.3f})" for r in found)

    n = int(others.p_value.notna().sum())
    lines = [
        f"What the paired tests say (p < {alpha}; with {n} comparisons about {alpha * n:.1f} are expected "
        "below it by chance, so a verdict on a module needs a difference that survives Holm's correction "
        f"for all of them, `p_holm` in `{summary_file}`):",
        "",
    ]
    for variant, rows in others.groupby("variant", sort=False):
        worse, better = [], []
        for r in rows[rows.significant].itertuples():
            lower = by_name[r.metric].lower_is_better
            (worse if (r.diff > 0 if lower else r.diff < 0) else better).append(r)
        if worse and not better:
            verdict = f"worse than {name} in {listed(worse)}"
        elif better and not worse:
            verdict = f"better than {name} in {listed(better)}"
        elif worse:
            verdict = f"worse than {name} in {listed(worse)}; better in {listed(better)}"
        else:
            verdict = f"no metric differs significantly from {name}"
        firm_worse = any(r.p_holm < alpha for r in worse)
        firm_better = any(r.p_holm < alpha for r in better)
        if variant in model_class(params).ABLATIONS:
            # an ablation removes one module: what its removal costs is what the module contributes
            verdict += {
                (True, False): ": the module helps",
                (False, True): ": the model does better without the module",
                (True, True): ": the module trades one metric for another",
            }.get((firm_worse, firm_better), "")
        if not (firm_worse or firm_better):
            verdict += (
                ": nothing survives Holm's correction, no firm evidence either way"
                if worse or better
                else ": no measurable effect with these seeds and this budget"
            )
        lines.append(f"- {variant_label(params, variant)}: {verdict}.")
    return "\n".join(lines)


def write_tables(
    out_dir: Path,
    runs: pd.DataFrame,
    table: pd.DataFrame,
    params: Params,
    manifest: dict,
    kind: str = "ablation",
) -> None:
    """Write the runs, the summary and the page of table `kind` (`TABLES`) atomically."""
    files = TABLES[kind]
    for name, frame in ((files.runs_file, runs), (files.summary_file, table)):
        with atomic_open(out_dir / name) as f:
            f.write(frame.to_csv(index=False, lineterminator="\n").encode())
    with atomic_open(out_dir / files.page) as f:
        f.write(markdown(runs, table, params, manifest, kind).encode())
