"""Benchmark: how much of the synthetic data's label a linear read-out of pooled features recovers.

Generates the synthetic splits of `params.yaml`'s data section in memory (with any -S overrides), pools
each modality's steps to one vector per sample and concatenates the three modalities (768 + 5 + 20
features by default), then fits scikit-learn's RidgeCV on the train split (alpha chosen by efficient
leave-one-out over 1e-2..1e4) and scores the test split with mdkat.metrics. Two poolings:

- `mean_pooled`: the mean over each sample's valid steps (its `*_len`), what a model could compute;
- `cue_pooled`: the mean over the true cue steps only, which needs the generator's truth: an upper
  reference for a read-out that knew where the sentiment is.

The two oracles of the manifest (full and text-only) are printed next to them. Prints {"readouts":
{"mean_pooled": {"alpha", "test": {...}}, "cue_pooled": ...}, "oracle": {...}, ...} with --json.

    python bench/readouts.py --json
    python bench/readouts.py -S data.seed=2222 --json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
from sklearn.linear_model import RidgeCV

from mdkat import MODALITIES
from mdkat.config import load_params
from mdkat.data.synthetic import generate
from mdkat.metrics import regression_metrics

ALPHAS = np.logspace(-2, 4, 13)


def pooled(arrays: dict[str, np.ndarray], steps: dict[str, np.ndarray]) -> np.ndarray:
    """(N, sum of d_m): per modality the mean of the features over the steps marked True in steps[m]."""
    parts = []
    for m in MODALITIES:
        w = steps[m].astype(np.float64)  # (N, T_m)
        total = np.einsum("nt,ntd->nd", w, arrays[m])
        parts.append(total / np.maximum(w.sum(1), 1)[:, None])
    return np.hstack(parts)


def valid_steps(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per modality, (N, T_m) True on the steps before each sample's length."""
    return {m: np.arange(arrays[m].shape[1])[None, :] < arrays[f"{m}_len"][:, None] for m in MODALITIES}


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("-S", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    cfg = load_params(args.params, args.overrides).data
    start = time.perf_counter()
    syn = generate(cfg)
    generate_s = time.perf_counter() - start
    train, test = syn.splits["train"], syn.splits["test"]
    steps = {
        "mean_pooled": {"train": valid_steps(train), "test": valid_steps(test)},
        "cue_pooled": {"train": syn.truth["train"].cue, "test": syn.truth["test"].cue},
    }
    readouts = {}
    start = time.perf_counter()
    for name, masks in steps.items():
        x_train, x_test = pooled(train, masks["train"]), pooled(test, masks["test"])
        model = RidgeCV(alphas=ALPHAS).fit(x_train, train["label"])
        readouts[name] = {
            "alpha": float(model.alpha_),
            "test": regression_metrics(model.predict(x_test), test["label"]),
        }
    fit_s = time.perf_counter() - start
    result = {
        "seed": cfg.seed,
        "overrides": args.overrides,
        "counts": {"train": len(train["label"]), "test": len(test["label"])},
        "features": int(x_train.shape[1]),
        "alphas": [float(a) for a in ALPHAS],
        "readouts": readouts,
        "oracle": {"full": syn.info["oracle"]["full"], "text_only": syn.info["oracle"]["text_only"]},
        "generate_seconds": generate_s,
        "fit_seconds": fit_s,
    }
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(f"data.seed {cfg.seed}, test split ({result['counts']['test']} samples):")
        rows = [(name, r["test"], f", alpha {r['alpha']:g}") for name, r in readouts.items()]
        rows += [(f"oracle {name}", m, "") for name, m in result["oracle"].items()]
        for name, m, extra in rows:
            line = f"  {name:16s} Non0 Acc-2 {m['acc2_non0']:.4f}, MAE {m['mae']:.4f}, corr {m['corr']:.4f}"
            print(line + extra)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
