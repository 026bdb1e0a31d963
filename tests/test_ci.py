"""CI regression of metrics: the verdicts against hand-made cases, and a real deliberate regression."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from mdkat import ci
from mdkat.config import load_params
from mdkat.data.prepare import prepare
from mdkat.data.prepared import SPLITS, read_manifest, read_split, write_prepared
from mdkat.errors import MdkatError
from mdkat.metrics import BY_NAME, METRIC_NAMES
from mdkat.models.amsa import AdaptiveMaskedSelfAttention
from tests.conftest import ROOT

BASE = {"mae": 1.0, "corr": 0.5, "acc7": 0.3, "acc5": 0.3, "acc2_has0": 0.7, "f1_has0": 0.7, "acc2_non0": 0.7,
        "f1_non0": 0.7}  # fmt: skip


def _verdicts(now: dict[str, float]) -> dict[str, str]:
    return {r["metric"]: r["verdict"] for r in ci.compare(BASE, {**BASE, **now})}


def test_every_metric_has_a_positive_tolerance():
    assert sorted(BASE) == sorted(METRIC_NAMES)
    assert all(BY_NAME[m].ci_tolerance > 0 for m in METRIC_NAMES)


def test_verdicts_follow_each_metrics_direction_and_tolerance():
    mae, corr = BY_NAME["mae"].ci_tolerance, BY_NAME["corr"].ci_tolerance
    assert _verdicts({"mae": BASE["mae"] + 2 * mae})["mae"] == "REGRESSION"  # MAE: higher is worse
    assert _verdicts({"mae": BASE["mae"] + mae / 2})["mae"] == "ok"
    assert _verdicts({"mae": BASE["mae"] - 2 * mae})["mae"] == "better"
    assert _verdicts({"corr": BASE["corr"] - 2 * corr})["corr"] == "REGRESSION"  # lower is worse
    assert _verdicts({"corr": BASE["corr"] + 2 * corr})["corr"] == "better"
    assert _verdicts({"acc2_non0": math.nan})["acc2_non0"] == "REGRESSION"  # undefined is never fine
    assert set(_verdicts({}).values()) == {"ok"}


def _fake_run(path: Path, metrics: dict[str, float]) -> Path:
    (path / "metrics").mkdir(parents=True)
    (path / "metrics" / "test.json").write_text(json.dumps({"test": metrics}))
    return path


@pytest.fixture
def project(tmp_path):
    """A parameter file with a baseline of BASE, as `mdkat.ci` reads them."""
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    overrides = list(load_params(tmp_path / "params.yaml").ci.overrides)
    (tmp_path / "ci").mkdir()
    (tmp_path / "ci" / "baseline.json").write_text(json.dumps({"overrides": overrides, "test": BASE}))
    return tmp_path


def test_check_fails_on_regression_and_on_unequal_repeats(project, capsys):
    params_file = project / "params.yaml"
    same = _fake_run(project / "a", BASE)
    assert ci.check(same, params_file, repeat_dir=_fake_run(project / "b", BASE))
    out = capsys.readouterr().out
    assert "identical" in out and "passed" in out

    nudged = _fake_run(project / "c", {**BASE, "corr": BASE["corr"] + 1e-12})
    assert not ci.check(same, params_file, repeat_dir=nudged)  # within tolerance, but not identical
    assert "differs in: corr" in capsys.readouterr().out

    worse = _fake_run(project / "d", {**BASE, "mae": BASE["mae"] + 0.5})
    assert not ci.check(worse, params_file)
    out = capsys.readouterr().out
    assert "FAILED: mae" in out
    assert [line.split()[-1] for line in out.splitlines() if line.startswith("mae ")] == ["REGRESSION"]


def test_a_baseline_of_another_profile_is_refused(project):
    params_file = project / "params.yaml"
    (project / "ci" / "baseline.json").write_text(json.dumps({"overrides": ["train.epochs=2"], "test": BASE}))
    with pytest.raises(MdkatError, match="baseline was made for the CI profile"):
        ci.check(_fake_run(project / "a", BASE), params_file)
    # and a baseline only comes from a run of the profile itself, not from a variant of it
    run = _fake_run(project / "b", BASE)
    (run / ci.RUN_RECORD).write_text(json.dumps({"overrides": ["train.epochs=1"]}))
    with pytest.raises(MdkatError, match="not ci.overrides"):
        ci.write_baseline(run, params_file)


def test_profile_parameters_apply_the_overrides_then_the_extra_ones(tmp_path):
    text = ci.profile_params(ROOT / "params.yaml", ["train.epochs=1"])
    (tmp_path / "params.yaml").write_text(text)
    profile = load_params(tmp_path / "params.yaml")
    expected = dict(item.split("=", 1) for item in load_params(ROOT / "params.yaml").ci.overrides)
    assert profile.data.synthetic.n_train == yaml.safe_load(expected["data.synthetic.n_train"])
    assert profile.data.seq_len == yaml.safe_load(expected["data.seq_len"])
    assert profile.train.epochs == 1  # the extra override wins over the profile's


def test_project_files_are_the_tracked_and_untracked_files_not_the_ignored_ones():
    files = {p.as_posix() for p in ci.project_files(ROOT)}
    assert {"params.yaml", "dvc.yaml", "mdkat/ci.py", ".dvc/config"} <= files
    assert not any(f.startswith((".venv/", "data/")) or f == "mlflow.db" for f in files)


def test_training_for_one_epoch_fails_the_check(tmp_path, capsys):
    # the real stages, as CI runs them, with a change that tuning does not override
    run_dir = tmp_path / "regressed"
    ci.run(run_dir, ["train.epochs=1"], root=ROOT)
    assert (run_dir / "metrics" / "test.json").exists() and (run_dir / "mlflow.db").exists()
    assert (ROOT / "dvc.lock").read_text() != (run_dir / "dvc.lock").read_text()  # the copy's lock, not ours
    capsys.readouterr()
    assert not ci.check(run_dir, ROOT / "params.yaml")
    out = capsys.readouterr().out
    assert "REGRESSION" in out and "FAILED" in out


# --- the gate catches what matters: deliberate breakages, each through train + evaluate only


@pytest.fixture(scope="module")
def profile_data(tmp_path_factory):
    """(the CI profile's parameters, its prepared data), as the profile's prepare stage writes them."""
    params = ci.profile(ROOT / "params.yaml")
    folder = tmp_path_factory.mktemp("profile")
    prepare(params.data, folder / "prepared")
    return params, folder / "prepared"


def _edited_copy(data_dir: Path, out: Path, edit) -> Path:
    """The prepared data with `edit(split, arrays)` applied to every split, written as prepare would."""
    manifest = read_manifest(data_dir)
    splits = {split: read_split(data_dir, split, manifest) for split in SPLITS}
    for split, arrays in splits.items():
        edit(split, arrays)
    kept = ("source", "dataset", "aligned", "seed", "oracle", "params")
    write_prepared(out, splits, {k: manifest[k] for k in kept if k in manifest})
    return out


def _zero_text(split, arrays):
    arrays["text"][...] = 0.0


def _halve_training_labels(split, arrays):
    if split != "test":  # the model learns and selects on halved labels, and is tested on the true ones
        arrays["label"] *= 0.5


def _regressions(params, data_dir, work) -> list[str]:
    baseline = ci.read_baseline(ROOT / params.ci.baseline, params)
    rows = ci.compare(baseline, ci.train_and_test(params, data_dir, work))
    return [r["metric"] for r in rows if r["verdict"] == "REGRESSION"]


def test_the_profile_trained_and_tested_in_process_passes_the_check(profile_data, tmp_path):
    # the control for the breakages below: the same path, nothing broken, matches the committed baseline
    params, data_dir = profile_data
    assert _regressions(params, data_dir, tmp_path) == []


@pytest.mark.parametrize(
    "edit", [_zero_text, _halve_training_labels], ids=["text features zeroed", "labels scaled by 0.5"]
)
def test_a_broken_copy_of_the_data_fails_the_check(profile_data, tmp_path, edit):
    params, data_dir = profile_data
    broken = _edited_copy(data_dir, tmp_path / "broken", edit)
    assert _regressions(params, broken, tmp_path / "work")


def test_amsa_scores_frozen_at_a_constant_fail_the_check(profile_data, tmp_path, monkeypatch):
    params, data_dir = profile_data

    def constant(self, projected):
        return torch.zeros(projected.shape[:2], device=projected.device)  # every step equally important

    monkeypatch.setattr(AdaptiveMaskedSelfAttention, "logit", constant)
    assert _regressions(params, data_dir, tmp_path)
