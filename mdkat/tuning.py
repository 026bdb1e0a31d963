"""Optuna studies over the loss weights (and the learning rate): the `tune` stage.

- Search space: the ranges of `tune.space` that apply to the chosen model (`mdkat.models.search_space`:
  other models' sections and weights of loss terms the configuration does not compute are left out).
  Objective: the best validation `tune.metric` over a trial's `tune.epochs` epochs (minimised for MAE,
  maximised otherwise); the test split is never read.
- The study's name is `tune.study_name` plus a short hash of every parameter the objective depends on
  and of the data manifest: re-running with nothing changed continues the same study (its finished
  trials count towards `n_trials`), any change starts a new one, so a stale best is never reused.
- The default weights are enqueued as trial 0, so the study can only improve on them.
- Seeded TPE: each trial's sampler seed derives from `tune.seed`, the worker index and the trial's place
  among the counted trials, so workers do not propose the same points, and a study interrupted and resumed
  with one worker proposes the same trials, and writes the same `best.yaml`, as an uninterrupted one.
- A trial whose worker died (SIGKILL, a lost machine) is failed and queued again with its values, at most
  `tune.max_retries` times; the retry takes its place in the count, so it is not counted twice (a trial
  that fails by itself still counts). Local storages find such trials RUNNING when the stage starts; RDB
  storages by their heartbeat. MLflow runs of a dead invocation still RUNNING are ended KILLED.
- Exactly `n_trials`: finished and running trials are counted before each new trial starts, under a file
  lock that is held until the new trial exists in the storage (`MaxTrialsCallback` alone overshoots with
  several workers). Workers on several machines (an RDB URL) cannot share that lock; a trial that finds
  `n_trials` trials ahead of it is tagged `surplus`, pruned at once and not counted.
- Storage (`tune.storage`): `sqlite:///optuna.db` (default; with a busy timeout), `journal:PATH` (Optuna's
  journal file, the better choice for several local workers: appends need no database lock), or any RDB
  URL (`postgresql://...`) for workers on several machines, with heartbeats, so that a dead worker's trial
  is failed (`mdkat.study_storage`). Relative paths are taken from the project root (also from a DVC
  temporary copy). Local
  storages have no heartbeat: trials left RUNNING by a dead worker are failed when the stage starts.
- MLflow: one parent run per invocation, one nested run per trial (params, per-epoch values, state).
  Pruned and failed trials end KILLED / FAILED with an `optuna.state` tag and no objective value.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import multiprocessing
import os
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mdkat.config import Params, chosen_flat_dict, with_values
from mdkat.data import load_prepared
from mdkat.errors import MdkatError
from mdkat.io import atomic_open, scratch_dir
from mdkat.metrics import BY_NAME
from mdkat.models import search_space
from mdkat.redact import redact
from mdkat.study_storage import is_local, open_storage, storage_path
from mdkat.tracking import Tracker, flat_params, run_tags
from mdkat.training import fit

# Parameters that change how a study runs, not what its objective measures: not part of its identity.
BOOKKEEPING = {
    "tune.n_trials",
    "tune.timeout_s",
    "tune.storage",
    "tune.study_name",
    "tune.heartbeat_s",
    "tune.max_retries",
}
IDENTITY_SECTIONS = ("model", "loss", "train", "tune")
NOT_OBJECTIVE = {"train.epochs", "train.device"}  # trials train for tune.epochs; a device is not a setting


def direction(metric: str) -> str:
    """Optuna's direction for a validation metric."""
    return "minimize" if BY_NAME[metric].lower_is_better else "maximize"


def study_name(params: Params, manifest_sha256: str) -> str:
    """`tune.study_name` + a short hash of the objective's parameters and the data."""
    flat = chosen_flat_dict(params)
    relevant = {
        k: v
        for k, v in flat.items()
        if k.split(".", 1)[0] in IDENTITY_SECTIONS and k not in BOOKKEEPING and k not in NOT_OBJECTIVE
    }
    digest = hashlib.sha256(
        json.dumps({"params": relevant, "data": manifest_sha256}, sort_keys=True).encode()
    )
    return f"{params.tune.study_name}-{digest.hexdigest()[:10]}"


# ---------------------------------------------------------------------------------------------------------
# storage


def lock_path(storage: str, name: str) -> Path | None:
    """The lock file that serialises trial starts of study `name` on a local storage."""
    base = storage_path(storage)
    return None if base is None else base.with_name(f".{base.name}.{name}.lock")


class TrialStartLock:
    """An exclusive lock on a file (or nothing, for remote storages), released explicitly."""

    def __init__(self, path: Path | None):
        self.path, self.fd = path, None

    def acquire(self) -> None:
        if self.path is not None:
            self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            fcntl.flock(self.fd, fcntl.LOCK_EX)

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def counted(study) -> list:
    """Trials that count towards `n_trials`, in order: finished or running, not tagged surplus, and not a
    trial whose worker died and which runs again (its retry counts in its place)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    # Optuna's RetryHeartbeatStaleTrialCallback records the chain of failed trials a retry stands for
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)
    return [
        t for t in trials if t.state in states and not t.user_attrs.get("surplus") and t.number not in retried
    ]


def fail_stale_running(study, max_retries: int) -> list[int]:
    """Mark RUNNING trials failed (local storages: no worker of a previous invocation is alive) and queue
    each again with its values, at most `max_retries` times, as an RDB storage's heartbeat does."""
    from optuna.exceptions import ExperimentalWarning
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    with warnings.catch_warnings():  # marked experimental
        warnings.simplefilter("ignore", ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retries)
    stale = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
    for number in stale:
        study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
        retry(study, study.get_trials(deepcopy=False)[number])
    return stale


def enqueue_defaults(study, params: Params) -> bool:
    """Queue the default values as a trial unless one with them is complete, running or queued.

    Checked on every invocation with trials left to run, not only for a new study: if the defaults'
    trial failed or was killed, they are tried again, so the study's best is at least as good.
    """
    from optuna.trial import TrialState

    queued = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))  # retries of dead trials first
    if len(counted(study)) + len(queued) >= params.tune.n_trials:
        return False
    flat = chosen_flat_dict(params)
    defaults = {r.key: flat[r.key] for r in search_space(params)}
    alive = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)
    for t in study.get_trials(deepcopy=False, states=alive):
        # a queued trial has no params yet: Optuna keeps what it was queued with as fixed params
        if (t.params or t.system_attrs.get("fixed_params")) == defaults:
            return False
    study.enqueue_trial(defaults)
    return True


# ---------------------------------------------------------------------------------------------------------
# one worker


@dataclass(frozen=True)
class WorkerPlan:
    """Everything a worker process needs (picklable)."""

    params: Params
    data_dir: str
    study_name: str
    worker: int
    parent_run: str | None
    threads: int
    deadline: float | None  # time.time() after which no new trial starts
    out: str  # best.yaml: each trial trains in a scratch folder next to it


def _pruner(params: Params):
    import optuna

    kind = params.tune.pruner
    if kind == "median":
        # 3 unpruned trials to compare with, and never on the first (noisiest) epoch: epochs count from 1,
        # and Optuna prunes from step n_warmup_steps on
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=1, max_resource=params.tune.epochs, reduction_factor=3
        )
    return optuna.pruners.NopPruner()


def _objective(plan: WorkerPlan, data, lock: TrialStartLock, study):
    import optuna

    tune = plan.params.tune
    metric = f"valid_{tune.metric}"
    better = min if direction(tune.metric) == "minimize" else max
    ranges = search_space(plan.params)

    def objective(trial: optuna.Trial) -> float:
        lock.release()  # the trial now exists in the storage: the next worker may count it
        ahead = [t for t in counted(study) if t.number < trial.number]
        if len(ahead) >= tune.n_trials:
            trial.set_user_attr("surplus", True)
            raise optuna.TrialPruned(f"the study already has {tune.n_trials} trials")
        values = {r.key: trial.suggest_float(r.key, r.low, r.high, log=r.log) for r in ranges}
        trial_params = with_values(
            plan.params, {**values, "train.epochs": tune.epochs}, f"trial {trial.number}"
        )
        tracker = None
        if plan.parent_run is not None:
            tracker = Tracker.start(
                plan.params.mlflow.experiment,
                f"trial {trial.number}",
                {**{k: str(v) for k, v in values.items()}, "trial": str(trial.number)},
                {
                    "optuna.study": plan.study_name,
                    "optuna.trial": str(trial.number),
                    "worker": str(plan.worker),
                },
                parent=plan.parent_run,
            )
        seen: list[float] = []

        def report(epoch: int, row: dict[str, float]) -> None:
            if tracker is not None:
                tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
            value = row[metric]
            seen.append(value)
            if not math.isnan(value):
                trial.report(value, epoch)
            # after the last epoch there is nothing left to save: a finished trial keeps its value
            if epoch < tune.epochs and trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch}")

        state = "FAIL"
        # a pruned trial's run ends KILLED, a failed one FAILED (Tracker.ending), tagged with Optuna's state
        ending = tracker.ending(killed=(optuna.TrialPruned,)) if tracker else contextlib.nullcontext()
        with ending:
            try:
                with scratch_dir(Path(plan.out), f"trial{trial.number}") as tmp:
                    fit(trial_params, data, tmp, on_epoch=report, progress=False)
                finite = [v for v in seen if not math.isnan(v)]
                if not finite:
                    raise MdkatError(f"trial {trial.number}: validation {tune.metric} was NaN in every epoch")
                value = better(finite)
                if tracker is not None:
                    tracker.log_metrics({"objective": value})
                state = "COMPLETE"
                return value
            except optuna.TrialPruned:
                state = "PRUNED"
                raise
            finally:
                if tracker is not None:
                    tracker.set_tags({"optuna.state": state})
                print(
                    f"trial {trial.number} (worker {plan.worker}): {state.lower()} {_short(values)}",
                    file=sys.stderr,
                )

    return objective


def _short(values: dict[str, float]) -> str:
    return " ".join(f"{k.split('.')[-1]}={v:.3g}" for k, v in values.items())


def run_worker(plan: WorkerPlan) -> int:
    """Run trials until the study has `n_trials` or the deadline passes; returns trials started here."""
    import optuna
    import torch

    torch.set_num_threads(plan.threads)  # N workers share the cores; oversubscription stalls every thread
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tune = plan.params.tune
    study = optuna.load_study(
        study_name=plan.study_name,
        storage=open_storage(tune.storage, tune.heartbeat_s, max_retries=tune.max_retries),
        pruner=_pruner(plan.params),
    )
    data = load_prepared(plan.data_dir, splits=("train", "valid"))
    lock = TrialStartLock(lock_path(tune.storage, plan.study_name))
    objective = _objective(plan, data, lock, study)
    started = 0
    while plan.deadline is None or time.time() < plan.deadline:
        lock.acquire()
        try:
            ordinal = len(counted(study))
            if ordinal >= tune.n_trials:
                break
            # the proposal depends on the trial's place in the study, not on the invocation: a study
            # interrupted and resumed proposes what an uninterrupted one would (TPE reads the history
            # from the storage; its only state is the seed)
            study.sampler = optuna.samplers.TPESampler(seed=_derived_seed(tune.seed, plan.worker, ordinal))
            # failures are recorded in the study and the worker goes on; the lock is released in the objective
            study.optimize(objective, n_trials=1, catch=(Exception,))
            started += 1
        finally:
            lock.release()
    return started


def _worker_entry(plan: WorkerPlan) -> int:
    return run_worker(plan)


# ---------------------------------------------------------------------------------------------------------
# the stage


@contextlib.contextmanager
def _parent_run(
    params: Params, name: str, manifest: dict, manifest_sha: str, workers: int
) -> Iterator[Tracker]:
    tags = {**run_tags(manifest, manifest_sha), "optuna.study": name, "workers": str(workers)}
    tracker = Tracker.start(params.mlflow.experiment, f"tune {name}", flat_params(params), tags)
    with tracker.ending():
        yield tracker


def tune(
    params: Params, data_dir: str | Path, out: str | Path, workers: int = 1, track: bool = True
) -> dict[str, Any]:
    """Run (or continue) the study for `params` on `data_dir`; write the best values to `out`."""
    import optuna
    import torch

    if workers < 1:
        raise MdkatError(f"--workers must be at least 1, got {workers}")
    tune_cfg = params.tune
    data = load_prepared(data_dir, splits=("train", "valid"))
    name = study_name(params, data.manifest_sha256)
    storage = open_storage(tune_cfg.storage, tune_cfg.heartbeat_s, max_retries=tune_cfg.max_retries)
    study = optuna.create_study(
        study_name=name, storage=storage, direction=direction(tune_cfg.metric), load_if_exists=True
    )
    if is_local(tune_cfg.storage):
        stale = fail_stale_running(study, tune_cfg.max_retries)
        if stale:
            print(
                f"trials {stale} were left running by a worker that is gone: failed, and queued again "
                f"(at most {tune_cfg.max_retries} times each)",
                file=sys.stderr,
            )
        if track:
            end_orphaned_runs(params.mlflow.experiment, name)
    enqueue_defaults(study, params)
    so_far = len(counted(study))
    print(
        f"study {name} on {redact(tune_cfg.storage)}: {so_far}/{tune_cfg.n_trials} trials so far, "
        f"{workers} worker(s)",
        file=sys.stderr,
    )
    deadline = time.time() + tune_cfg.timeout_s if tune_cfg.timeout_s else None
    # never more than this process may use (OMP_NUM_THREADS), shared among the workers
    threads = max(1, min(torch.get_num_threads(), os.cpu_count() or 1) // workers)

    with contextlib.ExitStack() as stack:
        parent = (
            stack.enter_context(_parent_run(params, name, data.manifest, data.manifest_sha256, workers))
            if track
            else None
        )
        plans = [
            WorkerPlan(
                params=params,
                data_dir=str(data_dir),
                study_name=name,
                worker=w,
                parent_run=parent.run_id if parent else None,
                threads=threads,
                deadline=deadline,
                out=str(out),
            )
            for w in range(workers)
        ]
        if workers == 1:
            threads_before = torch.get_num_threads()
            try:
                run_worker(plans[0])
            finally:
                torch.set_num_threads(threads_before)  # in-process: leave the caller's setting as it was
        else:
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                pool.map(_worker_entry, plans)
        study = optuna.load_study(study_name=name, storage=storage)
        result = _best(study, params, name)
        if parent is not None:
            parent.log_metrics({"best_value": result["value"], "best_trial": result["trial"]})
            parent.set_tags({f"best.{k}": str(v) for k, v in result["params"].items()})
    with atomic_open(out) as f:
        f.write(yaml.safe_dump(result, sort_keys=False).encode())
    return result


def end_orphaned_runs(experiment: str, study: str) -> list[str]:
    """End KILLED the MLflow runs of `study` still RUNNING (local storages: their invocation is gone)."""
    from mlflow.tracking import MlflowClient

    from mdkat.tracking import server_errors, tracking_uri

    uri = tracking_uri()
    with server_errors(uri):
        client = MlflowClient(uri)
        found = client.get_experiment_by_name(experiment)
        if found is None:
            return []
        runs = client.search_runs(
            [found.experiment_id], f"tags.`optuna.study` = '{study}' and attributes.status = 'RUNNING'"
        )
        for run in runs:
            client.set_terminated(run.info.run_id, "KILLED")
    if runs:
        print(f"ended {len(runs)} MLflow run(s) of a dead invocation KILLED", file=sys.stderr)
    return [run.info.run_id for run in runs]


def _derived_seed(seed: int, worker: int, ordinal: int) -> int:
    # one seed per place in the study (and per worker: workers on several machines may start trials of one
    # place at once, and must not propose the same point)
    digest = hashlib.sha256(f"{seed}/{worker}/{ordinal}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _best(study, params: Params, name: str) -> dict[str, Any]:
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise MdkatError(f"study {name}: no trial completed (all pruned or failed); nothing to write")
    best = study.best_trial
    order = [t.number for t in counted(study)]
    return {
        "params": {k: float(v) for k, v in best.params.items()},
        "metric": f"valid_{params.tune.metric}",
        "direction": direction(params.tune.metric),
        "value": float(best.value),
        # its place among the counted trials: a retried trial takes the place of the one it retries
        "trial": order.index(best.number),
        "study_name": name,
        "n_trials": len(counted(study)),
    }
