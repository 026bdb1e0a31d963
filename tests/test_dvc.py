"""The pipeline through DVC itself, in a copy of the project on the tiny problem: `dvc repro` after the train
stage was killed continues it, and a fresh clone pulls the results from a DVC remote instead of training.

One test, because each step needs the one before (a full `dvc repro` costs about a minute).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mdkat import ci
from mdkat.config import load_params
from mdkat.errors import MdkatError
from mdkat.runs import train_run
from tests.conftest import TINY

# installed through PYTHONPATH, so that the train stage that `dvc repro` starts kills itself after an epoch
# (its checkpoint saved): the same patch as test_kill.TRAIN, in the stage's own process
DYING_TRAIN_STAGE = """
import os, signal
if os.environ.get("DIE_AFTER_EPOCH"):
    import mdkat.runs
    from mdkat.training import fit
    def dying_fit(*args, on_epoch, **kwargs):
        def epoch(done, row):
            on_epoch(done, row)
            if done == int(os.environ["DIE_AFTER_EPOCH"]):
                os.kill(os.getpid(), signal.SIGKILL)
        return fit(*args, on_epoch=epoch, **kwargs)
    mdkat.runs.fit = dying_fit
"""

# what a colleague's clone gets from the remote rather than from git (dvc.yaml: cached outputs)
PULLED = [
    "data/prepared/train.npz",
    "models/model.pt",
    "models/mlflow_run.json",
    "models/params.resolved.yaml",
    "models/data_manifest.json",
]


def _run(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(args)}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


def test_dvc_repro_continues_a_killed_train_stage_and_a_fresh_clone_pulls_the_results(tmp_path, monkeypatch):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(DYING_TRAIN_STAGE)
    monkeypatch.setenv("PYTHONPATH", str(hook))
    monkeypatch.setenv("DIE_AFTER_EPOCH", "2")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    project = tmp_path / "project"
    with pytest.raises(MdkatError, match="dvc repro of the CI profile failed"):
        ci.run(project, [*TINY, "train.epochs=4", "tune.n_trials=1", "tune.epochs=1"])
    (checkpoint,) = (project / "models").glob(".checkpoint-*")  # DVC deleted the stage's outputs, not this
    assert not (project / "models" / "valid_metrics.json").exists()

    # 1. the next `dvc repro` continues the killed stage to the uninterrupted run's result
    monkeypatch.delenv("DIE_AFTER_EPOCH")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)  # the copy's own store
    dvc = (sys.executable, "-m", "dvc")
    again = _run(*dvc, "repro", cwd=project, env=env)
    assert "resuming after epoch 2" in again.stderr
    assert not checkpoint.exists()
    assert (project / "models" / "history.csv").read_text().count("\n") == 5  # header + epochs 1-4, once
    assert "up to date" in _run(*dvc, "status", cwd=project, env=env).stdout

    with monkeypatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'whole.db'}")
        mp.chdir(project)
        params = load_params(project / "params.yaml", best=project / "tuning" / "best.yaml")
        whole = train_run(params, project / "data" / "prepared", tmp_path / "whole")
    resumed = json.loads((project / "models" / "valid_metrics.json").read_text())
    assert resumed == {**whole["valid"], "best_epoch": whole["best_epoch"], "stopped_early": False}

    # 2. a local-folder remote: push, then a fresh clone pulls instead of training
    (project / ".dvc" / "config.local").unlink()  # the copy becomes a git repository below: no no_scm
    git_env = {
        **env,
        **{
            f"GIT_{who}_{what}": value
            for who in ("AUTHOR", "COMMITTER")
            for what, value in (("NAME", "test"), ("EMAIL", "test@localhost"))
        },
    }
    _run("git", "init", "-q", cwd=project, env=git_env)
    _run(*dvc, "remote", "add", "-d", "shared", str(tmp_path / "remote"), cwd=project, env=git_env)
    _run(*dvc, "commit", "--force", cwd=project, env=git_env)  # now with git: lists the outputs in .gitignore
    _run("git", "add", "-A", cwd=project, env=git_env)
    _run("git", "commit", "-qm", "trained", cwd=project, env=git_env)
    tracked = _run("git", "ls-files", cwd=project, env=git_env).stdout.split()
    assert not set(PULLED) & set(tracked), "cached outputs travel through the remote, not git"
    _run(*dvc, "push", cwd=project, env=git_env)

    clone = tmp_path / "clone"
    _run("git", "clone", "-q", str(project), str(clone), cwd=tmp_path, env=git_env)
    assert not (clone / "models" / "model.pt").exists()
    _run(*dvc, "pull", cwd=clone, env=git_env)
    for rel in PULLED:
        assert (clone / rel).read_bytes() == (project / rel).read_bytes(), rel
    assert "up to date" in _run(*dvc, "status", cwd=clone, env=git_env).stdout  # nothing to train
    assert _run(*dvc, "metrics", "diff", cwd=clone, env=git_env).stdout.strip() == ""
