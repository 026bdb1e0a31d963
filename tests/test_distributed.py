"""The train stage under `torchrun`: two CPU processes on gloo over loopback, started by the tests.

The stage runs as users run it (`python -m torch.distributed.run --standalone --nproc_per_node 2
stages/train.py ...`); a `sitecustomize` on PYTHONPATH (HOOK) lets each rank save its final state, or
makes rank 0 exit after epoch 2, or rank 1 die or hang in epoch 2's validation.

Two ranks against one process, same global batch: dropout is off (each rank draws its own masks for its
half of a batch, one process draws one mask for all of it), so what is left are float differences: the
gradient is the mean of two half-batch means instead of one mean, reduced in another order, and the loss
terms that normalise over their batch (decoupling) see halves. TOLERANCE is relative; measured: about 1e-4.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from mdkat.data import load_prepared
from mdkat.metrics import regression_metrics
from mdkat.training import fit, model_from_file, predict
from tests.conftest import ROOT, TINY, prepared, tiny_params

TOLERANCE = 1e-3
COMPARED = ("train_loss", "train_task", "valid_loss", "valid_mae")

NO_DROPOUT = {
    "mdkat": [
        "model.mdkat.dropout=0.0",
        *(f"model.mdkat.input_dropout.{m}=0.0" for m in ("text", "audio", "vision")),
    ],
    "self_mm": [
        "model.self_mm.text_dropout=0.0",
        "model.self_mm.fusion_dropout=0.0",
        *(f"model.self_mm.post_dropout.{m}=0.0" for m in ("text", "audio", "vision")),
    ],
}
# 16 validation samples in 4 batches: two per rank, dealt round-robin and gathered back
SMALL = [*TINY, "train.eval_batch_size=4"]

HOOK = """
import os
if os.environ.get("MDKAT_TEST_HOOK") and "RANK" in os.environ:
    import signal, time
    import torch
    import mdkat.runs, mdkat.training
    hook, rank, out = os.environ["MDKAT_TEST_HOOK"], int(os.environ["RANK"]), os.environ["MDKAT_TEST_OUT"]
    fit, predict, calls = mdkat.runs.fit, mdkat.training.predict, []
    step, trained_on = mdkat.training._Step.forward, []
    def hooked_step(self, batch):
        trained_on.extend(batch.index.tolist())
        return step(self, batch)
    def hooked_fit(*args, on_epoch=None, **kwargs):
        def epoch(done, row):
            on_epoch(done, row)
            if hook == "exit" and done == 2:
                os._exit(3)
        result = fit(*args, on_epoch=epoch if on_epoch is not None else None, **kwargs)
        torch.save(result.model.state_dict(), os.path.join(out, f"rank{rank}.pt"))
        torch.save(trained_on, os.path.join(out, f"rank{rank}-samples.pt"))
        return result
    def hooked_predict(*args, **kwargs):
        calls.append(1)
        if rank == 1 and len(calls) == 2 and hook in ("kill", "hang"):  # in epoch 2's validation
            if hook == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(3600)
        return predict(*args, **kwargs)
    mdkat.runs.fit, mdkat.training.predict = hooked_fit, hooked_predict
    mdkat.training._Step.forward = hooked_step
"""


def stage(
    data: Path, out: Path, overrides: list[str], *, ranks: int, hook: str = "", timeout_s: str = "60"
) -> subprocess.CompletedProcess:
    """The train stage in `ranks` processes (torchrun) or in one (plain python), its MLflow store in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "hook").mkdir(exist_ok=True)
    (out / "hook" / "sitecustomize.py").write_text(HOOK)
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    command = [
        *launcher,
        str(ROOT / "stages" / "train.py"),
        *("--params", str(ROOT / "params.yaml"), "--data", str(data), "--out", str(out / "model")),
        *(arg for o in overrides for arg in ("-S", o)),
    ]
    env = {
        **os.environ,
        "PYTHONPATH": str(out / "hook"),
        "OMP_NUM_THREADS": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{out / 'mlflow.db'}",
        "MDKAT_TEST_HOOK": hook,
        "MDKAT_TEST_OUT": str(out),
        "MDKAT_DIST_TIMEOUT_S": timeout_s,
    }
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)


def history(folder: Path) -> list[dict[str, float]]:
    with open(folder / "history.csv") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def assert_close(rows: list[dict], reference: list[dict], keys=COMPARED) -> None:
    assert [r["epoch"] for r in rows] == [r["epoch"] for r in reference]
    for row, ref in zip(rows, reference, strict=True):
        for key in keys:
            assert row[key] == pytest.approx(ref[key], rel=TOLERANCE), (row["epoch"], key, row[key], ref[key])


def runs_in(store: Path) -> list:
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return prepared(tiny_params(), tmp_path_factory.mktemp("distributed"))


@pytest.fixture(scope="module")
def two_ranks(data, tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """One uninterrupted 2-process run per model, each rank's final state saved."""
    runs = {}
    for model, no_dropout in NO_DROPOUT.items():
        out = tmp_path_factory.mktemp(f"two-{model}")
        done = stage(data, out, [*SMALL, f"model.name={model}", *no_dropout], ranks=2, hook="save")
        runs[model] = (out, done)
    return runs


@pytest.mark.parametrize("model", list(NO_DROPOUT))
def test_two_ranks_stay_identical_and_train_like_one_process_with_the_same_global_batch(
    model, data, two_ranks, tmp_path
):
    out, done = two_ranks[model]
    assert done.returncode == 0, done.stderr[-4000:]
    # every parameter and buffer (KT's running errors, Self-MM's per-sample labels) equal across ranks
    rank0, rank1 = (torch.load(out / f"rank{r}.pt") for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    different = [k for k in rank0 if not torch.equal(rank0[k], rank1[k])]
    assert not different, different
    # disjoint shards that together are every training sample once per epoch (48 samples, 4 epochs)
    samples = [torch.load(out / f"rank{r}-samples.pt") for r in (0, 1)]
    assert len(samples[0]) == len(samples[1]) == 48 * 4 // 2
    assert sorted(samples[0] + samples[1]) == sorted(list(range(48)) * 4)

    params = tiny_params(*SMALL[len(TINY) :], f"model.name={model}", *NO_DROPOUT[model])
    one = fit(params, load_prepared(data), tmp_path / "one", progress=False)
    two = history(out / "model")
    assert_close(two, one.history)
    # the state updated from batches followed the global batch: as many updates, close values
    for key, value in one.model.state_dict().items():
        if key.endswith("updates") or key.endswith("visits"):
            assert torch.equal(rank0[key], value.cpu()), key
        elif key.endswith("kt.error") or key.endswith("generated"):
            torch.testing.assert_close(rank0[key], value.cpu(), rtol=TOLERANCE, atol=TOLERANCE)


def test_validation_metrics_are_those_of_the_whole_split_gathered_in_order(data, two_ranks):
    out, done = two_ranks["mdkat"]
    assert done.returncode == 0, done.stderr[-4000:]
    rows = {int(r["epoch"]): r for r in history(out / "model")}
    best = json.loads((out / "model" / "valid_metrics.json").read_text())
    valid = load_prepared(data).valid
    # the kept model predicts the whole split in one process: the metrics rank 0 reported for its epoch
    metrics = regression_metrics(
        predict(model_from_file(out / "model" / "model.pt"), valid, 4), valid.label.numpy()
    )
    for key, value in metrics.items():
        assert rows[best["best_epoch"]][f"valid_{key}"] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_only_rank_zero_writes_logs_and_reports(two_ranks):
    out, done = two_ranks["mdkat"]
    assert done.returncode == 0, done.stderr[-4000:]
    assert len(runs_in(out)) == 1
    assert done.stderr.count("mdkat train: best epoch") == 1
    assert done.stderr.count("mdkat train: rank done") == 1
    assert done.stderr.count("epoch   1  loss") == 1
    assert sorted(p.name for p in (out / "model").iterdir() if not p.name.startswith(".")) == sorted(
        ["data_manifest.json", "history.csv", "learning_curves.png", "mlflow_run.json", "model.pt"]
        + ["params.resolved.yaml", "valid_metrics.json"]
    )


def test_a_two_rank_checkpoint_resumes_in_one_process(data, two_ranks, tmp_path):
    overrides = [*SMALL, "model.name=mdkat", *NO_DROPOUT["mdkat"]]
    stopped = stage(data, tmp_path, overrides, ranks=2, hook="exit")
    assert stopped.returncode != 0
    assert len(list((tmp_path / "model").glob(".checkpoint-*/checkpoint.pt"))) == 1
    resumed = stage(data, tmp_path, overrides, ranks=1)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resuming after epoch 2" in resumed.stderr
    assert not list((tmp_path / "model").glob(".checkpoint-*"))
    rows, uninterrupted = history(tmp_path / "model"), history(two_ranks["mdkat"][0] / "model")
    same = [k for k in uninterrupted[0] if k not in ("seconds",)]
    assert [{k: r[k] for k in same} for r in rows[:2]] == [{k: r[k] for k in same} for r in uninterrupted[:2]]
    assert_close(rows, uninterrupted)
    assert len(runs_in(tmp_path)) == 1  # the interrupted run continued, not a second one


def test_a_rank_that_dies_ends_the_run_with_an_error_naming_it(data, tmp_path):
    start = time.monotonic()
    done = stage(data, tmp_path, [*SMALL], ranks=2, hook="kill")
    assert done.returncode != 0
    assert time.monotonic() - start < 120
    summary = done.stderr[done.stderr.rfind("Root Cause") :]
    assert "rank      : 1" in summary and "SIGKILL" in summary, done.stderr[-3000:]
    assert not (tmp_path / "model" / "model.pt").exists()


def test_a_rank_that_hangs_ends_the_run_after_the_timeout_with_a_clear_error(data, tmp_path):
    start = time.monotonic()
    # long enough for rank 0's MLflow set-up on a loaded machine, which rank 1 waits for at the start
    done = stage(data, tmp_path, [*SMALL], ranks=2, hook="hang", timeout_s="20")
    assert done.returncode != 0
    assert time.monotonic() - start < 120
    assert "mdkat train: error: rank 0 of 2: another rank stopped answering" in done.stderr, done.stderr[
        -3000:
    ]
    assert "MDKAT_DIST_TIMEOUT_S" in done.stderr


def test_launch_errors_name_what_is_wrong(monkeypatch):
    from mdkat import distributed
    from mdkat.errors import MdkatError

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.start("cpu") == distributed.Context(rank=0, world=1, local_rank=0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(MdkatError, match=r"\['RANK', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'\] not set"):
        distributed.start("cpu")
    for name, value in (
        ("RANK", "0"),
        ("LOCAL_RANK", "0"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "1"),
    ):
        monkeypatch.setenv(name, value)
    for bad in ("soon", "0", "-5"):
        monkeypatch.setenv("MDKAT_DIST_TIMEOUT_S", bad)
        with pytest.raises(MdkatError, match=f"MDKAT_DIST_TIMEOUT_S='{bad}': expected a positive number"):
            distributed.start("cpu")
