"""dvc.yaml against the code: every module a stage imports is one of its dependencies."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

# what each stage's command runs: the stage script's `mdkat <stage>` and the modules it loads lazily
ENTRY_MODULES = {
    "prepare": ["mdkat.cli", "mdkat.data.prepare"],
    "tune": ["mdkat.cli", "mdkat.tuning"],
    "train": ["mdkat.cli", "mdkat.runs", "mdkat.serving", "mdkat.pyfunc_model"],
    "evaluate": ["mdkat.cli", "mdkat.runs"],
}


def _loaded_files(modules: list[str]) -> set[str]:
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(json.dumps([m.__file__ for n, m in sys.modules.items() if n.split('.')[0] == 'mdkat']))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return {Path(f).resolve().relative_to(ROOT).as_posix() for f in json.loads(out.stdout)}


@pytest.mark.parametrize("stage", sorted(ENTRY_MODULES))
def test_stage_dependencies_cover_the_code_it_runs(stage):
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    deps = [d for d in spec["deps"] if d.startswith("mdkat")]
    missing = [
        f
        for f in sorted(_loaded_files(ENTRY_MODULES[stage]))
        if not any(f == d or f.startswith(d + "/") for d in deps)
    ]
    assert not missing, f"dvc.yaml stage {stage!r} does not depend on {missing}"
    assert f"stages/{stage}.py" in spec["deps"]
