"""mdkat.compare and notebooks/compare_runs.ipynb against a real small project.

The project is built once for the module: a temporary folder holding copies of params.yaml and dvc.yaml
(which makes it the project root), where the prepare, tune, train and evaluate stages run through the
command line on tiny synthetic data, recording into the folder's own mlflow.db and optuna.db. No report
is run there: report runs are written with the project's Tracker into a copy of that store, and the
ablation table is read from hand-written CSVs.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import mlflow
import nbformat
import pytest
import torch
import yaml
from nbclient import NotebookClient

from mdkat.cli import main
from mdkat.compare import ablation_table, learning_curves, load_study, runs_table, study_figures
from mdkat.tracking import Tracker
from tests.conftest import ROOT, TINY

RUN_COLUMNS = ["run_id", "run_name", "kind", "status", "start_time", "model", "variant", "seed"]
N_TRIALS = 2
SETTINGS = [
    *TINY,
    "data.synthetic.n_train=64",
    "data.synthetic.n_valid=32",
    "data.synthetic.n_test=32",
    "train.device=cpu",
    "train.epochs=3",
    f"tune.n_trials={N_TRIALS}",
    "tune.epochs=1",
]


@dataclass
class Project:
    root: Path
    train_run_id: str
    test_metrics: dict[str, float]  # as the evaluate stage wrote them
    history: list[dict[str, str]]  # models/history.csv
    best: dict  # tuning/best.yaml


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Project:
    """A project copy after prepare, tune, train and evaluate; MLFLOW_TRACKING_URI is its mlflow.db."""
    root = tmp_path_factory.mktemp("project")
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copyfile(ROOT / name, root / name)
    (root / "notebooks").mkdir()
    threads = torch.get_num_threads()
    # one thread on a shared two-core machine (tune() gives its worker os.cpu_count() threads)
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.delenv("DVC_STAGE", raising=False)
        mp.delenv("DVC_EXP_NAME", raising=False)
        mp.chdir(root)
        try:
            with pytest.MonkeyPatch.context() as cores:
                cores.setattr(os, "cpu_count", lambda: 1)
                overrides = [a for item in SETTINGS for a in ("-S", item)]
                common = ["--params", str(root / "params.yaml"), *overrides]
                # dvc.yaml's commands, from the project folder (the cwd)
                for stage in (
                    "prepare --out data/prepared",
                    "tune --data data/prepared --out tuning/best.yaml",
                    "train --data data/prepared --out models --best tuning/best.yaml",
                    "evaluate --data data/prepared --model models/model.pt --metrics metrics/test.json "
                    "--plots plots",
                ):
                    assert main([*stage.split(), *common]) == 0, stage
            with open(root / "models" / "history.csv", newline="") as f:
                history = list(csv.DictReader(f))
            yield Project(
                root=root,
                train_run_id=json.loads((root / "models" / "mlflow_run.json").read_text())["run_id"],
                test_metrics=json.loads((root / "metrics" / "test.json").read_text())["test"],
                history=history,
                best=yaml.safe_load((root / "tuning" / "best.yaml").read_text()),
            )
        finally:
            # the train stage's log_model set MLflow's global URI (and exported it): later modules must not
            # see it; the monkeypatch then restores the variable as it was
            mlflow.set_tracking_uri(None)
            torch.set_num_threads(threads)


def test_runs_table_has_the_training_run_with_its_test_metrics(project):
    runs = runs_table(project.root)
    assert list(runs.columns[:8]) == RUN_COLUMNS
    assert runs["start_time"].is_monotonic_increasing
    train = runs[runs["run_id"] == project.train_run_id]
    assert len(train) == 1
    row = train.iloc[0]
    assert (row["run_name"], row["kind"], row["model"]) == ("mdkat s1111", "train", "mdkat")
    assert (row["variant"], row["seed"]) == ("mdkat", "1111")
    assert row["status"] == "FINISHED"
    for name, value in project.test_metrics.items():
        assert row[f"test_{name}"] == pytest.approx(value, rel=1e-12, abs=0.0)
    assert row["best_valid_mae"] == pytest.approx(min(float(r["valid_mae"]) for r in project.history))
    # the tuned weights reached the training run's parameters
    assert row["loss.mdkat.ka"] == pytest.approx(project.best["params"]["loss.mdkat.ka"])


def test_runs_table_lists_trial_runs_only_when_asked(project):
    runs = runs_table(project.root)
    assert sorted(runs["kind"]) == ["train", "tune"]
    study = load_study(project.root)
    with_trials = runs_table(project.root, trials=True)
    trials = with_trials[with_trials["kind"] == "trial"]
    assert len(trials) == len(study.trials) == N_TRIALS
    assert sorted(trials["run_name"]) == [f"trial {t.number}" for t in study.trials]
    assert set(with_trials["run_id"]) - set(trials["run_id"]) == set(runs["run_id"])


def test_runs_table_shows_report_runs_with_variant_and_seed(project, tmp_path, monkeypatch):
    # runs tagged as mdkat.report tags them, written by the same Tracker, into a copy of the project's store
    for name in ("params.yaml", "dvc.yaml", "mlflow.db"):
        shutil.copyfile(project.root / name, tmp_path / name)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    budget = {"report.budget": '{"epochs": 2}'}
    parent = Tracker.start("mdkat", "report", {"model.name": "mdkat"}, budget)
    child = Tracker.start(
        "mdkat",
        "no_ka seed 1112",
        {"model.name": "mdkat", "loss.mdkat.ka": "0.1"},
        {**budget, "report.variant": "no_ka", "report.seed": "1112"},
        parent=parent.run_id,
    )
    for epoch, value in ((1, 0.9), (2, 0.8)):
        child.log_metrics({"valid_mae": value}, step=epoch)
    child.log_metrics({"mae": 0.85}, prefix="test_")
    runs = runs_table(tmp_path).set_index("run_id")
    assert runs.loc[parent.run_id, "kind"] == "report-parent"
    row = runs.loc[child.run_id]
    assert (row["kind"], row["variant"], row["seed"], row["test_mae"]) == ("report", "no_ka", "1112", 0.85)
    (line,) = learning_curves(tmp_path, [child.run_id]).axes[0].get_lines()
    assert (list(line.get_xdata()), list(line.get_ydata())) == ([1, 2], [0.9, 0.8])
    assert line.get_label() == f"no_ka seed 1112 ({child.run_id[:8]})"


def test_runs_table_of_a_project_without_runs_is_empty(tmp_path, project, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    shutil.copyfile(project.root / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "dvc.yaml").touch()
    runs = runs_table(tmp_path)
    assert runs.empty and "run_id" in runs.columns
    assert "no MLflow experiment 'mdkat'" in capsys.readouterr().out
    assert not (tmp_path / "mlflow.db").exists(), "looking must not create a store"


def test_learning_curves_plot_each_run_per_epoch(project):
    trial = runs_table(project.root, trials=True).query("kind == 'trial'")["run_id"].iloc[0]
    tune_parent = runs_table(project.root).query("kind == 'tune'")["run_id"].iloc[0]
    figure = learning_curves(project.root, [project.train_run_id, trial, tune_parent])
    ax = figure.axes[0]
    lines = ax.get_lines()
    assert len(lines) == 2, "one line per run with a history; the tune parent has none"
    epochs = [int(r["epoch"]) for r in project.history]
    assert list(lines[0].get_xdata()) == epochs
    assert list(lines[0].get_ydata()) == pytest.approx([float(r["valid_mae"]) for r in project.history])
    assert ax.get_ylabel() == "valid_mae"
    assert len(learning_curves(project.root, [project.train_run_id], "train_loss").axes[0].get_lines()) == 1


def test_load_study_is_the_tuned_study(project):
    study = load_study(project.root)
    assert study.study_name == project.best["study_name"]
    assert len(study.trials) == N_TRIALS
    assert study.best_value == pytest.approx(project.best["value"], rel=1e-12)
    figures = study_figures(study)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert set(figures) == ({"history", "importances"} if len(complete) >= 2 else {"history"})


def test_load_study_says_why_there_is_none(tmp_path, project, capsys):
    shutil.copyfile(project.root / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "dvc.yaml").touch()
    assert load_study(tmp_path) is None
    assert "tuning/best.yaml" in capsys.readouterr().out
    (tmp_path / "tuning").mkdir()
    shutil.copyfile(project.root / "tuning" / "best.yaml", tmp_path / "tuning" / "best.yaml")
    assert load_study(tmp_path) is None
    assert "no Optuna storage" in capsys.readouterr().out
    assert not (tmp_path / "optuna.db").exists()
    shutil.copyfile(project.root / "optuna.db", tmp_path / "optuna.db")
    other = {**project.best, "study_name": "mdkat-loss-weights-0000000000"}
    (tmp_path / "tuning" / "best.yaml").write_text(yaml.safe_dump(other))
    assert load_study(tmp_path) is None
    assert "'mdkat-loss-weights-0000000000' of" in capsys.readouterr().out


ABLATION = """\
variant,metric,n,mean,std,diff,diff_std,p_value,significant
mdkat,mae,5,0.75,0.01,0.0,0.0,,False
mdkat,acc2_non0,5,0.8123,0.0205,0.0,0.0,,False
no_ka,mae,5,0.7812345,0.0149,0.0312345,0.012,0.004,True
no_ka,acc2_non0,5,0.8,0.03,-0.0123,0.02,0.25,False
"""


def test_ablation_table_pivots_mean_and_std(tmp_path, capsys):
    (tmp_path / "dvc.yaml").touch()
    assert ablation_table(tmp_path) is None
    assert "reports/ablation.csv" in capsys.readouterr().out
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "ablation.csv").write_text(ABLATION)
    table = ablation_table(tmp_path)
    assert list(table.index) == ["mdkat", "no_ka"]
    assert list(table.columns) == ["mae", "acc2_non0"]  # the metrics' customary order, not the file's
    assert table.loc["mdkat", "mae"] == "0.7500 ± 0.0100"
    assert table.loc["mdkat", "acc2_non0"] == "0.8123 ± 0.0205"
    assert table.loc["no_ka", "mae"] == "0.7812 ± 0.0149"
    assert table.loc["no_ka", "acc2_non0"] == "0.8000 ± 0.0300"
    assert table.attrs["p_value"]["no_ka"] == {"mae": 0.004, "acc2_non0": 0.25}
    assert table.attrs["diff"]["no_ka"]["mae"] == pytest.approx(0.0312345)
    assert table.attrs["significant"]["no_ka"]["mae"]


def test_notebook_runs_on_the_project(project, monkeypatch):
    monkeypatch.setenv("MDKAT_PROJECT", str(project.root))
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the notebook finds the project's mlflow.db itself
    nb = nbformat.read(ROOT / "notebooks" / "compare_runs.ipynb", as_version=4)
    # committed without outputs: a diff of the notebook is a diff of its code
    assert all(c.get("outputs", []) == [] and c.get("execution_count") is None for c in nb.cells)
    where = {"metadata": {"path": str(project.root / "notebooks")}}  # the cwd, as `jupyter` would set it
    NotebookClient(nb, timeout=300, kernel_name="python3", resources=where).execute()
    outputs = [o for cell in nb.cells for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    html = "".join(o.get("data", {}).get("text/html", "") for o in outputs)
    assert project.train_run_id in html and "test_mae" in html, "the run table"
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "reports/ablation.csv" in text, "the missing report is named"
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3  # two learning-curve figures and the optimisation history
