"""The training loop and the evaluate stage on tiny synthetic data: determinism, resume, selection, files."""

from __future__ import annotations

import collections
import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mdkat.checks import load_checked
from mdkat.config import ConfigError, load_params
from mdkat.data import load_prepared
from mdkat.errors import MdkatError
from mdkat.evaluation import evaluate, seven_class
from mdkat.metrics import is_better, regression_metrics
from mdkat.training import _update_average, fit, load_checkpoint, model_from_file, predict
from tests.conftest import ROOT, Stop, prepared, stop_after, tiny_params


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(params, prepared directory) of a tiny synthetic set-up, from the real params.yaml."""
    params = tiny_params()
    return params, prepared(params, tmp_path_factory.mktemp("tiny"))


def _fit(params, data_dir, out, **kwargs):
    return fit(params, load_prepared(data_dir, splits=("train", "valid")), out, progress=False, **kwargs)


def _timeless(history):
    """The history without wall-clock times, which differ between runs by nature."""
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def test_same_seed_gives_identical_results(tiny, tmp_path):
    params, data_dir = tiny
    a = _fit(params, data_dir, tmp_path / "a")
    b = _fit(params, data_dir, tmp_path / "b")
    assert a.history == [
        {**row, "seconds": r["seconds"]} for row, r in zip(b.history, a.history, strict=True)
    ]
    assert a.best_valid == b.best_valid
    sa, sb = torch.load(tmp_path / "a" / "model.pt"), torch.load(tmp_path / "b" / "model.pt")
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])


def test_resume_after_an_interruption_ends_like_an_uninterrupted_run(tiny, tmp_path):
    params, data_dir = tiny
    whole = _fit(params, data_dir, tmp_path / "whole")
    with pytest.raises(Stop):
        _fit(params, data_dir, tmp_path / "cut", on_epoch=stop_after(2))
    assert not (tmp_path / "cut" / "model.pt").exists()
    resumed = _fit(params, data_dir, tmp_path / "cut", resume=True)
    assert _timeless(resumed.history) == _timeless(whole.history)
    assert resumed.best_valid == whole.best_valid and resumed.best_epoch == whole.best_epoch


def test_checkpoints_load_with_weights_only(tiny, tmp_path):
    params, data_dir = tiny
    _fit(params, data_dir, tmp_path)
    for name in ("checkpoint.pt", "model.pt"):
        payload = torch.load(tmp_path / name, weights_only=True)
        assert "model" in payload
    assert load_checkpoint(tmp_path / "checkpoint.pt")["state"]["epoch"] == 4


def test_best_weights_are_kept_and_reload_to_the_same_predictions(tiny, tmp_path):
    params, data_dir = tiny
    result = _fit(params, data_dir, tmp_path)
    maes = [row["valid_mae"] for row in result.history]
    assert result.best_epoch == 1 + int(np.argmin(maes))
    assert result.best_valid["mae"] == min(maes)
    data = load_prepared(data_dir, splits=("valid",))
    reloaded = model_from_file(tmp_path / "model.pt")
    np.testing.assert_allclose(
        predict(reloaded, data.valid, 7), predict(result.model, data.valid, 16), atol=1e-6
    )
    # the history file has one row per epoch with every loss term and metric
    with open(tmp_path / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    assert {"train_task", "train_ka", "train_kt", "valid_mae", "valid_acc2_non0", "lr"} <= set(rows[0])


def test_the_kept_weights_are_the_best_epochs_not_the_last(tiny, tmp_path):
    _, data_dir = tiny
    # a high learning rate: the validation MAE is lowest at epoch 2 and worse after
    params = tiny_params("train.epochs=6", "train.lr=0.02", "train.patience=10")
    result = _fit(params, data_dir, tmp_path)
    maes = [row["valid_mae"] for row in result.history]
    assert result.best_epoch < len(maes) and maes[-1] - min(maes) > 1e-3  # the case in question
    valid = load_prepared(data_dir, splits=("valid",)).valid
    kept = model_from_file(tmp_path / "model.pt")  # measured afresh from the file, not from the result
    mae = regression_metrics(predict(kept, valid, 5), valid.label.numpy())["mae"]
    assert mae == pytest.approx(maes[result.best_epoch - 1], abs=1e-6)


def test_gradients_are_clipped_to_train_grad_clip_at_every_step(tiny, tmp_path, monkeypatch):
    _, data_dir = tiny
    clip = 1e-3  # far below any gradient norm of this problem, so that every step is clipped
    norms = []
    step = torch.optim.AdamW.step

    def measured_step(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", measured_step)
    params = tiny_params(f"train.grad_clip={clip}")
    _fit(params, data_dir, tmp_path)
    steps = params.train.epochs * -(-params.data.synthetic.n_train // params.train.batch_size)
    assert len(norms) == steps == 12
    np.testing.assert_allclose(norms, clip, rtol=1e-4)


def test_early_stopping_stops_after_patience(tiny, tmp_path):
    _, data_dir = tiny
    # a learning rate far below float32's resolution leaves the weights as they are: no epoch improves
    params = tiny_params("train.lr=1e-30", "train.patience=2", "train.epochs=10")
    result = _fit(params, data_dir, tmp_path)
    assert result.stopped_early
    assert len(result.history) == 3 and result.best_epoch == 1


def test_is_better_directions():
    assert is_better("mae", 0.5, 0.6) and not is_better("mae", 0.7, 0.6)
    assert is_better("corr", 0.7, 0.6) and not is_better("acc2_non0", 0.5, 0.6)
    assert not is_better("corr", float("nan"), None)
    assert is_better("mae", 1.0, None)


def test_training_never_reads_the_test_split(tiny, tmp_path):
    import shutil

    params, data_dir = tiny
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    (copy / "test.npz").write_bytes(b"not a split")
    _fit(params, copy, tmp_path / "out")  # would raise on the test file's checksum if it were read


def test_best_file_precedence(tmp_path):
    best = tmp_path / "best.yaml"
    best.write_text(
        yaml.safe_dump(
            {
                "params": {"loss.mdkat.ka": 0.7, "train.lr": 0.003},
                "metric": "mae",
                "value": 0.5,
                "trial": 3,
                "study_name": "s",
                "n_trials": 8,
            }
        )
    )
    params = load_params(ROOT / "params.yaml", ["train.lr=0.01"], best=best)
    assert params.weights()["ka"] == 0.7  # the best file beats params.yaml
    assert params.train.lr == 0.01  # -S beats the best file
    best.write_text(yaml.safe_dump({"params": {"train.lrr": 1.0}}))
    with pytest.raises(ConfigError, match=r"unknown key 'train.lrr'.*from .*best.yaml"):
        load_params(ROOT / "params.yaml", best=best)
    best.write_text(yaml.safe_dump({"params": {"loss.mdkat.kaa": 1.0}}))
    with pytest.raises(ConfigError, match=r"'loss.mdkat.kaa' is not a loss term of mdkat.*from .*best.yaml"):
        load_checked(ROOT / "params.yaml", best=best)
    best.write_text(yaml.safe_dump({"params": {"loss.mdkat.ka": "high"}}))
    with pytest.raises(ConfigError, match=r"'loss.mdkat.ka' expected float.*from .*best.yaml"):
        load_params(ROOT / "params.yaml", best=best)


def test_evaluate_writes_metrics_predictions_and_figures(tiny, tmp_path):
    params, data_dir = tiny
    _fit(params, data_dir, tmp_path / "model")
    result = evaluate(
        params, data_dir, tmp_path / "model" / "model.pt", tmp_path / "metrics.json", tmp_path / "plots"
    )
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert set(report) == {"test", "oracle", "fraction_of_oracle"}
    for key, value in report["test"].items():
        if value is not None and report["oracle"][key]:
            assert report["fraction_of_oracle"][key] == pytest.approx(value / report["oracle"][key])
    with open(tmp_path / "plots" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 20 and list(rows[0]) == ["id", "label", "prediction", "label_class", "pred_class"]
    pred = np.array([float(r["prediction"]) for r in rows])
    np.testing.assert_allclose(pred, result.pred)
    assert [int(r["pred_class"]) for r in rows] == seven_class(pred).tolist()
    assert (tmp_path / "plots" / "confusion.png").stat().st_size > 1000
    assert (tmp_path / "plots" / "scatter.png").read_bytes()[:4] == b"\x89PNG"


def test_seven_class_rounds_half_to_even_and_clips():
    np.testing.assert_array_equal(
        seven_class(np.array([-3.7, -2.5, -0.5, 0.5, 1.5, 2.5, 9.0])), [-3, -2, 0, 0, 2, 2, 3]
    )


def test_the_moving_average_of_the_weights_is_hand_computable():
    live, averaged = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    live.register_buffer("count", torch.tensor(7))
    averaged.register_buffer("count", torch.tensor(0))
    with torch.no_grad():
        averaged.weight.fill_(1.0)
        averaged.bias.fill_(1.0)
        live.weight.copy_(torch.tensor([[3.0, -1.0]]))
        live.bias.fill_(5.0)
    _update_average(averaged, live, decay=0.75)
    # 0.75 x the average + 0.25 x the live weights; buffers (KT's running errors) are the live ones
    torch.testing.assert_close(averaged.weight, torch.tensor([[1.5, 0.5]]))
    torch.testing.assert_close(averaged.bias, torch.tensor([2.0]))
    assert averaged.count.item() == 7


def test_the_kept_model_is_the_average_not_the_last_iterate(tiny, tmp_path):
    params, data_dir = tiny
    one = tiny_params("train.epochs=1")
    result = _fit(one, data_dir, tmp_path)
    saved = load_checkpoint(tmp_path / "checkpoint.pt")
    kept = torch.load(tmp_path / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(kept[k], saved["averaged"][k]) for k in kept)
    assert any(not torch.equal(kept[k], saved["model"][k]) for k in kept if kept[k].is_floating_point())
    # without averaging the kept model is the live one
    plain = _fit(tiny_params("train.epochs=1", "train.ema=0.0"), data_dir, tmp_path / "plain")
    live = load_checkpoint(tmp_path / "plain" / "checkpoint.pt")
    assert "averaged" not in live and result.best_epoch == plain.best_epoch == 1
    kept = torch.load(tmp_path / "plain" / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(kept[k], live["model"][k]) for k in kept)


BASELINES = ["tfn", "mult", "misa", "self_mm", "dmd"]


@pytest.mark.parametrize("name", BASELINES)
def test_every_baseline_trains_resumes_exactly_and_reloads_from_its_file(name, tiny, tmp_path):
    # the one loop for every model: an interrupted run resumed ends as an uninterrupted one (Self-MM's
    # per-sample labels included), and model.pt rebuilds the kept model from the file alone
    _, data_dir = tiny
    params = tiny_params(f"model.name={name}", "train.epochs=3")
    whole = _fit(params, data_dir, tmp_path / "whole")
    with pytest.raises(Stop):
        _fit(params, data_dir, tmp_path / "cut", on_epoch=stop_after(1))
    resumed = _fit(params, data_dir, tmp_path / "cut", resume=True)
    assert _timeless(resumed.history) == _timeless(whole.history)
    terms = {k for k in whole.history[0] if k.startswith("train_")} - {"train_loss"}
    assert terms == {
        f"train_{t}" for t in load_checked(ROOT / "params.yaml", [f"model.name={name}"]).weights()
    } | {"train_task"}
    data = load_prepared(data_dir, splits=("valid",))
    reloaded = model_from_file(tmp_path / "whole" / "model.pt")
    np.testing.assert_allclose(
        predict(reloaded, data.valid, 5), predict(whole.model, data.valid, 16), atol=1e-5
    )
    assert whole.best_valid["mae"] == min(row["valid_mae"] for row in whole.history)


def test_a_model_given_data_of_other_feature_sizes_or_alignment_is_refused_by_name(tiny, tmp_path):
    params, data_dir = tiny
    _fit(tiny_params("train.epochs=1"), data_dir, tmp_path / "model")
    for name, override in (
        ("dims", "data.synthetic.dims.audio=7"),
        ("aligned", "data.synthetic.aligned=false"),
    ):
        other = prepared(tiny_params(override), tmp_path / name)
        with pytest.raises(MdkatError) as raised:
            evaluate(params, other, tmp_path / "model" / "model.pt", tmp_path / "m.json", tmp_path / "plots")
        message = str(raised.value)
        assert str(tmp_path / "model" / "model.pt") in message and str(other) in message
        assert (
            ("'audio': 5" in message and "'audio': 7" in message)
            if name == "dims"
            else "unaligned" in message
        )
        assert not (tmp_path / "m.json").exists()


# ---------------------------------------------------------------------------------------------------------
# GPU readiness, checked on the CPU


def test_device_choice_follows_cuda_availability(monkeypatch):
    from mdkat.training import autocast, resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(MdkatError, match="no CUDA device"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda") and resolve_device("cpu") == torch.device("cpu")
    # under torchrun: each process its local rank's GPU; the CPU stays the CPU
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert resolve_device("auto", local_rank=3) == torch.device("cuda", 3)
    assert resolve_device("cuda", local_rank=2) == torch.device("cuda", 2)
    assert resolve_device("cpu", local_rank=2) == torch.device("cpu")
    assert resolve_device("cuda") == torch.device("cuda", 0)  # a caller that names no rank: the first GPU
    # bf16 on the GPU, nothing on the CPU (float32 there); this torch has no CUDA to build the real one
    monkeypatch.setattr(torch, "autocast", lambda **chosen: chosen)
    assert autocast(torch.device("cuda")) == {"device_type": "cuda", "dtype": torch.bfloat16, "enabled": True}
    assert autocast(torch.device("cpu"))["enabled"] is False


SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")
# host-side work that happens once per step by design, not a wait for the device: the step's slice of the
# permutation (kept on the host) picks the sample ids, and PyTorch's optimizers keep their step counters on
# the host in the default CUDA (foreach) path
PER_STEP_ON_HOST = {("tolist", "batch.py:select"), ("item", "optimizer.py:_get_value")}


def _host_syncs(monkeypatch, run) -> collections.Counter:
    """Calls of each tensor method that waits for the device, by (method, file:function of the caller)."""
    counts: collections.Counter = collections.Counter()
    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            caller = sys._getframe(1)
            counts[_name, f"{Path(caller.f_code.co_filename).name}:{caller.f_code.co_name}"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    run()
    monkeypatch.undo()
    return counts


@pytest.mark.parametrize("name", ["mdkat", "late_fusion", "mult", "dmd"])
def test_a_training_step_never_waits_for_the_device(tiny, tmp_path, monkeypatch, name):
    # the same epoch in 3 and in 6 steps: a call site whose count grows with the steps syncs in every step;
    # only the host-side ones may. Models that pack LSTM inputs (tfn, misa, self_mm) read the lengths on
    # the host once per step by design (pack_padded_sequence takes them there), so they are not listed.
    _, data_dir = tiny
    data = load_prepared(data_dir, splits=("train", "valid"))
    counts = {}
    for batch in (16, 8):
        params = tiny_params(f"model.name={name}", "train.epochs=1", f"train.batch_size={batch}")
        out = tmp_path / str(batch)
        counts[batch] = _host_syncs(monkeypatch, lambda p=params, o=out: fit(p, data, o, progress=False))
    per_step = {site for site in counts[8] | counts[16] if counts[8][site] != counts[16][site]}
    assert per_step <= PER_STEP_ON_HOST, per_step - PER_STEP_ON_HOST


def _record_losses(monkeypatch) -> list[tuple[str, int, dict[str, float]]]:
    """Every loss fit computes, as (phase, batch size, {"loss": total, term: value}), in order."""
    import mdkat.training
    from mdkat.models.mdkat import MDKAT

    calls = []
    step_forward, model_loss = mdkat.training._Step.forward, MDKAT.loss

    def forward(self, batch):
        total, terms = step_forward(self, batch)
        calls.append(("train", len(batch), {"loss": total.item(), **{k: v.item() for k, v in terms.items()}}))
        return total, terms

    def loss(self, out, batch, weights):
        total, terms = model_loss(self, out, batch, weights)
        if not self.training:  # fit's training steps go through _Step, recorded above
            calls.append(("valid", len(batch), {"loss": total.item()}))
        return total, terms

    monkeypatch.setattr(mdkat.training._Step, "forward", forward)
    monkeypatch.setattr(MDKAT, "loss", loss)
    return calls


def test_history_losses_are_the_sample_weighted_means_of_the_batches(tiny, tmp_path, monkeypatch):
    _, data_dir = tiny
    # batches of unequal size (48 = 20 + 20 + 8 to train, 16 = 7 + 7 + 2 to validate), so that a mean of
    # batch means, or any other weighting, differs from the mean over samples
    params = tiny_params("train.batch_size=20", "train.eval_batch_size=7", "train.epochs=2")
    calls = _record_losses(monkeypatch)
    result = _fit(params, data_dir, tmp_path)
    train = [c for c in calls if c[0] == "train"]
    valid = [c for c in calls if c[0] == "valid"]
    assert [n for _, n, _ in train] == [20, 20, 8] * 2 and [n for _, n, _ in valid] == [7, 7, 2] * 2
    for epoch, row in enumerate(result.history):
        mine = train[3 * epoch : 3 * epoch + 3]
        for term in mine[0][2]:
            expected = sum(n * values[term] for _, n, values in mine) / 48
            assert row[f"train_{term}"] == pytest.approx(expected, rel=1e-5), term
        seen = valid[3 * epoch : 3 * epoch + 3]
        assert row["valid_loss"] == pytest.approx(sum(n * v["loss"] for _, n, v in seen) / 16, rel=1e-5)
    assert set(mine[0][2]) > {"loss", "task"}  # every term of the model is in the history


def test_epoch_and_run_seconds_are_wall_clock_durations(tiny, tmp_path):
    import time

    params, data_dir = tiny
    start = time.perf_counter()
    result = _fit(params, data_dir, tmp_path)
    elapsed = time.perf_counter() - start
    seconds = [row["seconds"] for row in result.history]
    assert all(0 < s for s in seconds) and sum(seconds) <= result.seconds <= elapsed


def test_a_first_epoch_without_a_valid_metric_counts_as_one_bad_epoch(tiny, tmp_path, monkeypatch):
    import mdkat.training

    _, data_dir = tiny
    real, epochs = mdkat.training.regression_metrics, []

    def nan_then_constant(pred, label):  # epoch 1 NaN, then the same value: epoch 2 is the best
        epochs.append(len(epochs) + 1)
        return {k: float("nan") if epochs[-1] == 1 else 0.5 for k in real(pred, label)}

    monkeypatch.setattr(mdkat.training, "regression_metrics", nan_then_constant)
    params = tiny_params("train.patience=2", "train.epochs=10")
    result = _fit(params, data_dir, tmp_path)
    # epoch 1 bad (1), epoch 2 best (0), epochs 3 and 4 bad (2 = patience): epoch 5 never starts
    assert len(result.history) == 4 and result.best_epoch == 2 and result.stopped_early


def test_without_resume_an_existing_checkpoint_of_another_run_is_not_read(tiny, tmp_path):
    params, data_dir = tiny
    _fit(params, data_dir, tmp_path)  # leaves checkpoint.pt behind
    other = tiny_params("train.seed=7", "train.epochs=2")
    result = _fit(other, data_dir, tmp_path)  # trains afresh: no "cannot resume" error, its own epochs
    fresh = _fit(other, data_dir, tmp_path / "fresh")
    assert _timeless(result.history) == _timeless(fresh.history) and len(result.history) == 2


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", b"PK\x03\x04truncated"])
def test_an_unreadable_model_file_is_an_error_naming_it(tmp_path, content):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(MdkatError, match=f"{path}: not a readable checkpoint"):
        model_from_file(path)
    with pytest.raises(MdkatError, match=f"{tmp_path / 'absent.pt'}: not found"):
        load_checkpoint(tmp_path / "absent.pt")


@pytest.mark.parametrize(("n", "batch_size"), [(16, 3), (16, 4), (5, 2), (3, 2)])
def test_predictions_of_two_ranks_are_dealt_back_into_the_order_of_the_data(
    tiny, tmp_path, n, batch_size, monkeypatch
):
    """Under torchrun rank r predicts batches r, r + 2, ...; gathered, they must read as one process's."""
    import mdkat.distributed
    import mdkat.training

    _, data_dir = tiny
    valid = load_prepared(data_dir, splits=("valid",)).valid
    data = valid.select(torch.arange(n))
    _fit(tiny_params("train.epochs=1"), data_dir, tmp_path)
    model = model_from_file(tmp_path / "model.pt")
    whole = predict(model, data, batch_size)
    parts = []
    for rank in (0, 1):
        context = mdkat.distributed.Context(rank=rank, world=2)
        monkeypatch.setattr(mdkat.training.distributed, "current", lambda c=context: c)
        monkeypatch.setattr(mdkat.training.distributed, "gather_objects", lambda x: [x])
        parts.append(predict(model, data, batch_size))  # this rank's batches alone
    assert sorted(np.concatenate(parts).tolist()) == sorted(whole.tolist())  # together, each sample once
    main = mdkat.distributed.Context(rank=0, world=2)
    monkeypatch.setattr(mdkat.training.distributed, "current", lambda: main)
    monkeypatch.setattr(mdkat.training.distributed, "gather_objects", lambda x: parts)
    np.testing.assert_array_equal(predict(model, data, batch_size), whole)


def test_resuming_with_other_values_names_each_difference_and_how_to_start_afresh(tiny, tmp_path):
    params, data_dir = tiny
    with pytest.raises(Stop):
        _fit(params, data_dir, tmp_path, on_epoch=stop_after(1))
    other = tiny_params("train.lr=0.005", "train.seed=7")
    with pytest.raises(MdkatError) as error:
        _fit(other, data_dir, tmp_path, resume=True)
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'checkpoint.pt'}: cannot resume a run of another configuration")
    assert "train.lr" in message and "train.seed" in message
    assert message.endswith("\nRun without --resume to train afresh with the new values.")


def test_a_checkpoint_folder_is_made_with_its_parents(tiny, tmp_path):
    params, data_dir = tiny
    folder = tmp_path / "study" / "trial 3" / "checkpoints"
    _fit(tiny_params("train.epochs=1"), data_dir, tmp_path / "out", checkpoint_dir=folder)
    assert load_checkpoint(folder / "checkpoint.pt")["state"]["epoch"] == 1
    assert not (tmp_path / "out" / "checkpoint.pt").exists()


def test_the_progress_lines_star_the_best_epoch_only(tiny, tmp_path, capsys):
    _, data_dir = tiny
    params = tiny_params("train.epochs=6", "train.lr=0.02", "train.patience=10")  # best at epoch 2 (above)
    result = _fit(params, data_dir, tmp_path)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("epoch")]
    starred = [int(line.split()[1]) for line in lines if line.endswith("  *")]
    assert len(lines) == 6 and result.best_epoch < 6
    # an epoch is starred when it was the best so far: the last star is the best epoch
    assert starred[-1] == result.best_epoch and starred == sorted(starred) and 1 in starred


def test_a_last_batch_of_one_sample_is_trained_on(tiny, tmp_path, monkeypatch):
    _, data_dir = tiny
    sizes = _record_losses(monkeypatch)
    _fit(tiny_params("train.batch_size=47", "train.epochs=1"), data_dir, tmp_path)  # 48 = 47 + 1
    assert [n for phase, n, _ in sizes if phase == "train"] == [47, 1]
