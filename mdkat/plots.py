"""Figures for people (PNG): prediction against label, the 7-class confusion matrix, learning curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mdkat.io import atomic_open  # noqa: E402

CLASSES = np.arange(-3, 4)


def _save(fig, path: Path) -> None:
    with atomic_open(path) as f:
        fig.savefig(f, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def scatter(label: np.ndarray, pred: np.ndarray, path: str | Path, title: str) -> None:
    """Prediction against label, with the identity line."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(label, pred, s=6, alpha=0.5)
    ax.plot([-3, 3], [-3, 3], color="black", lw=1)
    ax.set(xlim=(-3.3, 3.3), ylim=(-3.3, 3.3), xlabel="label", ylabel="prediction", title=title)
    ax.set_aspect("equal")
    _save(fig, Path(path))


def confusion(label_class: np.ndarray, pred_class: np.ndarray, path: str | Path, title: str) -> None:
    """Counts of (label class, predicted class) over the 7 rounded sentiment classes."""
    counts = np.zeros((len(CLASSES), len(CLASSES)), dtype=np.int64)
    np.add.at(counts, (label_class + 3, pred_class + 3), 1)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    image = ax.imshow(counts, cmap="Blues")
    for (i, j), n in np.ndenumerate(counts):
        ax.text(
            j,
            i,
            str(n),
            ha="center",
            va="center",
            fontsize=7,
            color="white" if n > counts.max() / 2 else "black",
        )
    ax.set(
        xticks=range(7),
        yticks=range(7),
        xticklabels=CLASSES,
        yticklabels=CLASSES,
        xlabel="predicted class",
        ylabel="label class",
        title=title,
    )
    fig.colorbar(image, ax=ax, shrink=0.8)
    _save(fig, Path(path))


def learning_curves(history: list[dict[str, float]], path: str | Path, metric: str) -> None:
    """Training and validation loss, and the selection metric, per epoch."""
    epochs = [row["epoch"] for row in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(epochs, [row["train_loss"] for row in history], label="train loss")
    left.plot(epochs, [row["valid_loss"] for row in history], label="valid loss")
    left.set(xlabel="epoch", ylabel="loss")
    left.legend()
    right.plot(epochs, [row[f"valid_{metric}"] for row in history], color="tab:green")
    right.set(xlabel="epoch", ylabel=f"valid {metric}")
    _save(fig, Path(path))
