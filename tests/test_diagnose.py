"""Diagnostics against the generator's truth: hand-built AUC and probe cases, the truth check, the stage."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from mdkat.cli import main
from mdkat.data import load_prepared
from mdkat.diagnose import DiagnosticsError, cue_auc, diagnose, flat_diagnostics, probe_r2, regenerate_truth
from mdkat.training import fit
from tests.conftest import prepared, tiny_params

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_perfect_importance_has_auc_1_and_padding_is_not_counted():
    cue = np.array([[1, 0, 0, 0], [0, 1, 1, 0]], dtype=bool)
    importance = np.array([[0.9, 0.1, 0.2, 9.0], [0.3, 0.8, 0.7, 0.0]])  # 9.0 on sample 0's padding
    lengths = np.array([3, 4])
    assert cue_auc(importance, cue, lengths) == 1.0
    # counted over the padding, the 9.0 would be a non-cue step above every cue
    assert cue_auc(importance, cue, np.array([4, 4])) < 1.0
    assert cue_auc(-importance, cue, lengths) == 0.0  # exactly inverted


def test_a_random_importance_has_auc_one_half():
    rng = np.random.default_rng(0)
    cue = rng.random((400, 50)) < 0.3
    lengths = rng.integers(10, 51, 400)
    assert cue_auc(rng.random((400, 50)), cue, lengths) == pytest.approx(0.5, abs=0.01)
    # hand count: cues at importance 2 and 0, non-cues at 1 and 3: of the 4 (cue, non-cue) pairs the cue
    # ranks higher in one (2 > 1)
    assert cue_auc(np.array([[2.0, 1.0, 0.0, 3.0]]), np.array([[1, 0, 1, 0]], bool), np.array([4])) == 0.25


def test_a_probe_recovers_a_planted_factor_and_nothing_from_noise():
    rng = np.random.default_rng(1)
    z_train, z_test = rng.standard_normal(600), rng.standard_normal(400)
    direction = rng.standard_normal(16)

    def features(z):
        return z[:, None] * direction + 0.1 * rng.standard_normal((len(z), 16))

    assert probe_r2(features(z_train), z_train, features(z_test), z_test) > 0.98
    noise_train, noise_test = rng.standard_normal((600, 16)), rng.standard_normal((400, 16))
    assert probe_r2(noise_train, z_train, noise_test, z_test) < 0.05


def test_flat_diagnostics_keep_numbers_and_leave_out_nulls():
    result = {"amsa_cue_auc": None, "probe_r2": {"independent": None, "specific": {"text": {"own": 0.5}}}}
    assert flat_diagnostics(result) == {"probe_r2.specific.text.own": 0.5}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    params = tiny_params()
    return params, prepared(params, tmp_path_factory.mktemp("diag"))


def test_the_truth_must_regenerate_the_prepared_data(tiny, tmp_path):
    params, data_dir = tiny
    truth = regenerate_truth(load_prepared(data_dir), "here")
    assert truth["test"].cue["text"].shape == load_prepared(data_dir).test.text.shape[:2]
    # data prepared before `data.tokenizer` existed regenerate as before
    older = tmp_path / "older"
    shutil.copytree(data_dir, older)
    manifest = json.loads((older / "manifest.json").read_text())
    del manifest["params"]["data.tokenizer"]
    (older / "manifest.json").write_text(json.dumps(manifest))
    np.testing.assert_array_equal(
        regenerate_truth(load_prepared(older), "older")["test"].cue["text"], truth["test"].cue["text"]
    )
    # a manifest whose parameters no longer produce these samples: refused, not measured
    copy = tmp_path / "copy"
    shutil.copytree(data_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["params"]["data.seed"] += 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DiagnosticsError, match="does not give the prepared train split's labels"):
        regenerate_truth(load_prepared(copy), "copy")
    manifest["source"] = "mmsa"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DiagnosticsError, match="need synthetic data.*'mmsa'"):
        regenerate_truth(load_prepared(copy), "copy")


@pytest.mark.parametrize(
    ("overrides", "nulls"),
    [
        ((), set()),
        (("model.mdkat.use_amsa=false",), {"amsa_cue_auc"}),
        (("model.mdkat.use_kt=false",), {"kt_error"}),
        (("model.mdkat.use_decoupling=false",), {"independent"}),
        (("model.name=late_fusion",), {"amsa_cue_auc", "kt_error", "independent"}),
    ],
    ids=["mdkat", "no_amsa", "no_kt", "no_decoupling", "late_fusion"],
)
def test_every_measure_is_there_unless_its_module_is_off(tiny, tmp_path, overrides, nulls):
    base, data_dir = tiny
    params = tiny_params("train.epochs=1", *overrides)
    data = load_prepared(data_dir)
    model = fit(params, data, tmp_path, progress=False).model
    result = diagnose(model, data, regenerate_truth(data, "tiny"), 64)
    found = {k for k in ("amsa_cue_auc", "kt_error") if result[k] is None}
    found |= {k for k, v in result["probe_r2"].items() if v is None}
    assert found == nulls
    if result["amsa_cue_auc"] is not None:
        assert set(result["amsa_cue_auc"]) == {"text", "audio", "vision"}
        assert all(0.0 <= v <= 1.0 for v in result["amsa_cue_auc"].values())
    if result["kt_error"] is not None:
        assert all(v > 0 for v in result["kt_error"].values())
    for kind in ("independent", "specific"):
        if result["probe_r2"][kind] is not None:
            assert {k: set(v) for k, v in result["probe_r2"][kind].items()} == {
                m: {"shared", "own"} for m in ("text", "audio", "vision")
            }


def test_the_stage_writes_json_and_refuses_real_data(tiny, tmp_path, capsys):
    params, data_dir = tiny
    fit(params, load_prepared(data_dir), tmp_path / "model", progress=False)
    args = ["--data", str(data_dir), "--model", str(tmp_path / "model" / "model.pt")]
    overrides = [a for item in ("model.mdkat.width=16", "model.mdkat.heads=2") for a in ("-S", item)]
    assert main(["diagnose", *args, "--out", str(tmp_path / "d.json"), *overrides]) == 0
    written = json.loads((tmp_path / "d.json").read_text())
    assert set(written) == {"amsa_cue_auc", "probe_r2", "kt_error"}
    copy = tmp_path / "copy"
    shutil.copytree(data_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "source": "mmsa"}))
    capsys.readouterr()
    assert main(["diagnose", "--data", str(copy), *args[2:], "--out", str(tmp_path / "e.json")]) == 1
    assert "need synthetic data" in capsys.readouterr().err
    assert not (tmp_path / "e.json").exists()
