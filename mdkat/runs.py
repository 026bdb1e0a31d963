"""The `train` and `evaluate` stages as tracked runs: training, evaluation and their MLflow record.

`train_run` creates one MLflow run (or, with `resume`, continues the run recorded in `mlflow_run.json`),
logs parameters, provenance tags and per-epoch values while `fit` trains, then the final validation
metrics and the artifacts, and registers the checkpoint as a pyfunc model. `evaluate_run` logs the test
metrics, predictions and figures into the same run, and on synthetic data the diagnostics of
`mdkat.diagnose` (metrics `diag.*`, artifact `evaluation/diagnostics.json`). A failure marks the run FAILED
(KILLED on Ctrl-C).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

from mdkat import distributed
from mdkat.config import Params, chosen_flat_dict, read_best
from mdkat.data import load_prepared
from mdkat.diagnose import diagnose_files, flat_diagnostics
from mdkat.errors import MdkatError
from mdkat.evaluation import evaluate
from mdkat.fingerprint import fingerprint, identity
from mdkat.io import atomic_open, write_json
from mdkat.plots import learning_curves
from mdkat.redact import redact
from mdkat.registry import CANDIDATE, register, set_alias
from mdkat.tracking import Tracker, flat_params, run_name, run_tags, what_tags
from mdkat.training import CHECKPOINT, ensure_same_run, fit, load_checkpoint

RUN_RECORD = "mlflow_run.json"
WORK_PREFIX = ".checkpoint-"  # + the run's fingerprint: a training in progress, next to its outputs


def _mtime(path: Path) -> float:
    return path.stat().st_mtime


def _abandon(work: Path) -> None:
    """Remove an unfinished run's folder, ending its MLflow run KILLED if it was left open."""
    record = work / RUN_RECORD
    if record.exists():
        try:
            tracker = Tracker.attach(record)
            if tracker.client.get_run(tracker.run_id).info.status == "RUNNING":
                tracker.finish("KILLED")
        except Exception as e:  # another store, or a run deleted meanwhile: the folder goes all the same
            print(f"could not end the MLflow run of {work}: {e}", file=sys.stderr)
    print(f"removing {work}: an unfinished run that is not continued", file=sys.stderr)
    shutil.rmtree(work, ignore_errors=True)


def _resolved_yaml(params: Params) -> str:
    nested: dict[str, Any] = {}
    for key, value in chosen_flat_dict(params).items():
        node = nested
        *sections, leaf = key.split(".")
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = redact(value)
    return yaml.safe_dump(nested, sort_keys=False)


def train_run(
    params: Params,
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    best: str | Path | None = None,
    resume: bool | None = None,
) -> dict[str, Any]:
    """Train with tracking (`_train_main`); under torchrun every rank trains, rank 0 alone writes and logs."""
    context = distributed.start(params.train.device)
    try:
        if context.is_main:
            return _train_main(params, data_dir, out_dir, best=best, resume=resume)
        return _train_other_rank(params, data_dir, out_dir)
    except Exception as e:
        if context.world > 1 and distributed.lost_contact(e):
            raise MdkatError(distributed.lost_contact_message(context, e)) from None
        raise
    finally:
        distributed.stop()


def _train_other_rank(params: Params, data_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """A rank > 0: the same fit, on its shards, resumed when rank 0 says so; writes nothing."""
    data = load_prepared(data_dir, splits=("train", "valid"))
    continuing, work = distributed.from_main(None)
    result = fit(params, data, out_dir, resume=continuing, progress=False, checkpoint_dir=work)
    return {
        "run_id": None,
        "best_epoch": result.best_epoch,
        "valid": result.best_valid,
        "seconds": result.seconds,
    }


def _train_main(
    params: Params,
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    best: str | Path | None = None,
    resume: bool | None = None,
) -> dict[str, Any]:
    """Train with tracking; write model.pt, history.csv, valid_metrics.json and mlflow_run.json.

    The checkpoint and the run record live in `<out>/.checkpoint-<fingerprint>/` while training, outside
    the stage's outputs (DVC deletes those before it re-runs a stage) and removed on success. `resume`
    None (the stage under `dvc repro`): continue from the checkpoint of this very configuration if a crash
    left one, else start afresh. True (`--resume`): the same, but a checkpoint of another configuration
    is an error listing what differs. False: start afresh. Checkpoints of other configurations are
    removed and their MLflow runs ended KILLED.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = load_prepared(data_dir, splits=("train", "valid"))
    work = out_dir / f"{WORK_PREFIX}{fingerprint(params, data.manifest_sha256)}"
    others = sorted(d for d in out_dir.glob(f"{WORK_PREFIX}*") if d != work)
    if resume and others and not (work / CHECKPOINT).exists():
        latest = max((d / CHECKPOINT for d in others if (d / CHECKPOINT).exists()), key=_mtime, default=None)
        if latest is not None:
            ensure_same_run(latest, load_checkpoint(latest), identity(params, data.manifest_sha256))
    for stale in others:
        _abandon(stale)
    if resume is False and work.exists():
        _abandon(work)
    continuing = (work / CHECKPOINT).exists() and (work / RUN_RECORD).exists()
    if continuing:
        print(f"continuing the interrupted run in {work}", file=sys.stderr)
        tracker = Tracker.attach(work / RUN_RECORD)
        tracker.reopen()
    else:
        tags = run_tags(data.manifest, data.manifest_sha256)
        if best is not None:
            tuned = read_best(best)
            tags.update(
                {
                    "tuned.file": str(best),
                    "tuned.study": str(tuned.get("study_name")),
                    "tuned.trial": str(tuned.get("trial")),
                }
            )
        tags.update(what_tags(params))
        tags["mlflow.note.content"] = (
            f"{params.model.name}, train seed {params.train.seed}, on {data.manifest.get('source')} "
            f"{data.manifest.get('dataset')} data ({data.manifest_sha256[:12]})"
        )
        tracker = Tracker.start(params.mlflow.experiment, run_name(params), flat_params(params), tags)
        tracker.log_datasets(data.manifest, data_dir)
        work.mkdir(parents=True, exist_ok=True)
        write_json(work / RUN_RECORD, tracker.record())
    write_json(out_dir / RUN_RECORD, tracker.record())
    distributed.from_main((continuing, str(work)))  # the other ranks resume with rank 0, or not at all

    def log_epoch(epoch: int, row: dict[str, float]) -> None:
        tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)

    with tracker.ending(), tracker.system_metrics(params.mlflow.system_metrics, resume=continuing):
        result = fit(params, data, out_dir, resume=continuing, on_epoch=log_epoch, checkpoint_dir=work)
        valid = {**result.best_valid, "best_epoch": result.best_epoch, "stopped_early": result.stopped_early}
        write_json(out_dir / "valid_metrics.json", valid)
        learning_curves(result.history, out_dir / "learning_curves.png", params.train.select_on)
        tracker.log_metrics(result.best_valid, prefix="best_valid_")
        tracker.log_metrics({"best_epoch": result.best_epoch, "train_seconds": result.seconds})
        with atomic_open(out_dir / "params.resolved.yaml") as f:
            f.write(_resolved_yaml(params).encode())
        manifest_copy = out_dir / "data_manifest.json"
        # the manifest records the data URLs, passwords included; the logged copy must not
        with atomic_open(manifest_copy) as f:
            f.write(redact((Path(data_dir) / "manifest.json").read_text()).encode())
        tracker.log_artifacts(
            [
                out_dir / n
                for n in (
                    "model.pt",
                    "history.csv",
                    "valid_metrics.json",
                    "learning_curves.png",
                    "params.resolved.yaml",
                )
            ]
            + [manifest_copy]
        )
        from mdkat.serving import log_model

        model_uri = log_model(tracker.uri, tracker.run_id, out_dir / "model.pt")
        version = register(
            tracker.uri,
            params.mlflow.registered_model,
            model_uri,
            tracker.run_id,
            {**what_tags(params), "data.manifest_sha256": data.manifest_sha256},
        )
        write_json(out_dir / RUN_RECORD, {**tracker.record(), "model_version": version})
    shutil.rmtree(work)  # done: nothing to resume
    return {
        "run_id": tracker.run_id,
        "best_epoch": result.best_epoch,
        "valid": result.best_valid,
        "seconds": result.seconds,
    }


def evaluate_run(
    params: Params,
    data_dir: str | Path,
    model_file: str | Path,
    metrics_file: str | Path,
    plots_dir: str | Path,
) -> dict[str, Any]:
    """Evaluate on the test split and log it into the training run recorded next to `model_file`."""
    record = Path(model_file).parent / RUN_RECORD
    tracker = Tracker.attach(record) if record.exists() else None
    if tracker is not None and not tracker.exists():
        # a model pulled from a DVC remote: its training run lives in the store of the machine that trained it
        print(
            f"{record}: run {tracker.run_id} is not in this tracking store ({redact(tracker.uri)}): the "
            "model was trained elsewhere (pulled from a DVC remote?); test metrics are written, not logged",
            file=sys.stderr,
        )
        tracker = None
    result = evaluate(params, data_dir, model_file, metrics_file, plots_dir)
    diagnostics = None
    if result.manifest.get("source") == "synthetic":  # the truth is known: measure the modules against it
        diagnostics = diagnose_files(params, data_dir, model_file)
    if tracker is not None:
        version = json.loads(record.read_text()).get("model_version")
        if version is not None:  # the version this evaluation vouches for
            set_alias(tracker.uri, params.mlflow.registered_model, CANDIDATE, version)
        tracker.log_metrics(result.report["test"], prefix="test_")
        if "fraction_of_oracle" in result.report:
            tracker.log_metrics(result.report["fraction_of_oracle"], prefix="test_fraction_of_oracle_")
        tracker.log_artifacts(result.files, "evaluation")
        if diagnostics is not None:
            tracker.log_metrics(flat_diagnostics(diagnostics), prefix="diag.")
            tracker.log_dict(diagnostics, "evaluation/diagnostics.json")
    return {
        "test": result.report["test"],
        "diagnostics": diagnostics,
        "run_id": tracker.run_id if tracker else None,
    }
