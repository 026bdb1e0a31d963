"""The synthetic data's bytes do not depend on the machine: BLAS kernel, thread count, numpy's SIMD path.

Each setting needs its own process (OpenBLAS and numpy read them when loaded). One run keeps the machine's
defaults; every other run forces one OpenBLAS kernel this CPU can execute, together with a thread count and
a level of numpy's SIMD dispatch, so that each kernel, both thread counts and every dispatch level occur.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__

from tests.conftest import ROOT

# OpenBLAS kernels by name, with the CPU features (numpy's names) each needs, and the names OpenBLAS may
# report for it: builds alias kernels they do not carry to the nearest one they do (Prescott's is also
# called Katmai, Zen uses Haswell's).
KERNELS = {
    "Prescott": (("SSE3",), {"Prescott", "Katmai"}),
    "Core2": (("SSSE3",), {"Core2", "Prescott", "Katmai"}),
    "Nehalem": (("SSE42",), {"Nehalem"}),
    "Sandybridge": (("AVX",), {"Sandybridge"}),
    "Haswell": (("AVX2", "FMA3"), {"Haswell"}),
    "Zen": (("AVX2", "FMA3"), {"Zen", "Haswell"}),
    "SkylakeX": (("AVX512_SKX",), {"SkylakeX"}),
}
SETTINGS = ("OPENBLAS_CORETYPE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "NPY_DISABLE_CPU_FEATURES")

CHILD = """
import hashlib, json, sys, tempfile
from pathlib import Path
import numpy as np
import threadpoolctl
from numpy._core._multiarray_umath import __cpu_features__
from mdkat.data.prepare import prepare
from tests.conftest import small_data

out = Path(tempfile.mkdtemp()) / "prepared"
manifest = prepare(small_data(), out)
arrays = {}
for split in ("train", "valid", "test"):
    with np.load(out / f"{split}.npz") as npz:
        for key in npz.files:
            arrays[f"{split}/{key}"] = hashlib.sha256(npz[key].tobytes()).hexdigest()
files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())}
blas = [
    i for i in threadpoolctl.threadpool_info() if i["internal_api"] == "openblas" and "numpy" in i["filepath"]
]
json.dump({
    "arrays": arrays,
    "files": files,
    "oracle": json.dumps(manifest["oracle"], sort_keys=True),
    "architecture": blas[0]["architecture"] if blas else None,
    "threads": blas[0]["num_threads"] if blas else None,
    "simd_off": [f for f in sys.argv[1].split() if not __cpu_features__[f]],
}, sys.stdout)
"""


def _numpy_openblas_is_dynamic() -> bool:
    blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    return blas.get("name", "").startswith(("openblas", "scipy-openblas")) and "DYNAMIC_ARCH" in blas.get(
        "openblas configuration", ""
    )


def _settings() -> list[dict[str, str]]:
    """The environments of all runs but the default one."""
    kernels = [
        name
        for name, (needs, _) in KERNELS.items()
        if _numpy_openblas_is_dynamic() and all(__cpu_features__.get(f) for f in needs)
    ]
    # numpy refuses to disable its baseline; its dispatch targets come in ascending order, and disabling
    # the top ones makes it fall back to the next lower target, down to the baseline
    targets = [t for t in __cpu_dispatch__ if __cpu_features__.get(t)]
    levels = [" ".join(targets[i:]) for i in range(len(targets) + 1)]
    # OpenBLAS uses no more threads than the process may run on
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = [n for n in (1, 2) if n <= cpus]
    settings = []
    for i in range(max(len(kernels), len(levels), len(threads))):
        n = str(threads[i % len(threads)])
        env = {"OPENBLAS_NUM_THREADS": n, "OMP_NUM_THREADS": n}
        if kernels:
            env["OPENBLAS_CORETYPE"] = kernels[i % len(kernels)]
        env["NPY_DISABLE_CPU_FEATURES"] = levels[i % len(levels)]
        settings.append(env)
    return settings


def _generate(setting: dict[str, str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(setting)
    disabled = setting.get("NPY_DISABLE_CPU_FEATURES", "")
    result = subprocess.run(
        [sys.executable, "-c", CHILD, disabled], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, (setting, result.stderr[-3000:])
    out = json.loads(result.stdout)
    # the setting must really have taken effect, or the comparison proves nothing
    assert out["simd_off"] == disabled.split(), (setting, out["simd_off"])
    if "OPENBLAS_NUM_THREADS" in setting and out["threads"] is not None:
        assert out["threads"] == int(setting["OPENBLAS_NUM_THREADS"]), (setting, out["threads"])
    if "OPENBLAS_CORETYPE" in setting:
        assert out["architecture"] in KERNELS[setting["OPENBLAS_CORETYPE"]][1], (setting, out["architecture"])
    return out


def test_same_bytes_under_every_kernel_thread_count_and_simd_level():
    reference = _generate({})
    differences = []  # all of them, not just the first: which settings differ tells where to look
    for setting in _settings():
        out = _generate(setting)
        differ = [k for k in reference["arrays"] if out["arrays"].get(k) != reference["arrays"][k]]
        differ += ["oracle"] if out["oracle"] != reference["oracle"] else []
        differ += [name for name in reference["files"] if out["files"].get(name) != reference["files"][name]]
        if differ:
            differences.append(f"{setting} ({out['architecture']}): {', '.join(differ)}")
    assert not differences, "output differs from the default run's under\n" + "\n".join(differences)
