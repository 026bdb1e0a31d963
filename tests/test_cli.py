"""The prepare stage as DVC runs it: a subprocess with --params and -S overrides."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mdkat.data import DataError
from mdkat.data.prepare import prepare

SMALL = ["-S", "data.synthetic.n_train=12", "-S", "data.synthetic.n_valid=4", "-S", "data.synthetic.n_test=6"]


def _run(root, *args):
    return subprocess.run(
        [sys.executable, str(root / "stages" / "prepare.py"), *args], cwd=root, capture_output=True, text=True
    )


def test_prepare_stage_with_overrides(root, tmp_path):
    out = tmp_path / "prepared"
    result = _run(root, "--out", str(out), *SMALL, "-S", "data.synthetic.aligned=false")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"train": 12, "valid": 4, "test": 6}
    assert manifest["seq_len"] == {"text": 50, "audio": 375, "vision": 500}
    assert manifest["params"]["data.synthetic.aligned"] is False
    assert "oracle test Non0 Acc-2" in result.stderr


def test_bad_override_is_one_clear_line_and_no_output(root, tmp_path):
    out = tmp_path / "prepared"
    result = _run(root, "--out", str(out), "-S", "data.synthetic.n_train=many")
    assert result.returncode == 1
    assert "error: " in result.stderr and "'data.synthetic.n_train' expected int" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_params_file_errors_name_the_file(root, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((root / "params.yaml").read_text().replace("seed: 1111", "sede: 1111"))
    result = _run(root, "--out", str(tmp_path / "o"), "--params", str(params))
    assert result.returncode == 1
    assert f"{params}: unknown key 'data.sede'" in result.stderr


def test_real_source_failure_is_an_error_not_a_fallback(root, tmp_path):
    out = tmp_path / "prepared"
    missing = tmp_path / "none.pkl"
    result = _run(root, "--out", str(out), "-S", "data.source=mmsa", "-S", f"data.path={missing}")
    assert result.returncode == 1
    assert "none.pkl" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def test_console_script_help(root):
    result = subprocess.run(
        [sys.executable, "-c", "from mdkat.cli import main; main(['prepare', '--help'])"],
        cwd=root,
        capture_output=True,
        text=True,
    )
    assert "--out" in result.stdout and "-S KEY=VALUE" in result.stdout


def test_an_unknown_data_source_is_refused_before_any_work(root, tmp_path):
    out = tmp_path / "prepared"
    result = _run(root, "--out", str(out), *SMALL, "-S", "data.source=cmu_sdk")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    expected = "'data.source' expected one of ['synthetic', 'mmsa', 'cmu-sdk'], got 'cmu_sdk'"
    assert expected in result.stderr and "(set by -S data.source=cmu_sdk)" in result.stderr
    assert not out.exists()


def test_prepare_never_falls_through_to_another_source(tmp_path):
    from tests.conftest import small_data

    with pytest.raises(DataError, match="expected one of .*, got 'cmu_sdk'"):
        prepare(small_data(source="cmu_sdk"), tmp_path / "prepared")  # no check_params before it
    assert not (tmp_path / "prepared").exists()
