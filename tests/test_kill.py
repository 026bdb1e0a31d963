"""Stages killed with SIGKILL at a chosen point (no cleanup runs), then run again: the outputs equal an
uninterrupted run's and nothing is left behind. (The tuning stage's kill test is in `test_tuning.py`, the
kill under `dvc repro` itself in `test_dvc.py`.)

`killed(code, *args)` runs `code` in a fresh interpreter that kills itself where the code says; the code
patches the one function whose call marks the point (a split written, an epoch ended).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mdkat.data.prepare import prepare
from mdkat.runs import train_run
from tests.conftest import ROOT, TINY, tiny_params

PRELUDE = """
import os, signal, sys
from mdkat.checks import load_checked
params = load_checked(sys.argv[1], sys.argv[2].split("\\x1f"))
def die():
    os.kill(os.getpid(), signal.SIGKILL)
"""

# prepare, killed after the first split file is written into its temporary folder
PREPARE = (
    PRELUDE
    + """
import mdkat.data.prepared as prepared
from mdkat.data.prepare import prepare
write = prepared._write_npz
def write_then_die(path, arrays):
    write(path, arrays)
    die()
prepared._write_npz = write_then_die
prepare(params.data, sys.argv[3])
"""
)

# the train stage, killed after epoch 2 (its checkpoint saved, its MLflow run RUNNING)
TRAIN = (
    PRELUDE
    + """
import mdkat.runs
from mdkat.training import fit
def dying_fit(*args, on_epoch, **kwargs):
    def epoch(done, row):
        on_epoch(done, row)
        if done == 2:
            die()
    return fit(*args, on_epoch=epoch, **kwargs)
mdkat.runs.fit = dying_fit
mdkat.runs.train_run(params, sys.argv[3], sys.argv[4])
"""
)


def killed(code: str, overrides: list[str], *args: Path, cwd: Path) -> None:
    """Run `code` with params.yaml + `overrides` and `args`; it must end by SIGKILL."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", code, str(ROOT / "params.yaml"), "\x1f".join(overrides), *map(str, args)]
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_prepare_killed_mid_write_leaves_the_old_output_and_the_rerun_equals_an_uninterrupted_one(tmp_path):
    params = tiny_params()
    prepare(params.data, tmp_path / "whole")
    out = tmp_path / "cut"
    older = tiny_params("data.seed=7")
    prepare(older.data, out)  # what a previous run left: it must survive the crash intact
    before = _files(out)
    killed(PREPARE, TINY, out, cwd=tmp_path)
    assert _files(out) == before
    debris = [p for p in tmp_path.iterdir() if p.name.startswith(".cut.")]
    assert len(debris) == 1 and (debris[0] / "train.npz").exists(), "SIGKILL left its half-made folder"
    prepare(params.data, out)
    assert _files(out) == _files(tmp_path / "whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut", "whole"]


@pytest.fixture
def tracked_root(tmp_path, monkeypatch, empty_store):
    from tests.conftest import use_store

    return use_store(tmp_path, monkeypatch, empty_store)


def test_train_killed_after_an_epoch_continues_in_its_run_to_an_uninterrupted_runs_result(
    tmp_path, tracked_root
):
    overrides = [*TINY, "train.epochs=4"]
    params = tiny_params("train.epochs=4")
    data = tmp_path / "prepared"
    prepare(params.data, data)
    whole = train_run(params, data, tmp_path / "whole")

    out = tmp_path / "models"
    killed(TRAIN, overrides, data, out, cwd=tmp_path)
    (work,) = out.glob(".checkpoint-*")
    dead = json.loads((out / "mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(tracked_root)
    assert client.get_run(dead).info.status == "RUNNING", "SIGKILL leaves the run open"
    for name in ("mlflow_run.json", "history.csv"):  # what `dvc repro` deletes before it runs the stage
        (out / name).unlink(missing_ok=True)

    again = train_run(params, data, out)
    assert again["run_id"] == dead and client.get_run(dead).info.status == "FINISHED"
    assert again["valid"] == whole["valid"] and again["best_epoch"] == whole["best_epoch"]
    assert (out / "history.csv").read_text().count("\n") == 5
    assert not work.exists() and not list(out.glob(".checkpoint-*"))
