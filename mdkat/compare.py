"""Helpers of `notebooks/compare_runs.ipynb`: MLflow runs, learning curves, the ablation report, the study.

They only read the project's stores. Where there is nothing to show they print why and return an empty
table or None, so that the notebook runs on a project with any subset of the stages done.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from mdkat.config import load_params, read_best
from mdkat.io import project_root
from mdkat.metrics import METRIC_NAMES
from mdkat.redact import redact
from mdkat.study_storage import open_storage, storage_path
from mdkat.tracking import tracking_uri

if TYPE_CHECKING:
    import optuna
    from matplotlib.figure import Figure

with warnings.catch_warnings():
    # tqdm.auto, imported by MLflow and Optuna, warns in a kernel without ipywidgets; no bar is shown here
    warnings.filterwarnings("ignore", message="IProgress not found")
    import tqdm.auto  # noqa: F401

ABLATION_CSV = "reports/ablation.csv"
RUN_COLUMNS = ["run_id", "run_name", "kind", "status", "start_time", "model", "variant", "seed"]


def _client(root: Path):
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(root)
    # a missing sqlite store would be created (and migrated) by merely opening it
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        return None
    return MlflowClient(uri)


def _kind(tags: dict[str, str]) -> str:
    # the tags that mdkat.tuning and mdkat.report put on their runs (report.budget: parent and children)
    if "optuna.trial" in tags:
        return "trial"
    if "report.variant" in tags:
        return "report"
    if "report.budget" in tags:
        return "report-parent"
    return "tune" if "optuna.study" in tags else "train"


def _metric_order(name: str) -> tuple[int, int, str]:
    prefix = 0 if name.startswith("test_") else 1
    base = name.removeprefix("test_").removeprefix("best_valid_")
    # the known metrics in the paper's order; derived ones (test_fraction_of_oracle_*) after them
    return (prefix, METRIC_NAMES.index(base) if base in METRIC_NAMES else len(METRIC_NAMES), name)


def runs_table(project: Path | str, experiment: str | None = None, trials: bool = False) -> pd.DataFrame:
    """One row per run of the experiment (Optuna trial runs only with `trials`), oldest first."""
    root = project_root(project)
    experiment = experiment or load_params(root / "params.yaml").mlflow.experiment
    client = _client(root)
    found = client.get_experiment_by_name(experiment) if client else None
    runs, token = [], None
    if found is None:
        print(f"no MLflow experiment {experiment!r} for {root}: run the train stage first")
    while found is not None:
        page = client.search_runs([found.experiment_id], max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    rows = []
    for run in runs:
        tags, kind = run.data.tags, _kind(run.data.tags)
        nested = "mlflow.parentRunId" in tags
        if (kind == "trial" and not trials) or (nested and kind not in ("trial", "report")):
            continue
        row = {
            "run_id": run.info.run_id,
            "run_name": run.info.run_name,
            "kind": kind,
            "status": run.info.status,
            "start_time": pd.to_datetime(run.info.start_time, unit="ms", utc=True),
            "model": run.data.params.get("model.name"),
            "variant": tags.get("variant", tags.get("report.variant")),  # runs before `variant` existed
            "seed": tags.get("seed", tags.get("report.seed")),
        }
        row.update({k: v for k, v in run.data.metrics.items() if k.startswith(("test_", "best_valid_"))})
        row.update({k: float(v) for k, v in run.data.params.items() if k.startswith("loss.")})
        rows.append(row)
    keys = {key for row in rows for key in row}
    metrics = sorted((k for k in keys if k.startswith(("test_", "best_valid_"))), key=_metric_order)
    losses = sorted(k for k in keys if k.startswith("loss."))
    table = pd.DataFrame(rows, columns=RUN_COLUMNS + metrics + losses)
    return table.sort_values("start_time", kind="stable").reset_index(drop=True)


def learning_curves(project: Path | str, run_ids: Iterable[str], metric: str = "valid_mae") -> Figure:
    """A figure of `metric` against the epoch, one line per run that logged it."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    # no pyplot: the figure is not kept in pyplot's registry, so the inline backend shows it only when asked
    figure = Figure(figsize=(7, 4), layout="constrained")
    ax = figure.subplots()
    client = _client(project_root(project))
    for run_id in run_ids if client else ():
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, metric))
        if not history:  # a tune parent run has no per-epoch values
            continue
        name = client.get_run(run_id).info.run_name  # a report run's is "<variant> seed <seed>"
        ax.plot(*zip(*history, strict=True), marker="o", label=f"{name} ({run_id[:8]})")
    ax.set(xlabel="epoch", ylabel=metric, title=f"{metric} per epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ax.lines:
        ax.legend(fontsize="small")
    return figure


def ablation_table(project: Path | str) -> pd.DataFrame | None:
    """`reports/ablation.csv` as variant x metric "mean ± std"; p-values and diffs in `.attrs`."""
    path = project_root(project) / ABLATION_CSV
    if not path.exists():
        print(f"no {path}: run `python stages/report.py` to write the ablation report")
        return None
    report = pd.read_csv(path)
    variants = list(dict.fromkeys(report["variant"]))
    metrics = sorted(dict.fromkeys(report["metric"]), key=lambda m: _metric_order(f"test_{m}"))
    report["cell"] = [
        f"{mean:.4f}" if pd.isna(std) else f"{mean:.4f} ± {std:.4f}"
        for mean, std in zip(report["mean"], report["std"], strict=True)
    ]

    def pivot(column: str) -> pd.DataFrame:
        return report.pivot(index="variant", columns="metric", values=column).loc[variants, metrics]

    table = pivot("cell")
    table.columns.name = None
    # plain dicts ({variant: {metric: value}}): pandas compares attrs on concat, which DataFrames break
    for column in ("p_value", "diff", "diff_std", "significant"):
        if column in report:
            table.attrs[column] = pivot(column).to_dict(orient="index")
    return table


def load_study(project: Path | str) -> optuna.Study | None:
    """The Optuna study named in `tuning/best.yaml`, from `tune.storage`; None (saying why) if missing."""
    import optuna

    root = project_root(project)
    best_file = root / "tuning" / "best.yaml"
    if not best_file.exists():
        print(f"no {best_file}: run the tune stage (`dvc repro tune`) first")
        return None
    name = read_best(best_file).get("study_name")
    if not name:
        print(f"{best_file} names no study (no study_name)")
        return None
    tune = load_params(root / "params.yaml").tune
    path = storage_path(tune.storage, root)
    if path is not None and not path.exists():  # opening it would create an empty storage
        print(f"no Optuna storage {path} (tune.storage {tune.storage!r})")
        return None
    try:
        return optuna.load_study(study_name=name, storage=open_storage(tune.storage, tune.heartbeat_s, root))
    except KeyError:
        print(f"study {name!r} of {best_file} is not in {redact(tune.storage)}")
        return None


def study_figures(study: optuna.Study) -> dict[str, Figure]:
    """Optimisation history and (with 2+ complete trials) parameter importances, as matplotlib figures."""
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as vis

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    axes = {}
    # optuna switches pyplot to its ggplot style; the context gives later figures their own style back
    with warnings.catch_warnings(), plt.rc_context():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        axes["history"] = vis.plot_optimization_history(study)
        if len(complete) >= 2:
            evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)  # the same bars on every run
            axes["importances"] = vis.plot_param_importances(study, evaluator=evaluator)
    figures = {key: ax.figure for key, ax in axes.items()}
    for figure in figures.values():
        plt.close(figure)  # out of pyplot's registry: shown once, where the notebook displays it
    return figures
