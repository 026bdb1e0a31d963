"""MLflow tracking of the train and evaluate stages: what a run records, where it goes, how it ends.

Each test writes to its own sqlite store in a temporary folder, never to the repository's mlflow.db, and
runs from that folder: it holds an empty dvc.yaml, which makes it the project root, so the run's
artifacts land in its mlruns/. The tracking-server tests run a real `mlflow server` on 127.0.0.1 with a
PostgreSQL backend store (tests/postgres.py), as a team shares one.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient

import mdkat.runs
from mdkat import MODALITIES
from mdkat.config import Params, chosen_flat_dict, load_params, with_values
from mdkat.data import load_prepared
from mdkat.data.prepare import prepare
from mdkat.errors import MdkatError
from mdkat.redact import redact
from mdkat.runs import RUN_RECORD, evaluate_run, train_run
from mdkat.tracking import HTTP_LIMITS, check_reachable
from mdkat.training import CHECKPOINT, fit, model_from_file, predict
from tests.conftest import ROOT, TINY, Stop, prepared, stop_after, tiny_params, use_store

# a loss weight away from params.yaml's, so that the logged value is known whatever that file says
SETTINGS = ["loss.mdkat.ka=0.25"]
SECRET_URL = "https://user:s3cret@example.org/x.pkl"
SERVER_BOOT_S = 60.0


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", autouse=True)
def _forget_mlflow_global_uri():
    # serving.log_model calls mlflow.set_tracking_uri, which also exports MLFLOW_TRACKING_URI; the modules
    # tested after this one must not inherit the last temporary store.
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    mlflow.set_tracking_uri(None)
    if saved is not None:
        os.environ["MLFLOW_TRACKING_URI"] = saved


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(params, prepared directory) of a tiny synthetic set-up, from the real params.yaml."""
    params = tiny_params(*SETTINGS)
    return params, prepared(params, tmp_path_factory.mktemp("tiny"))


@dataclass
class Tracked:
    """A tracked training and its evaluation, as the train and evaluate stages run them."""

    uri: str
    root: Path  # the project root, holding mlflow.db and mlruns/
    out: Path  # the train stage's output folder
    metrics_file: Path
    plots: Path
    run_id: str
    params: Params
    data_dir: Path

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(self.uri)


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, tiny, empty_store) -> Tracked:
    """One train_run + evaluate_run, shared by the tests that only read what they recorded."""
    params, data_dir = tiny
    root = tmp_path_factory.mktemp("tracked")
    with pytest.MonkeyPatch.context() as mp:
        uri = use_store(root, mp, empty_store)
        mp.setenv("DVC_STAGE", "train")
        result = train_run(params, data_dir, root / "out")
        evaluate_run(params, data_dir, root / "out" / "model.pt", root / "metrics.json", root / "plots")
    return Tracked(
        uri, root, root / "out", root / "metrics.json", root / "plots", result["run_id"], params, data_dir
    )


def _history(path: Path) -> list[dict[str, float]]:
    with open(path) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _steps(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    """A metric's history as (step, value), by step; MLflow does not promise an order."""
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= _artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def _recorded_run_id(out: Path) -> str:
    return json.loads((out / RUN_RECORD).read_text())["run_id"]


# --- what one tracked training and evaluation record


def test_every_parameter_is_logged_as_a_string(tracked):
    logged = tracked.client.get_run(tracked.run_id).data.params
    assert set(logged) == set(chosen_flat_dict(tracked.params))
    assert not any(key.startswith(("model.late_fusion", "loss.late_fusion")) for key in logged)
    assert logged["model.mdkat.width"] == "16"
    assert logged["loss.mdkat.ka"] == "0.25"
    assert logged["data.synthetic.n_train"] == "48"
    assert logged["train.lr"] == str(tracked.params.train.lr)
    assert logged["data.url"] == "None"


def data_identity(folder) -> str:
    """SHA-256 of the manifest as written before `data.tokenizer` existed (the key is unset here)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["params"].pop("data.tokenizer") is None
    return hashlib.sha256((json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()).hexdigest()


def test_tags_name_the_commit_the_data_and_the_dvc_stage(tracked):
    tags = tracked.client.get_run(tracked.run_id).data.tags
    commit = tags["git.commit"]
    assert commit == "unknown" or (len(commit) == 40 and set(commit) <= set("0123456789abcdef"))
    assert tags["git.dirty"] in {"true", "false", "unknown"}
    assert tags["data.manifest_sha256"] == data_identity(tracked.data_dir)
    assert tags["data.source"] == "synthetic"
    assert tags["dvc.stage"] == "train"
    assert "dvc.exp.name" not in tags


def test_runs_are_named_by_what_ran_and_carry_mlflow_source_tags_and_the_environment(tracked):
    import platform

    import torch

    run = tracked.client.get_run(tracked.run_id)
    tags = run.data.tags
    params = tracked.params
    assert run.info.run_name == f"{params.model.name} s{params.train.seed}"  # no DVC experiment here
    # what the UI shows as Source and Created by, and the one-line description
    assert tags["mlflow.source.git.commit"] == tags["git.commit"]
    assert tags["mlflow.source.name"] and tags["mlflow.user"]
    assert (
        params.model.name in tags["mlflow.note.content"]
        and str(params.train.seed) in tags["mlflow.note.content"]
    )
    # what every run is grouped by
    assert {k: tags[k] for k in ("model", "variant", "seed", "data.source")} == {
        "model": params.model.name,
        "variant": params.model.name,
        "seed": str(params.train.seed),
        "data.source": "synthetic",
    }
    # which machine the numbers come from
    assert tags["env.python"] == platform.python_version() and tags["env.torch"] == torch.__version__
    assert tags["env.cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert tags["env.numpy_blas"] != "unknown" and "Math Kernel Library" in tags["env.torch_math"]
    assert int(tags["env.torch_threads"]) >= 1 and tags["env.cpu"]
    assert ("env.gpu" in tags) == torch.cuda.is_available()


def test_each_split_is_a_dataset_input_with_its_context_digest_and_count(tracked):
    run = tracked.client.get_run(tracked.run_id)
    manifest = json.loads((tracked.data_dir / "manifest.json").read_text())
    found = {
        {t.key: t.value for t in i.tags}["mlflow.data.context"]: i.dataset for i in run.inputs.dataset_inputs
    }
    assert sorted(found) == ["test", "train", "valid"]
    for split, dataset in found.items():
        full = hashlib.sha256((tracked.data_dir / f"{split}.npz").read_bytes()).hexdigest()
        assert dataset.digest == full[:32] and full.startswith(dataset.digest)
        assert dataset.name == f"synthetic/{manifest['dataset']}/{split}"
        assert json.loads(dataset.profile)["num_samples"] == manifest["counts"][split]
        assert json.loads(dataset.source)["uri"].endswith(f"/{split}.npz")


UNIQUE_BROKEN = (
    "(sqlite3.IntegrityError) UNIQUE constraint failed: "
    "datasets.experiment_id, datasets.name, datasets.digest"
)


def _racing_client(uri: str, lose: int, winner=None, error: str = UNIQUE_BROKEN):
    """A client whose first `lose` log_inputs fail as a lost insert race; `winner` logs its datasets first."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import BAD_REQUEST

    real, calls = MlflowClient(uri), []

    class Racing:
        def log_inputs(self, run_id, datasets):
            if winner is not None and run_id == winner[0].run_id:
                return real.log_inputs(run_id, datasets=datasets)
            calls.append(run_id)
            if len(calls) <= lose:
                if winner is not None and len(calls) == 1:
                    winner[0].log_datasets(*winner[1:])  # the other run inserts the same splits first
                raise MlflowException(error, error_code=BAD_REQUEST)
            return real.log_inputs(run_id, datasets=datasets)

    return Racing(), calls


def test_a_dataset_insert_lost_to_another_run_is_asked_again_and_links_the_winners_datasets(
    store, tiny, monkeypatch
):
    import sqlite3

    from mdkat.tracking import Tracker

    _, data_dir = tiny
    manifest = json.loads((data_dir / "manifest.json").read_text())
    loser, winner = (Tracker.start("race", name, {}, {}) for name in ("loser", "winner"))
    client, calls = _racing_client(store, lose=1, winner=(winner, manifest, data_dir))
    monkeypatch.setattr(Tracker, "client", property(lambda self: client))
    monkeypatch.setattr("mdkat.tracking.time.sleep", lambda s: None)
    loser.log_datasets(manifest, data_dir)
    assert calls == [loser.run_id, loser.run_id]

    def inputs(run_id):
        run = MlflowClient(store).get_run(run_id)
        return {
            {t.key: t.value for t in i.tags}["mlflow.data.context"]: (i.dataset.name, i.dataset.digest)
            for i in run.inputs.dataset_inputs
        }

    assert sorted(inputs(loser.run_id)) == ["test", "train", "valid"]
    assert inputs(loser.run_id) == inputs(winner.run_id)
    with contextlib.closing(sqlite3.connect(Path("mlflow.db"))) as db:
        assert db.execute("SELECT count(*) FROM datasets").fetchone() == (3,)  # shared, not duplicated


@pytest.mark.parametrize(
    ("lose", "error", "expected_calls"),
    [
        (99, UNIQUE_BROKEN, 4),  # DATASET_RACE_RETRIES = 3 more attempts, then the error
        (99, "(psycopg.errors.UniqueViolation) duplicate key value violates unique constraint", 4),
        (1, "(psycopg.errors.NotNullViolation) null value in column", 1),  # not a race: no retry
    ],
)
def test_a_lost_race_is_retried_a_bounded_number_of_times_and_other_errors_never(
    store, tiny, monkeypatch, lose, error, expected_calls
):
    from mdkat.tracking import Tracker

    _, data_dir = tiny
    manifest = json.loads((data_dir / "manifest.json").read_text())
    tracker = Tracker.start("race", "r", {}, {})
    client, calls = _racing_client(store, lose=lose, error=error)
    monkeypatch.setattr(Tracker, "client", property(lambda self: client))
    monkeypatch.setattr("mdkat.tracking.time.sleep", lambda s: None)
    with pytest.raises(MdkatError, match=r"MLflow tracking server sqlite:///.* failed: .*(Violation|UNIQUE)"):
        tracker.log_datasets(manifest, data_dir)
    assert len(calls) == expected_calls


def test_a_dvc_experiments_name_is_in_the_run_name(monkeypatch):
    from mdkat.tracking import run_name

    params = load_params(ROOT / "params.yaml")
    monkeypatch.setenv("DVC_EXP_NAME", "exp-3f2a")
    assert run_name(params) == "mdkat s1111 exp-3f2a"


def test_each_epoch_is_logged_at_its_step_with_the_values_of_history_csv(tracked):
    history = _history(tracked.out / "history.csv")
    epochs = tracked.params.train.epochs
    assert [row["epoch"] for row in history] == list(range(1, epochs + 1))
    for key in ("valid_mae", "valid_loss", "train_loss", "train_task", "train_ka", "train_kt", "lr"):
        logged = _steps(tracked.client, tracked.run_id, key)
        assert [step for step, _ in logged] == list(range(1, epochs + 1)), key
        np.testing.assert_array_equal([v for _, v in logged], [row[key] for row in history], err_msg=key)


def test_best_and_test_metrics_match_the_files(tracked):
    metrics = tracked.client.get_run(tracked.run_id).data.metrics
    history = _history(tracked.out / "history.csv")
    maes = [row["valid_mae"] for row in history]
    assert metrics["best_valid_mae"] == min(maes)
    assert metrics["best_epoch"] == 1 + int(np.argmin(maes))
    valid = json.loads((tracked.out / "valid_metrics.json").read_text())
    assert metrics["best_valid_mae"] == valid["mae"]
    report = json.loads(tracked.metrics_file.read_text())
    assert metrics["test_mae"] == report["test"]["mae"]
    assert metrics["test_acc2_non0"] == report["test"]["acc2_non0"]


def test_synthetic_data_get_the_diagnostics_as_metrics_and_a_file(tracked):
    metrics = tracked.client.get_run(tracked.run_id).data.metrics
    stored = tracked.root / "mlruns" / tracked.run_id / "artifacts" / "evaluation" / "diagnostics.json"
    diagnostics = json.loads(stored.read_text())
    for m in ("text", "audio", "vision"):
        assert metrics[f"diag.amsa_cue_auc.{m}"] == diagnostics["amsa_cue_auc"][m]
        assert metrics[f"diag.kt_error.{m}"] == diagnostics["kt_error"][m]
        own = diagnostics["probe_r2"]["independent"][m]["own"]
        assert metrics[f"diag.probe_r2.independent.{m}.own"] == own


def test_artifacts_are_logged_into_the_project_mlruns(tracked):
    expected = {
        "model.pt",
        "history.csv",
        "valid_metrics.json",
        "learning_curves.png",
        "params.resolved.yaml",
        "data_manifest.json",
        "evaluation/metrics.json",
        "evaluation/predictions.csv",
        "evaluation/confusion.png",
        "evaluation/scatter.png",
        "evaluation/diagnostics.json",
    }
    assert expected <= _artifacts(tracked.client, tracked.run_id)
    stored = tracked.root / "mlruns" / tracked.run_id / "artifacts"
    assert tracked.client.get_run(tracked.run_id).info.artifact_uri == stored.as_uri()
    assert (stored / "model.pt").read_bytes() == (tracked.out / "model.pt").read_bytes()
    assert (stored / "evaluation" / "predictions.csv").read_bytes() == (
        tracked.plots / "predictions.csv"
    ).read_bytes()
    resolved = yaml.safe_load((stored / "params.resolved.yaml").read_text())
    assert resolved["model"]["mdkat"]["width"] == 16
    assert resolved["train"]["epochs"] == tracked.params.train.epochs


def test_the_pyfunc_model_is_a_logged_model_of_the_run(tracked):
    client = tracked.client
    outputs = client.get_run(tracked.run_id).outputs.model_outputs
    assert len(outputs) == 1
    model = client.get_logged_model(outputs[0].model_id)
    assert model.name == "model" and model.source_run_id == tracked.run_id
    assert model.status == LoggedModelStatus.READY
    # MLflow 3 keeps logged models beside the runs, not among the run's artifacts
    stored = tracked.root / "mlruns" / "models" / model.model_id / "artifacts"
    assert model.artifact_location == stored.as_uri()
    assert (stored / "artifacts" / "model.pt").read_bytes() == (tracked.out / "model.pt").read_bytes()


def test_the_run_finishes_and_its_id_is_recorded_next_to_the_model(tracked):
    info = tracked.client.get_run(tracked.run_id).info
    assert info.status == "FINISHED" and info.end_time is not None
    record = json.loads((tracked.out / RUN_RECORD).read_text())
    assert record == {
        "run_id": tracked.run_id,
        "experiment_id": info.experiment_id,
        "tracking_uri": tracked.uri,
        "model_version": "1",  # the registered model's version of this training (the store's first)
    }
    assert tracked.client.get_experiment(info.experiment_id).name == tracked.params.mlflow.experiment


@pytest.mark.parametrize("form", ["runs:/{run_id}/model", "models:/{model_id}"])
def test_the_loaded_pyfunc_model_predicts_what_evaluate_wrote(tracked, form, monkeypatch):
    outputs = tracked.client.get_run(tracked.run_id).outputs.model_outputs
    uri = form.format(run_id=tracked.run_id, model_id=outputs[0].model_id)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracked.uri)
    # load_model resolves both URI forms through the global tracking URI, which takes precedence
    mlflow.set_tracking_uri(tracked.uri)
    model = mlflow.pyfunc.load_model(uri)
    test = load_prepared(tracked.data_dir, splits=("test",)).test
    inputs = {m: test.features(m).numpy() for m in MODALITIES}
    inputs.update({f"{m}_len": test.lengths(m).numpy() for m in MODALITIES})
    predicted = model.predict(inputs)
    with open(tracked.plots / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == test.id
    np.testing.assert_allclose(predicted, [float(r["prediction"]) for r in rows], rtol=0, atol=1e-6)


# --- resuming and failing


def test_resume_continues_the_same_run_and_logs_each_epoch_once(tiny, store, tmp_path, monkeypatch):
    params, data_dir = tiny
    out = tmp_path / "out"
    client = MlflowClient(store)
    # the first attempt ends after epoch 2 as an interruption would, its checkpoint written
    monkeypatch.setattr(
        mdkat.runs, "fit", lambda *a, on_epoch, **k: fit(*a, on_epoch=stop_after(2, then=on_epoch), **k)
    )
    with pytest.raises(Stop):
        train_run(params, data_dir, out)
    run_id = _recorded_run_id(out)
    assert client.get_run(run_id).info.status == "FAILED"
    assert [step for step, _ in _steps(client, run_id, "valid_mae")] == [1, 2]

    monkeypatch.setattr(mdkat.runs, "fit", fit)
    result = train_run(params, data_dir, out, resume=True)
    assert result["run_id"] == run_id == _recorded_run_id(out)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id])) == 1
    history = _history(out / "history.csv")
    epochs = params.train.epochs
    for key in ("valid_mae", "train_loss", "lr"):
        logged = _steps(client, run_id, key)
        assert [step for step, _ in logged] == list(range(1, epochs + 1)), key
        np.testing.assert_array_equal([v for _, v in logged], [row[key] for row in history], err_msg=key)
    assert run.data.metrics["best_valid_mae"] == min(row["valid_mae"] for row in history)
    assert len(run.outputs.model_outputs) == 1


def test_the_stage_continues_a_crashed_run_of_its_own_configuration_only(tiny, store, tmp_path, monkeypatch):
    # what `dvc repro` does after a crash: the stage runs again without --resume; DVC has deleted its
    # outputs, the checkpoint next to them is still there
    params, data_dir = tiny
    client = MlflowClient(store)
    whole = train_run(params, data_dir, tmp_path / "whole")
    assert not list((tmp_path / "whole").glob(".checkpoint-*")), "a finished run leaves no checkpoint"

    out = tmp_path / "out"
    monkeypatch.setattr(
        mdkat.runs, "fit", lambda *a, on_epoch, **k: fit(*a, on_epoch=stop_after(2, then=on_epoch), **k)
    )
    with pytest.raises(Stop):
        train_run(params, data_dir, out)
    crashed = _recorded_run_id(out)
    (work,) = out.glob(".checkpoint-*")
    for name in ("history.csv", RUN_RECORD):  # what DVC removes before it runs the stage again
        (out / name).unlink(missing_ok=True)
    monkeypatch.setattr(mdkat.runs, "fit", fit)
    again = train_run(params, data_dir, out)
    assert again["run_id"] == crashed and client.get_run(crashed).info.status == "FINISHED"
    assert again["valid"] == whole["valid"] and again["best_epoch"] == whole["best_epoch"]
    assert (
        _history(out / "history.csv")[-1]["valid_mae"]
        == _history(tmp_path / "whole" / "history.csv")[-1]["valid_mae"]
    )
    assert not work.exists()

    # a crash, then other values: the stage starts afresh, ends the dead run KILLED and removes its folder
    monkeypatch.setattr(
        mdkat.runs, "fit", lambda *a, on_epoch, **k: fit(*a, on_epoch=stop_after(1, then=on_epoch), **k)
    )
    with pytest.raises(Stop):
        train_run(params, data_dir, out)
    dead = _recorded_run_id(out)
    client.update_run(dead, status="RUNNING")  # as a process killed with SIGKILL leaves it
    monkeypatch.setattr(mdkat.runs, "fit", fit)
    changed = with_values(params, {"train.lr": params.train.lr / 2})
    # ... but an explicit --resume refuses, and says what differs
    with pytest.raises(MdkatError) as raised:
        train_run(changed, data_dir, out, resume=True)
    assert f"train.lr: {params.train.lr!r} -> {params.train.lr / 2!r}" in str(raised.value)
    fresh = train_run(changed, data_dir, out)
    assert fresh["run_id"] != dead and client.get_run(dead).info.status == "KILLED"
    assert not list(out.glob(".checkpoint-*"))


def test_resume_with_changed_values_is_an_error_listing_each_difference(tiny, tmp_path):
    params, data_dir = tiny
    data = load_prepared(data_dir, splits=("train", "valid"))
    with pytest.raises(Stop):
        fit(params, data, tmp_path, on_epoch=stop_after(1), progress=False)
    changed = with_values(params, {"train.lr": 0.01, "train.batch_size": params.train.batch_size + 1})
    with pytest.raises(MdkatError) as raised:
        fit(changed, data, tmp_path, resume=True, progress=False)
    message = str(raised.value)
    assert "train.lr: " in message and "-> 0.01" in message
    assert f"train.batch_size: {params.train.batch_size} -> {params.train.batch_size + 1}" in message
    assert "train.epochs" not in message and str(tmp_path / "checkpoint.pt") in message
    # where it runs is not what it is: another device resumes
    fit(with_values(params, {"train.device": "cpu"}), data, tmp_path, resume=True, progress=False)


@pytest.mark.parametrize(("error", "status"), [(RuntimeError, "FAILED"), (KeyboardInterrupt, "KILLED")])
def test_a_failing_training_ends_the_run_and_propagates(tiny, store, tmp_path, monkeypatch, error, status):
    params, data_dir = tiny
    raised = error("broken on purpose")

    def broken_fit(*args, **kwargs):
        raise raised

    monkeypatch.setattr(mdkat.runs, "fit", broken_fit)
    with pytest.raises(error) as caught:
        train_run(params, data_dir, tmp_path / "out")
    assert caught.value is raised
    info = MlflowClient(store).get_run(_recorded_run_id(tmp_path / "out")).info
    assert info.status == status and info.end_time is not None


# --- secrets


def test_a_password_in_a_parameter_is_logged_nowhere(store, tmp_path):
    params = tiny_params(*SETTINGS, f"data.url={SECRET_URL}")
    assert params.data.source == "synthetic"
    # prepared with the same parameters, as the pipeline does: the manifest records them
    prepare(params.data, tmp_path / "prepared")
    result = train_run(params, tmp_path / "prepared", tmp_path / "out")
    run = MlflowClient(store).get_run(result["run_id"])
    assert run.data.params["data.url"] == "https://user:***@example.org/x.pkl"
    assert not [k for k, v in run.data.params.items() if "s3cret" in v]
    assert not [k for k, v in run.data.tags.items() if "s3cret" in v]
    resolved = yaml.safe_load((tmp_path / "out" / "params.resolved.yaml").read_text())
    assert resolved["data"]["url"] == "https://user:***@example.org/x.pkl"
    written = [p for folder in ("mlruns", "out") for p in (tmp_path / folder).rglob("*") if p.is_file()]
    assert any(p.name == "data_manifest.json" for p in written)
    leaking = [p for p in [*written, tmp_path / "mlflow.db"] if b"s3cret" in p.read_bytes()]
    assert leaking == []


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("postgresql://u:p@h:5432/db", "postgresql://u:***@h:5432/db"),
        (SECRET_URL, "https://user:***@example.org/x.pkl"),
        ("mysql+pymysql://u:p:q@h/db", "mysql+pymysql://u:***@h/db"),
        ("https://example.org/x.pkl", "https://example.org/x.pkl"),
        ("https://user@example.org/x.pkl", "https://user@example.org/x.pkl"),
        ("sqlite:///x.db", "sqlite:///x.db"),
        ("no url at all", "no url at all"),
        (5432, 5432),
        (None, None),
    ],
)
def test_redact_hides_only_passwords_in_urls(value, expected):
    assert redact(value) == expected


# --- tracking servers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A `mlflow server` subprocess on 127.0.0.1."""

    url: str
    artifacts: Path
    process: subprocess.Popen
    log: Path

    def wait_until_healthy(self, timeout_s: float = SERVER_BOOT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"mlflow server exited with {self.process.returncode}:\n{self.log.read_text()}")
            with contextlib.suppress(urllib.error.URLError, OSError):
                with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return
            time.sleep(0.25)
        pytest.fail(f"mlflow server gave no /health in {timeout_s} s:\n{self.log.read_text()}")


@pytest.fixture(scope="module", autouse=True)
def mlflow_server(tmp_path_factory, postgres):
    """A tracking server as a team shares one: a PostgreSQL backend store and an artifact root; started
    with the module so that its boot (tens of seconds, the schema migrations) overlaps the tests."""
    folder = tmp_path_factory.mktemp("server")
    postgres.psql("CREATE DATABASE mlflow OWNER tuner")
    port = _free_port()
    command = [
        *(sys.executable, "-m", "mlflow", "server"),
        *("--backend-store-uri", postgres.url.rsplit("/", 1)[0] + "/mlflow"),
        *("--artifacts-destination", str(folder / "art")),
        *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
    ]
    log = folder / "server.log"
    with open(log, "wb") as sink:
        # its own process group: the server runs its workers as children, and all must be stopped
        process = subprocess.Popen(
            command,
            cwd=folder,
            # its background job runner (scheduled GenAI jobs) is not used here, and its workers boot slowly
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield Server(f"http://127.0.0.1:{port}", folder / "art", process, log)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # a worker that outlived the leader


# the train stage's work in a process of its own: argv = params file, overrides (\x1f-joined), data, out
TRAIN_PROCESS = """
import sys
from mdkat.checks import load_checked
from mdkat.runs import train_run
train_run(load_checked(sys.argv[1], sys.argv[2].split("\\x1f")), sys.argv[3], sys.argv[4])
"""


def test_two_processes_log_at_once_to_a_shared_tracking_server(mlflow_server, tiny, tmp_path):
    mlflow_server.wait_until_healthy()
    params, data_dir = tiny
    (tmp_path / "dvc.yaml").touch()
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.url, "OMP_NUM_THREADS": "1"}
    env.pop("DVC_STAGE", None)
    workers = {
        seed: subprocess.Popen(
            [
                *(sys.executable, "-c", TRAIN_PROCESS, str(ROOT / "params.yaml")),
                "\x1f".join([*TINY, *SETTINGS, f"train.seed={seed}"]),
                *(str(data_dir), str(tmp_path / f"out{seed}")),
            ],
            cwd=tmp_path,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in (1, 2)
    }
    for worker in workers.values():
        _, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err[-3000:]

    client = MlflowClient(mlflow_server.url)
    valid = load_prepared(data_dir, splits=("valid",)).valid
    inputs = {m: valid.features(m).numpy() for m in MODALITIES}
    inputs.update({f"{m}_len": valid.lengths(m).numpy() for m in MODALITIES})
    for seed in workers:
        out = tmp_path / f"out{seed}"
        run = client.get_run(_recorded_run_id(out))
        assert run.info.status == "FINISHED" and run.data.tags["seed"] == str(seed)
        assert run.data.params["model.mdkat.width"] == "16" and run.data.params["loss.mdkat.ka"] == "0.25"
        logged = _steps(client, run.info.run_id, "valid_mae")
        assert logged == [(int(row["epoch"]), row["valid_mae"]) for row in _history(out / "history.csv")]
        # artifacts go to the server's store, where every user of the server can read them
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")
        assert {"model.pt", "history.csv"} <= _artifacts(client, run.info.run_id)
        stored = mlflow_server.artifacts / run.info.experiment_id / run.info.run_id / "artifacts"
        assert (stored / "model.pt").read_bytes() == (out / "model.pt").read_bytes()
        # the pyfunc model, read back through the server, predicts what the run's own file predicts
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
            mlflow.set_tracking_uri(mlflow_server.url)
            served = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
            np.testing.assert_allclose(
                served.predict(inputs), predict(model_from_file(out / "model.pt"), valid, 64), atol=1e-6
            )
    assert _recorded_run_id(tmp_path / "out1") != _recorded_run_id(tmp_path / "out2")
    assert not (tmp_path / "mlruns").exists()


def test_the_health_check_passes_credentials_in_the_server_uri(mlflow_server):
    mlflow_server.wait_until_healthy()
    host = mlflow_server.url.removeprefix("http://")
    check_reachable(f"http://user:pass%40word@{host}/")  # no error: the server answered


@pytest.mark.parametrize("resume", [False, True])
def test_an_unreachable_server_fails_fast_before_any_epoch(tiny, tmp_path, monkeypatch, resume):
    params, data_dir = tiny
    out = tmp_path / "out"
    if resume:
        out.mkdir()
        (out / RUN_RECORD).write_text(json.dumps({"run_id": "0" * 32, "experiment_id": "1"}))
    (tmp_path / "dvc.yaml").touch()
    monkeypatch.chdir(tmp_path)
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there any more
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    start = time.monotonic()
    with pytest.raises(MdkatError, match="not reachable") as caught:
        train_run(params, data_dir, out, resume=resume)
    assert time.monotonic() - start < 10
    assert uri in str(caught.value)
    assert not (out / "history.csv").exists() and not (out / CHECKPOINT).exists()
    assert (out / RUN_RECORD).exists() == resume


def test_an_unreachable_server_message_hides_the_password():
    port = _free_port()
    with pytest.raises(MdkatError) as caught:
        check_reachable(f"http://user:s3cret@127.0.0.1:{port}")
    assert f"http://user:***@127.0.0.1:{port}" in str(caught.value)
    assert "s3cret" not in str(caught.value)


# --- the stage scripts as DVC runs them


def test_train_and_evaluate_stages_record_one_run(tiny, store, tmp_path):
    _, data_dir = tiny
    overrides = [arg for item in (*TINY, *SETTINGS) for arg in ("-S", item)]
    common = ["--params", str(ROOT / "params.yaml"), "--data", str(data_dir), *overrides]
    # one torch thread in the children too (see one_torch_thread); DVC names the stage it runs; the
    # scripts import the package of this tree, whatever copy may be installed
    python_path = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": store,
        "OMP_NUM_THREADS": "1",
        "DVC_STAGE": "train",
        "PYTHONPATH": os.pathsep.join(python_path),
    }

    def stage(name: str, *args: str) -> subprocess.CompletedProcess:
        script = str(ROOT / "stages" / f"{name}.py")
        return subprocess.run(
            [sys.executable, script, *common, *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    out = tmp_path / "out"
    trained = stage("train", "--out", str(out))
    assert trained.returncode == 0, trained.stderr
    run_id = _recorded_run_id(out)
    assert f"MLflow run {run_id}" in trained.stderr
    # evaluate logs into the training run and leaves its provenance tags alone
    env["DVC_STAGE"] = "evaluate"
    evaluated = stage(
        "evaluate",
        *("--model", str(out / "model.pt")),
        *("--metrics", str(tmp_path / "metrics.json")),
        *("--plots", str(tmp_path / "plots")),
    )
    assert evaluated.returncode == 0, evaluated.stderr
    for path in (out / "model.pt", out / "history.csv", tmp_path / "metrics.json"):
        assert path.exists(), path
    assert (tmp_path / "plots" / "predictions.csv").exists()

    client = MlflowClient(store)
    run = client.get_run(run_id)
    assert [r.info.run_id for r in client.search_runs([run.info.experiment_id])] == [run_id]
    assert run.info.status == "FINISHED"
    assert run.data.tags["dvc.stage"] == "train"
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert run.data.metrics["test_mae"] == report["test"]["mae"]
    assert "evaluation/predictions.csv" in _artifacts(client, run_id)
    assert (tmp_path / "mlruns" / run_id / "artifacts" / "model.pt").exists()


class _Degraded(http.server.BaseHTTPRequestHandler):
    """A tracking server that is up (/health answers) but fails every API call."""

    def _answer(self) -> None:
        healthy = self.path.rstrip("/").endswith("/health")
        body = b"OK" if healthy else b'{"error_code": "INTERNAL_ERROR", "message": "database is down"}'
        self.send_response(200 if healthy else 500)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args) -> None:
        pass


def test_a_degraded_tracking_server_ends_training_within_a_minute_in_one_line(tiny, tmp_path, monkeypatch):
    params, data_dir = tiny
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Degraded)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        uri = f"http://admin:hunter22@127.0.0.1:{server.server_address[1]}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        for key in HTTP_LIMITS:  # the pipeline's bounds, not whatever the machine exports
            monkeypatch.delenv(key, raising=False)
        started = time.monotonic()
        with pytest.raises(MdkatError) as raised:
            train_run(params, data_dir, tmp_path / "out")
        elapsed = time.monotonic() - started
    finally:
        server.shutdown()
        server.server_close()
    message = str(raised.value)
    assert elapsed < 60, elapsed
    assert "\n" not in message and f"http://admin:***@127.0.0.1:{server.server_address[1]}" in message
    assert "hunter22" not in message and "failed" in message
    assert not (tmp_path / "out" / "model.pt").exists()


def test_train_registers_a_version_evaluate_makes_it_candidate_and_promote_makes_the_best_champion(
    tracked, monkeypatch
):
    from mdkat.registry import promote

    name = tracked.params.mlflow.registered_model
    client = tracked.client
    # logged-model URIs (models:/m-...) resolve through the global tracking URI
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracked.uri)
    mlflow.set_tracking_uri(tracked.uri)
    record = json.loads((tracked.out / RUN_RECORD).read_text())
    version = client.get_model_version(name, record["model_version"])
    manifest_sha = data_identity(tracked.data_dir)
    assert version.run_id == tracked.run_id
    assert version.tags["data.manifest_sha256"] == manifest_sha and version.tags["model"] == "mdkat"
    assert client.get_model_version_by_alias(name, "candidate").version == version.version
    # a second, worse version on other data never becomes champion for this data
    other = client.create_model_version(
        name, version.source, tracked.run_id, tags={"data.manifest_sha256": "x"}
    )
    assert promote(tracked.uri, name, manifest_sha) == str(version.version)
    assert client.get_model_version_by_alias(name, "champion").version == version.version != other.version
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    data = load_prepared(tracked.data_dir, splits=("test",)).test
    inputs = {m: data.features(m).numpy() for m in MODALITIES}
    inputs.update({f"{m}_len": data.lengths(m).numpy() for m in MODALITIES})
    predictions = np.asarray(model.predict(inputs))
    written = pd.read_csv(tracked.plots / "predictions.csv")["prediction"].to_numpy()
    np.testing.assert_allclose(predictions, written, atol=1e-5)
    with pytest.raises(MdkatError, match="no version trained on data"):
        promote(tracked.uri, name, "0" * 64)


def test_evaluating_a_model_whose_run_is_in_another_store_writes_metrics_and_logs_nothing(
    tracked, tmp_path, monkeypatch, capsys
):
    pulled = tmp_path / "pulled"  # what `dvc pull` gives a colleague: the model and its run record
    pulled.mkdir()
    shutil.copy(tracked.out / "model.pt", pulled / "model.pt")
    record = json.loads((tracked.out / RUN_RECORD).read_text())
    elsewhere = {**record, "run_id": "f" * 32, "tracking_uri": "sqlite:////elsewhere/mlflow.db"}
    (pulled / RUN_RECORD).write_text(json.dumps(elsewhere))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracked.uri)
    monkeypatch.chdir(tracked.root)
    runs_before = len(tracked.client.search_runs([record["experiment_id"]]))

    result = evaluate_run(
        tracked.params, tracked.data_dir, pulled / "model.pt", tmp_path / "test.json", tmp_path / "plots"
    )
    assert result["run_id"] is None
    assert json.loads((tmp_path / "test.json").read_text())["test"] == result["test"]
    assert f"run {'f' * 32} is not in this tracking store" in capsys.readouterr().err
    assert len(tracked.client.search_runs([record["experiment_id"]])) == runs_before


def test_system_metrics_are_logged_into_the_train_run_only_when_switched_on(
    tiny, store, tmp_path, monkeypatch
):
    params, data_dir = tiny
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")  # several samples in a tiny run
    client = MlflowClient(store)
    on = train_run(with_values(params, {"mlflow.system_metrics": True}), data_dir, tmp_path / "on")
    off = train_run(params, data_dir, tmp_path / "off")
    sampled = {k for k in client.get_run(on["run_id"]).data.metrics if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= sampled
    assert not [k for k in client.get_run(off["run_id"]).data.metrics if k.startswith("system/")]
    assert params.mlflow.system_metrics is False  # the default: no sampling thread


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("echo 550.54.15; echo 550.54.15", "550.54.15"),  # one line per GPU: the first
        ("echo 'NVIDIA-SMI has failed' >&2; exit 9", "unknown"),
        # what it prints after a driver update without a reboot, on stdout, exiting with an error
        ("echo 'Failed to initialize NVML: Driver/library version mismatch'; exit 18", "unknown"),
        (None, "unknown"),  # no nvidia-smi on the PATH
    ],
)
def test_the_gpu_driver_tag_is_read_from_nvidia_smi(tmp_path, monkeypatch, script, expected):
    from mdkat.tracking import _nvidia_driver

    if script is not None:
        tool = tmp_path / "nvidia-smi"
        tool.write_text(f"#!/bin/sh\n{script}\n")
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert _nvidia_driver() == expected
