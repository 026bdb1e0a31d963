"""The tune stage on tiny synthetic data: exact trial counts across workers, resuming, failed and pruned
trials, the file of best values, the study's identity, secrets, and the search space.

Each study runs from its own temporary folder holding an empty dvc.yaml, which makes it the project root:
relative Optuna storages and mlruns/ land there. Each records into its own sqlite MLflow store, a copy of
one empty store migrated once for the module.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from optuna.distributions import FloatDistribution
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState, create_trial

import mdkat.tuning
from mdkat.checks import load_checked
from mdkat.config import ConfigError, Params, chosen_flat_dict, load_params
from mdkat.data import load_prepared
from mdkat.data.prepare import prepare
from mdkat.errors import MdkatError
from mdkat.models import search_space
from mdkat.study_storage import open_storage
from mdkat.tracking import flat_params
from mdkat.training import fit
from mdkat.tuning import WorkerPlan, end_orphaned_runs, run_worker, study_name, tune
from tests.conftest import ROOT, TINY, use_store
from tests.postgres import PASSWORD

# trials train on the CPU, where one seed gives identical numbers: a trial can be replayed exactly
SETTINGS = [*TINY, "train.device=cpu", "tune.epochs=2", "tune.pruner=median"]
# params.yaml's kind of space, written out so that the expectations below do not follow edits of that file
FULL_SPACE = (
    "tune.space=["
    "{key: loss.mdkat.unimodal, low: 0.03, high: 1.0, log: true}, "
    "{key: loss.mdkat.rec, low: 0.01, high: 1.0, log: true}, "
    "{key: loss.mdkat.orth, low: 0.01, high: 1.0, log: true}, "
    "{key: loss.mdkat.ka, low: 0.01, high: 1.0, log: true}, "
    "{key: loss.mdkat.kt, low: 0.01, high: 1.0, log: true}, "
    "{key: train.lr, low: 3.0e-4, high: 3.0e-3, log: true}]"
)
LOSS_KEYS = ["loss.mdkat.unimodal", "loss.mdkat.rec", "loss.mdkat.orth", "loss.mdkat.ka", "loss.mdkat.kt"]
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
SECRET_URL = "https://u:s3cret@example.org/x.pkl"


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread(one_torch_thread):
    # tune() gives each worker os.cpu_count() // workers threads, and a single worker runs in this process
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "cpu_count", lambda: 1)
        yield


def _params(*overrides: str) -> Params:
    return load_checked(ROOT / "params.yaml", [*SETTINGS, *overrides])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Tiny synthetic data prepared from SETTINGS, as the prepare stage would."""
    out = tmp_path_factory.mktemp("tiny") / "prepared"
    prepare(_params().data, out)
    return out


def _journal(path: Path) -> JournalStorage:
    return JournalStorage(JournalFileBackend(str(path)))


def _trials(storage: Any, name: str) -> list[FrozenTrial]:
    return optuna.load_study(study_name=name, storage=storage).get_trials()


def _counted(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    return [t for t in trials if t.state in FINISHED and not t.user_attrs.get("surplus")]


@dataclass
class Recorded:
    """The MLflow runs of one study: a parent per invocation, a nested run per trial."""

    parents: list[Run]
    trials: dict[int, Run]  # by the trial number in the `optuna.trial` tag


def _recorded(uri: str, name: str, experiment: str) -> Recorded:
    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([experiment_id], filter_string=f"tags.`optuna.study` = '{name}'")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    nested = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    trials = {int(r.data.tags["optuna.trial"]): r for r in nested}
    assert len(trials) == len(nested), "a trial was recorded twice"
    return Recorded(parents, trials)


def _metric_steps(uri: str, run: Run, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run.info.run_id, key))


def _assert_recorded_like_the_study(uri: str, trial: FrozenTrial, run: Run, parent: Run) -> None:
    """The nested run of `trial`: under `parent`, its state and status, an objective only when complete."""
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert run.data.tags["optuna.state"] == trial.state.name
    assert run.info.status == RUN_STATUS[trial.state.name]
    if trial.state == TrialState.COMPLETE:
        # the objective is the best validation MAE over the trial's epochs, each of which was logged
        logged = _metric_steps(uri, run, "valid_mae")
        assert run.data.metrics["objective"] == trial.value == min(v for _, v in logged)
    else:
        assert "objective" not in run.data.metrics


# ---------------------------------------------------------------------------------------------------------
# two workers on a journal file, shared by the tests that only read what it left


@dataclass
class Study:
    """A finished two-worker study and what it wrote."""

    uri: str
    root: Path
    params: Params
    out: Path
    result: dict[str, Any]
    trials: list[FrozenTrial]


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory, data_dir, empty_store) -> Study:
    root = tmp_path_factory.mktemp("two-workers")
    # a relative path: the journal lands at the project root, for the spawned workers too
    # the deadline bounds a worker that miscounts: it stops there and the counts below fail, where it would
    # otherwise start surplus trials forever
    params = _params(
        FULL_SPACE, "tune.n_trials=4", "tune.storage=journal:study.journal", "tune.timeout_s=120"
    )
    with pytest.MonkeyPatch.context() as mp:
        uri = use_store(root, mp, empty_store)
        result = tune(params, data_dir, root / "best.yaml", workers=2)
    trials = _trials(_journal(root / "study.journal"), result["study_name"])
    return Study(uri, root, params, root / "best.yaml", result, trials)


def test_two_workers_finish_exactly_n_trials_with_distinct_proposals(two_workers):
    trials = two_workers.trials
    # the file lock lets no worker start a trial beyond n_trials, so none is even discarded as surplus
    assert len(_counted(trials)) == len(trials) == 4
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    # workers seeded alike would propose the same points
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 4


def test_each_trial_is_a_nested_run_of_the_invocation(two_workers):
    name = two_workers.result["study_name"]
    recorded = _recorded(two_workers.uri, name, two_workers.params.mlflow.experiment)
    (parent,) = recorded.parents
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["workers"] == "2"
    assert parent.data.metrics["best_value"] == two_workers.result["value"]
    assert sorted(recorded.trials) == [t.number for t in two_workers.trials]
    for trial in two_workers.trials:
        run = recorded.trials[trial.number]
        _assert_recorded_like_the_study(two_workers.uri, trial, run, parent)
        assert run.data.tags["worker"] in {"0", "1"}
        assert {k: float(v) for k, v in run.data.params.items() if k != "trial"} == trial.params


def test_trial_0_evaluates_the_default_weights_of_params_yaml(two_workers):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())

    def value(key: str) -> float:
        node = raw
        for part in key.split("."):
            node = node[part]
        return float(node)

    first = two_workers.trials[0]
    assert first.params == {key: value(key) for key in [*LOSS_KEYS, "train.lr"]}


def test_best_file_names_the_best_trial_and_is_read_by_load_params(two_workers):
    best = yaml.safe_load(two_workers.out.read_text())
    assert list(best) == ["params", "metric", "direction", "value", "trial", "study_name", "n_trials"]
    complete = [t for t in two_workers.trials if t.state == TrialState.COMPLETE]
    winner = min(complete, key=lambda t: t.value)
    assert best["trial"] == winner.number and best["value"] == winner.value
    assert best["params"] == winner.params
    assert list(best["params"]) == [*LOSS_KEYS, "train.lr"]
    assert (best["metric"], best["direction"]) == ("valid_mae", "minimize")
    assert best["study_name"] == two_workers.result["study_name"] and best["n_trials"] == 4
    params = load_params(ROOT / "params.yaml", SETTINGS, best=two_workers.out)
    assert params.weights()["ka"] == best["params"]["loss.mdkat.ka"]
    assert params.train.lr == best["params"]["train.lr"]


def test_training_with_the_best_values_reproduces_the_best_trial(two_workers, data_dir, tmp_path):
    epochs = two_workers.params.tune.epochs
    params = load_params(ROOT / "params.yaml", [*SETTINGS, f"train.epochs={epochs}"], best=two_workers.out)
    result = fit(params, load_prepared(data_dir, splits=("train", "valid")), tmp_path, progress=False)
    assert len(result.history) == epochs
    assert min(row["valid_mae"] for row in result.history) == two_workers.result["value"]


@pytest.mark.parametrize("locked", [True, False], ids=["local-lock", "no-lock-as-on-rdb"])
def test_racing_workers_never_count_more_than_n_trials(data_dir, tmp_path, monkeypatch, locked):
    params = _params(FULL_SPACE, "tune.epochs=1", "tune.n_trials=1", f"tune.storage=journal:{tmp_path / 'j'}")
    name = "race"
    optuna.create_study(study_name=name, storage=_journal(tmp_path / "j"))
    count = mdkat.tuning.counted

    def slow_count(study):
        found = count(study)
        # a window in which both workers count before either creates its trial, unless the lock orders them
        time.sleep(0.5)
        return found

    monkeypatch.setattr(mdkat.tuning, "counted", slow_count)
    if not locked:
        monkeypatch.setattr(mdkat.tuning, "lock_path", lambda storage, name: None)
    plans = [
        WorkerPlan(
            params,
            str(data_dir),
            name,
            w,
            parent_run=None,
            threads=1,
            deadline=None,
            out=str(tmp_path / "best.yaml"),
        )
        for w in (0, 1)
    ]
    # threads stand in for worker processes: flock treats each open() of the lock file on its own
    with ThreadPoolExecutor(2) as pool:
        started = sorted(pool.map(run_worker, plans))
    trials = _trials(_journal(tmp_path / "j"), name)
    assert [t.state for t in _counted(trials)] == [TrialState.COMPLETE]
    if locked:
        assert started == [0, 1] and len(trials) == 1
    else:
        # the race happened; the trial that lost it was discarded before training
        assert started == [1, 1] and len(trials) == 2
        assert trials[1].user_attrs["surplus"] and trials[1].state == TrialState.PRUNED
        assert trials[1].params == {}


# ---------------------------------------------------------------------------------------------------------
# resuming, failures, pruning


def test_a_resumed_study_keeps_its_trials_and_tops_up_to_the_new_n_trials(store, data_dir, tmp_path):
    storage = f"journal:{tmp_path / 'study.journal'}"
    first = tune(_params(FULL_SPACE, "tune.n_trials=2", f"tune.storage={storage}"), data_dir, tmp_path / "a")
    before = _trials(_journal(tmp_path / "study.journal"), first["study_name"])
    second = tune(_params(FULL_SPACE, "tune.n_trials=4", f"tune.storage={storage}"), data_dir, tmp_path / "b")
    # n_trials is bookkeeping: the same study goes on
    assert second["study_name"] == first["study_name"]
    assert optuna.get_all_study_names(_journal(tmp_path / "study.journal")) == [first["study_name"]]
    after = _trials(_journal(tmp_path / "study.journal"), second["study_name"])
    assert len(_counted(after)) == len(after) == 4 and second["n_trials"] == 4
    assert after[:2] == before
    assert len({tuple(sorted(t.params.items())) for t in after}) == 4
    recorded = _recorded(store, first["study_name"], _params().mlflow.experiment)
    assert len(recorded.parents) == 2 and sorted(recorded.trials) == [0, 1, 2, 3]


@pytest.mark.parametrize("retries", [1, 0])
def test_a_trial_left_running_is_failed_and_run_again_with_its_values(
    store, data_dir, tmp_path, capfd, retries
):
    # the default kind of storage, relative: optuna.db at the project root
    params = _params(
        FULL_SPACE, "tune.n_trials=2", "tune.storage=sqlite:///optuna.db", f"tune.max_retries={retries}"
    )
    name = study_name(params, load_prepared(data_dir, splits=()).manifest_sha256)
    # the study as an invocation whose worker died left it: one finished trial, one RUNNING for ever
    study = optuna.create_study(study_name=name, storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    space = {r.key: FloatDistribution(r.low, r.high, log=r.log) for r in params.tune.space}
    finished = {key: d.low for key, d in space.items()}
    study.add_trial(create_trial(params=finished, distributions=space, value=1e9))
    dead = study.ask()
    died_with = {r.key: dead.suggest_float(r.key, r.low, r.high, log=r.log) for r in params.tune.space}

    result = tune(params, data_dir, tmp_path / "best.yaml")
    trials = _trials(f"sqlite:///{tmp_path / 'optuna.db'}", name)
    assert "trials [1] were left running by a worker that is gone" in capfd.readouterr().err
    if retries:
        # the dead trial runs again with its values and takes its place: still 2 counted trials
        assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
        assert trials[2].params == died_with
        assert result["n_trials"] == 2 and result["trial"] == 1 and result["params"] == died_with
    else:
        # no retries: the failed trial counts towards n_trials, so no trial had to run
        assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL]
        assert result["n_trials"] == 2 and (result["trial"], result["value"]) == (0, 1e9)


def test_a_trial_that_raises_is_failed_and_the_study_goes_on(store, data_dir, tmp_path, monkeypatch):
    calls = []

    def second_trial_breaks(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise RuntimeError("broken on purpose")
        return fit(*args, **kwargs)

    monkeypatch.setattr(mdkat.tuning, "fit", second_trial_breaks)
    params = _params(FULL_SPACE, "tune.n_trials=3", f"tune.storage=journal:{tmp_path / 'study.journal'}")
    result = tune(params, data_dir, tmp_path / "best.yaml")
    trials = _trials(_journal(tmp_path / "study.journal"), result["study_name"])
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert result["n_trials"] == 3 and result["trial"] in {0, 2}
    assert yaml.safe_load((tmp_path / "best.yaml").read_text())["value"] == result["value"]
    recorded = _recorded(store, result["study_name"], params.mlflow.experiment)
    (parent,) = recorded.parents
    assert parent.info.status == "FINISHED"
    for trial in trials:
        _assert_recorded_like_the_study(store, trial, recorded.trials[trial.number], parent)


def test_a_stalled_trial_is_pruned_by_the_median_of_the_completed_ones(store, data_dir, tmp_path):
    # the low end of this learning-rate range barely moves the weights in three epochs
    params = _params(
        "tune.space=[{key: train.lr, low: 1.0e-7, high: 3.0e-3, log: true}]",
        "tune.epochs=3",
        "tune.n_trials=4",
        f"tune.storage=journal:{tmp_path / 'study.journal'}",
    )
    # the study as tune() will find it, with its first trials queued: three sound learning rates (the
    # pruner's startup trials, the default first so that tune() queues nothing more) and then one in the
    # stalled region
    name = study_name(params, load_prepared(data_dir, splits=()).manifest_sha256)
    study = optuna.create_study(study_name=name, storage=_journal(tmp_path / "study.journal"))
    for lr in (params.train.lr, 3e-3, 3e-4, 1e-7):
        study.enqueue_trial({"train.lr": lr})

    result = tune(params, data_dir, tmp_path / "best.yaml")
    trials = _trials(_journal(tmp_path / "study.journal"), name)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3 + [TrialState.PRUNED]
    stalled = trials[3]
    assert stalled.params == {"train.lr": 1e-7} and not stalled.user_attrs.get("surplus")
    # reported after each epoch and pruned after the second: the third epoch never ran
    assert sorted(stalled.intermediate_values) == [1, 2]
    assert result["n_trials"] == 4 and result["trial"] != 3
    recorded = _recorded(store, name, params.mlflow.experiment)
    (parent,) = recorded.parents
    run = recorded.trials[3]
    _assert_recorded_like_the_study(store, stalled, run, parent)
    assert [step for step, _ in _metric_steps(store, run, "valid_mae")] == [1, 2]


# ---------------------------------------------------------------------------------------------------------
# identity, secrets, the search space


@pytest.fixture(scope="module")
def other_data_dir(tmp_path_factory) -> Path:
    """The same tiny set-up prepared from another data seed."""
    out = tmp_path_factory.mktemp("other-seed") / "prepared"
    prepare(_params("data.seed=2").data, out)
    return out


@pytest.mark.parametrize(
    "change",
    [
        "loss.mdkat.ka=0.2",
        "model.mdkat.width=8",
        "train.batch_size=8",
        "tune.epochs=3",
        "tune.metric=corr",
        "tune.seed=7",
    ],
)
def test_a_change_the_objective_depends_on_starts_another_study(data_dir, change):
    sha = load_prepared(data_dir, splits=()).manifest_sha256
    assert study_name(_params(change), sha) != study_name(_params(), sha)


@pytest.mark.parametrize(
    "change",
    [
        "tune.n_trials=50",
        "tune.storage=journal:elsewhere.journal",
        "tune.timeout_s=60",
        "tune.heartbeat_s=5",
        "train.device=cuda",
        "train.epochs=99",
        "model.late_fusion.width=8",  # another model's section
    ],
)
def test_bookkeeping_and_the_device_keep_the_study(data_dir, change):
    sha = load_prepared(data_dir, splits=()).manifest_sha256
    assert study_name(_params(change), sha) == study_name(_params(), sha)


def test_other_data_starts_another_study(data_dir, other_data_dir):
    names = {
        study_name(_params(), load_prepared(d, splits=()).manifest_sha256) for d in (data_dir, other_data_dir)
    }
    assert len(names) == 2
    assert all(n.startswith(_params().tune.study_name + "-") for n in names)


def test_a_database_password_is_not_logged_with_the_parameters():
    params = _params("tune.storage=postgresql://user:s3cret@127.0.0.1:1/db")
    logged = flat_params(params)
    assert logged["tune.storage"] == "postgresql://user:***@127.0.0.1:1/db"
    assert not [k for k, v in logged.items() if "s3cret" in v]


def test_a_password_in_data_url_leaks_nowhere(store, tmp_path, capfd):
    params = _params(
        f"data.url={SECRET_URL}", "tune.n_trials=1", f"tune.storage=journal:{tmp_path / 'study.journal'}"
    )
    assert params.data.source == "synthetic"
    prepare(params.data, tmp_path / "prepared")  # as the pipeline does, from the same parameters
    result = tune(params, tmp_path / "prepared", tmp_path / "best.yaml")
    out, err = capfd.readouterr()
    assert "s3cret" not in out + err
    assert result["study_name"] in err  # the stage did say what it was doing
    recorded = _recorded(store, result["study_name"], params.mlflow.experiment)
    runs = [*recorded.parents, *recorded.trials.values()]
    assert len(runs) == 2
    assert recorded.parents[0].data.params["data.url"] == "https://u:***@example.org/x.pkl"
    for run in runs:
        assert not [k for k, v in {**run.data.params, **run.data.tags}.items() if "s3cret" in v]
    # nor in any file: the best values, the journal, the MLflow store and artifacts, the prepared data
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {"best.yaml", "study.journal", "mlflow.db", "manifest.json"} <= {p.name for p in written}
    assert [p for p in written if b"s3cret" in p.read_bytes()] == []


def test_search_space_drops_other_models_and_terms_the_model_does_not_compute():
    assert [r.key for r in search_space(_params(FULL_SPACE))] == [*LOSS_KEYS, "train.lr"]
    assert [r.key for r in search_space(_params(FULL_SPACE, "model.name=late_fusion"))] == ["train.lr"]
    without_ka = [k for k in LOSS_KEYS if k != "loss.mdkat.ka"]
    no_ka = _params(FULL_SPACE, "model.mdkat.use_ka=false")
    assert [r.key for r in search_space(no_ka)] == [*without_ka, "train.lr"]
    # a range of another model's section is that model's, not the chosen one's
    both = FULL_SPACE[:-1] + ", {key: model.late_fusion.dropout, low: 0.0, high: 0.5, log: false}]"
    assert [r.key for r in search_space(_params(both))] == [*LOSS_KEYS, "train.lr"]
    late = [r.key for r in search_space(_params(both, "model.name=late_fusion"))]
    assert late == ["train.lr", "model.late_fusion.dropout"]


@pytest.mark.parametrize(
    "bad",
    [
        "{key: loss.mdkat.ka, low: 0.5, high: 0.5, log: false}",
        "{key: loss.mdkat.ka, low: 0.5, high: 0.1, log: false}",
        "{key: model.mdkat.width, low: 8, high: 64, log: false}",
        "{key: model.name, low: 0.0, high: 1.0, log: false}",
        "{key: model.mdkat.use_ka, low: 0.0, high: 1.0, log: false}",
        "{key: loss.mdkat.kaa, low: 0.1, high: 1.0, log: false}",
        "{key: loss.mdkat.ka, low: 0.0, high: 1.0, log: true}",
        "{key: loss.mdkat.ka, low: -0.1, high: 1.0, log: true}",
    ],
)
def test_a_bad_search_range_is_a_config_error_naming_its_index(bad):
    space = f"tune.space=[{{key: loss.mdkat.rec, low: 0.01, high: 1.0, log: true}}, {bad}]"
    with pytest.raises(ConfigError, match=r"'tune\.space\[1\]'"):
        _params(space)


def test_defaults_whose_trial_died_are_queued_again(store, data_dir, tmp_path):
    params = _params(FULL_SPACE, "tune.n_trials=2", f"tune.storage=journal:{tmp_path / 'study.journal'}")
    name = study_name(params, load_prepared(data_dir, splits=()).manifest_sha256)
    storage = _journal(tmp_path / "study.journal")
    study = optuna.create_study(study_name=name, storage=storage)
    defaults = {r.key: chosen_flat_dict(params)[r.key] for r in params.tune.space}
    study.enqueue_trial(defaults)
    study.ask()  # trial 0 takes the defaults, and its worker dies

    result = tune(params, data_dir, tmp_path / "best.yaml")
    trials = _trials(storage, name)
    # the retry of the dead trial runs the defaults; it takes the dead trial's place, so one more runs
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert trials[1].params == defaults and result["n_trials"] == 2


@pytest.mark.parametrize(
    ("url", "package"),
    [
        ("postgresql://tuner:hunter22@127.0.0.1:9/optuna", "psycopg[binary]"),
        ("postgresql+psycopg2://tuner:hunter22@127.0.0.1:9/optuna", "psycopg2-binary"),
        ("mysql+pymysql://tuner:hunter22@127.0.0.1:9/optuna", "PyMySQL"),
    ],
)
def test_an_rdb_storage_without_its_driver_says_which_package_to_install(url, package, monkeypatch):
    drivers = {"psycopg": "psycopg", "psycopg2": "psycopg2", "PyMySQL": "pymysql"}
    module = drivers[package.split("[")[0].split("-")[0]]
    monkeypatch.setitem(sys.modules, module, None)  # not installed, whatever this machine has
    with pytest.raises(MdkatError) as raised:
        open_storage(url, heartbeat_s=60)
    message = str(raised.value)
    assert f"pip install '{package}'" in message and "tuner:***@" in message and "hunter22" not in message


# a tune invocation that kills its own process (SIGKILL: no cleanup runs) in trial `kill_at`, epoch 1
KILLED_TUNE = """
import os, signal, sys
import mdkat.tuning
from mdkat.checks import load_checked
from mdkat.training import fit
overrides, data_dir, out, kill_at = sys.argv[1].split("\\x1f"), sys.argv[2], sys.argv[3], int(sys.argv[4])
started = []
def dying_fit(*args, on_epoch, **kwargs):
    started.append(1)
    def epoch(done, row):
        on_epoch(done, row)
        if len(started) == kill_at + 1:
            os.kill(os.getpid(), signal.SIGKILL)
    return fit(*args, on_epoch=epoch, **kwargs)
mdkat.tuning.fit = dying_fit
mdkat.tuning.tune(load_checked(sys.argv[5], overrides), data_dir, out, track=False)
"""


def test_a_study_killed_mid_trial_and_resumed_ends_as_an_uninterrupted_one(data_dir, tmp_path):
    base = [*SETTINGS, FULL_SPACE, "tune.n_trials=4", "tune.pruner=none"]
    whole = _params(*base, f"tune.storage=journal:{tmp_path / 'whole.journal'}")
    expected = tune(whole, data_dir, tmp_path / "whole.yaml", track=False)

    cut = [*base, f"tune.storage=journal:{tmp_path / 'cut.journal'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"}
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            KILLED_TUNE,
            "\x1f".join(cut),
            str(data_dir),
            str(tmp_path / "cut.yaml"),
            "2",
            str(ROOT / "params.yaml"),
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    name = study_name(whole, load_prepared(data_dir, splits=()).manifest_sha256)
    storage = _journal(tmp_path / "cut.journal")
    assert [t.state for t in _trials(storage, name)][-1] == TrialState.RUNNING  # as SIGKILL left it
    assert not (tmp_path / "cut.yaml").exists()
    leftovers = list(tmp_path.glob(".cut.yaml.trial2.*.tmp"))
    assert len(leftovers) == 1, "the killed trial's scratch folder is still there"

    resumed = tune(_params(*cut), data_dir, tmp_path / "cut.yaml", track=False)
    assert resumed == expected
    assert (tmp_path / "cut.yaml").read_text() == (tmp_path / "whole.yaml").read_text()
    trials = _trials(storage, name)
    assert [t.state for t in trials].count(TrialState.FAIL) == 1 and len(trials) == 5
    # the same proposals, place by place: the retry stands where the dead trial stood
    kept = [t.params for t in trials if t.state == TrialState.COMPLETE]
    assert kept == [t.params for t in _trials(_journal(tmp_path / "whole.journal"), name)]
    assert not list(tmp_path.glob(".cut.yaml.trial*")), "the next run removed the dead trial's folder"


def test_mlflow_runs_a_dead_invocation_left_running_are_ended_killed(store):
    client = MlflowClient(store)
    experiment = client.create_experiment("orphans")
    mine = client.create_run(experiment, tags={"optuna.study": "s-1"}).info.run_id
    other = client.create_run(experiment, tags={"optuna.study": "s-2"}).info.run_id
    done = client.create_run(experiment, tags={"optuna.study": "s-1"}).info.run_id
    client.set_terminated(done, "FINISHED")
    assert end_orphaned_runs("orphans", "s-1") == [mine]
    assert [client.get_run(r).info.status for r in (mine, other, done)] == ["KILLED", "RUNNING", "FINISHED"]


# ---------------------------------------------------------------------------------------------------------
# a real PostgreSQL server (tests/postgres.py): workers in other processes share a study through it, a dead
# worker's trial is failed by its heartbeat and run again, and nothing else differs from a file storage


def _fresh_database(postgres, name: str) -> str:
    """A new empty database on the session's server (one per test: studies of equal name do not meet)."""
    postgres.psql(f"CREATE DATABASE {name} OWNER tuner")
    return postgres.url.rsplit("/", 1)[0] + f"/{name}"


def test_two_workers_on_postgresql_finish_exactly_n_trials_and_no_password_is_shown(
    postgres, data_dir, store, tmp_path, capfd
):
    url = _fresh_database(postgres, "two_workers")
    params = _params(FULL_SPACE, "tune.n_trials=4", f"tune.storage={url}", "tune.timeout_s=120")
    result = tune(params, data_dir, tmp_path / "best.yaml", workers=2)
    trials = _trials(url, result["study_name"])
    assert len(_counted(trials)) == len(trials) == 4 and result["n_trials"] == 4
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 4
    shown = capfd.readouterr()
    assert PASSWORD not in shown.out + shown.err
    assert PASSWORD not in (tmp_path / "best.yaml").read_text()
    client = MlflowClient(store)
    for run in client.search_runs([e.experiment_id for e in client.search_experiments()]):
        assert PASSWORD not in str(run.data.params) + str(run.data.tags), run.info.run_name
        if "tune.storage" in run.data.params:
            assert run.data.params["tune.storage"].startswith("postgresql+psycopg://tuner:***@127.0.0.1:")


def test_a_worker_killed_mid_trial_is_failed_by_its_heartbeat_and_the_study_ends_as_on_a_file(
    postgres, data_dir, tmp_path
):
    base = [*SETTINGS, FULL_SPACE, "tune.n_trials=3", "tune.pruner=none", "tune.heartbeat_s=1"]
    on_file = _params(*base, f"tune.storage=journal:{tmp_path / 'whole.journal'}")
    expected = tune(on_file, data_dir, tmp_path / "whole.yaml", track=False)

    url = _fresh_database(postgres, "killed")
    cut = [*base, f"tune.storage={url}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"}
    command = [sys.executable, "-c", KILLED_TUNE, "\x1f".join(cut), str(data_dir), str(tmp_path / "cut.yaml")]
    done = subprocess.run(
        [*command, "1", str(ROOT / "params.yaml")], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    name = study_name(on_file, load_prepared(data_dir, splits=()).manifest_sha256)
    assert [t.state for t in _trials(url, name)] == [TrialState.COMPLETE, TrialState.RUNNING]

    time.sleep(3)  # past the grace period (2 heartbeats): the next worker finds the trial's heart stopped
    resumed = tune(_params(*cut), data_dir, tmp_path / "cut.yaml", track=False)
    trials = _trials(url, name)
    assert [t.state for t in trials] == [
        TrialState.COMPLETE,
        TrialState.FAIL,
        TrialState.COMPLETE,
        TrialState.COMPLETE,
    ]
    assert trials[2].params == trials[1].params  # the dead trial's values, run again in its place
    assert trials[2].system_attrs["failed_trial"] == trials[1].number
    # the same study name, the same proposals place by place, the same best file as on a journal file
    assert resumed == expected
    assert (tmp_path / "cut.yaml").read_text() == (tmp_path / "whole.yaml").read_text()
    kept = [t.params for t in trials if t.state == TrialState.COMPLETE]
    assert kept == [t.params for t in _trials(_journal(tmp_path / "whole.journal"), name)]
    assert optuna.study.get_all_study_names(url) == [name]


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("median", optuna.pruners.MedianPruner),
        ("hyperband", optuna.pruners.HyperbandPruner),
        ("none", optuna.pruners.NopPruner),  # sorts after "median": chosen by name, not by order
    ],
)
def test_tune_pruner_chooses_optunas_pruner_by_name(kind, expected):
    params = load_params(ROOT / "params.yaml", [f"tune.pruner={kind}"])
    pruner = mdkat.tuning._pruner(params)
    assert type(pruner) is expected
    if kind == "median":  # three unpruned trials first, and never on the first epochs
        assert (pruner._n_startup_trials, pruner._n_warmup_steps) == (3, 2)


def test_a_trial_line_names_each_value_by_the_last_part_of_its_key():
    values = {"loss.mdkat.ka": 0.25, "model.misa.lr": 1e-4, "train.lr": 0.0012345}
    assert mdkat.tuning._short(values) == "ka=0.25 lr=0.0001 lr=0.00123"
