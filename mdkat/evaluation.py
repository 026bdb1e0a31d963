"""Test-split evaluation: the metrics file (a DVC metric), predictions for `dvc plots`, figures for people.

The test split is read here and nowhere else. For synthetic data the metrics file also carries the
oracle's test metrics from the manifest and each metric's ratio to the oracle's (for MAE, lower is
better, so a ratio above 1 means worse; for the others a ratio below 1 does).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from mdkat import plots
from mdkat.config import Params
from mdkat.data import Prepared, load_prepared
from mdkat.io import atomic_open, write_json
from mdkat.metrics import regression_metrics
from mdkat.training import check_inputs, model_from_file, predict, resolve_device

PREDICTIONS = "predictions.csv"
CONFUSION = "confusion.png"
SCATTER = "scatter.png"


def seven_class(x: np.ndarray) -> np.ndarray:
    """The Acc-7 class of each score: round(clip(x, -3, 3)), half to even, as int."""
    return np.round(np.clip(x, -3, 3)).astype(np.int64)


@dataclass
class Evaluation:
    """Test predictions and what was written from them."""

    ids: list[str]
    manifest: dict[str, Any]  # of the data evaluated
    label: np.ndarray  # (N,)
    pred: np.ndarray  # (N,)
    report: dict[str, Any]  # the metrics file's content
    files: list[Path]  # everything written, for logging as artifacts


def write_predictions(path: Path, ids: list[str], label: np.ndarray, pred: np.ndarray) -> None:
    """One row per sample: id, label, prediction, and the 7-class label and prediction."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", "label", "prediction", "label_class", "pred_class"])
    for row in zip(
        ids,
        label.tolist(),
        pred.tolist(),
        seven_class(label).tolist(),
        seven_class(pred).tolist(),
        strict=True,
    ):
        writer.writerow(row)
    with atomic_open(path) as f:
        f.write(buffer.getvalue().encode())


def score(pred: np.ndarray, label: np.ndarray, manifest: dict[str, Any]) -> dict[str, Any]:
    """The metrics file's content: `test` metrics; for synthetic data `oracle` and `fraction_of_oracle`."""
    metrics = regression_metrics(pred, label)
    report: dict[str, Any] = {"test": metrics}
    oracle = manifest.get("oracle")
    if oracle is not None:
        report["oracle"] = oracle["full"]
        report["fraction_of_oracle"] = {
            k: v / oracle["full"][k] for k, v in metrics.items() if oracle["full"][k]
        }
    return report


def evaluate_model(model: nn.Module, data: Prepared, batch_size: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Predictions (N,) of `model` on the test split of `data` and their `score`."""
    device = next(model.parameters()).device
    pred = predict(model, data.test.to(device), batch_size)
    return pred, score(pred, data.test.label.numpy().astype(np.float64), data.manifest)


def evaluate(
    params: Params,
    data_dir: str | Path,
    model_file: str | Path,
    metrics_file: str | Path,
    plots_dir: str | Path,
) -> Evaluation:
    """Predict the test split with `model_file`; write the metrics file, predictions and figures."""
    data = load_prepared(data_dir, splits=("test",))
    model = model_from_file(model_file, resolve_device(params.train.device))
    check_inputs(model, data.manifest, model_file, data_dir)
    pred, report = evaluate_model(model, data, params.train.eval_batch_size)
    label = data.test.label.numpy().astype(np.float64)
    write_json(metrics_file, report)

    plots_dir = Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    write_predictions(plots_dir / PREDICTIONS, data.test.id, label, pred)
    title = f"{params.model.name} on {data.manifest['dataset']} test"
    plots.scatter(label, pred, plots_dir / SCATTER, title)
    plots.confusion(seven_class(label), seven_class(pred), plots_dir / CONFUSION, title)
    files = [Path(metrics_file), plots_dir / PREDICTIONS, plots_dir / SCATTER, plots_dir / CONFUSION]
    return Evaluation(data.test.id, data.manifest, label, pred, report, files)
