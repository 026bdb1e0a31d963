"""Command line of the pipeline's stages: `mdkat <stage> ...`, also behind each `stages/<stage>.py`.

Every stage takes `--params FILE` (default `params.yaml`) and repeated `-S section.key=value` overrides
(the syntax of `dvc exp run -S`). The parameters are read, then checked by the registries the stage uses
(data sources, models), before any work starts. Errors caused by input or configuration print one clear
line and exit with status 1 instead of a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

from mdkat.checks import load_checked
from mdkat.config import Params
from mdkat.errors import MdkatError


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml", help="parameter file (default: params.yaml)")
    parser.add_argument(
        "-S",
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a parameter, e.g. -S data.seed=2 (repeatable; values are YAML scalars)",
    )


def _prepare(args: argparse.Namespace, params: Params) -> str:
    from mdkat.data.prepare import prepare

    manifest = prepare(params.data, args.out)
    counts = "/".join(str(manifest["counts"][s]) for s in ("train", "valid", "test"))
    summary = f"prepared {manifest['source']} data ({counts} train/valid/test) in {args.out}"
    if "oracle" in manifest:
        full = manifest["oracle"]["full"]
        summary += f"; oracle test Non0 Acc-2 {full['acc2_non0']:.4f}, MAE {full['mae']:.4f}"
    return summary


def _train(args: argparse.Namespace, params: Params) -> str:
    from mdkat.runs import train_run

    result = train_run(params, args.data, args.out, best=args.best, resume=args.resume)
    valid = result["valid"]
    if result["run_id"] is None:  # a rank > 0 under torchrun: rank 0 reports the run
        return f"rank done: best epoch {result['best_epoch']}, valid MAE {valid['mae']:.4f}"
    return (
        f"best epoch {result['best_epoch']}: valid MAE {valid['mae']:.4f}, "
        f"Non0 Acc-2 {valid['acc2_non0']:.4f} in {result['seconds']:.0f} s; MLflow run {result['run_id']}"
    )


def _evaluate(args: argparse.Namespace, params: Params) -> str:
    from mdkat.runs import evaluate_run

    test = evaluate_run(params, args.data, args.model, args.metrics, args.plots)["test"]
    return (
        f"test MAE {test['mae']:.4f}, Corr {test['corr']:.4f}, Non0 Acc-2 {test['acc2_non0']:.4f} "
        f"-> {args.metrics}"
    )


def _tune(args: argparse.Namespace, params: Params) -> str:
    from mdkat.tuning import tune

    best = tune(params, args.data, args.out, workers=args.workers)
    values = ", ".join(f"{k}={v:.3g}" for k, v in best["params"].items())
    return (
        f"best trial {best['trial']} of {best['n_trials']}: {best['metric']} {best['value']:.4f} ({values}) "
        f"-> {args.out}"
    )


def _diagnose(args: argparse.Namespace, params: Params) -> str:
    from mdkat.diagnose import diagnose_files

    result = diagnose_files(params, args.data, args.model, args.out)
    auc = result["amsa_cue_auc"]
    text = "no AMSA" if auc is None else "AMSA cue AUC " + ", ".join(f"{m} {v:.3f}" for m, v in auc.items())
    return f"{text} -> {args.out}"


def _diagnose_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="prepared synthetic data directory")
    p.add_argument("--model", required=True, help="model.pt written by the train stage")
    p.add_argument("--out", required=True, help="diagnostics JSON to write")


def _report(args: argparse.Namespace, params: Params) -> str:
    from mdkat.report import report, variants_of

    table = report(params, args.data, args.out, table=args.table, workers=args.workers)
    table = table.set_index(["variant", "metric"])
    mae = ", ".join(f"{v} {table.loc[(v, 'mae'), 'mean']:.4f}" for v in variants_of(params, args.table))
    seeds = len(params.report.seeds)
    return f"test MAE (mean over {seeds} seeds): {mae}; {params.model.name} is the reference -> {args.out}"


def _report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="prepared data directory")
    p.add_argument(
        "--out", required=True, help="report directory (ablation.md / models.md, their CSVs, runs/)"
    )
    p.add_argument("--best", help="YAML of tuned values applied to every variant (-S still wins)")
    p.add_argument("--workers", type=int, default=1, help="training processes, one torch thread each")
    p.add_argument(
        "--table",
        choices=["ablation", "models"],
        default="ablation",
        help="ablation: report.variants (ablation.md); models: report.models, the baselines (models.md)",
    )


def _tune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="prepared data directory")
    p.add_argument("--out", required=True, help="YAML of the best values, read by `train --best`")
    p.add_argument("--workers", type=int, default=1, help="worker processes on the same storage (default 1)")


def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="prepared data directory")
    p.add_argument("--out", required=True, help="output directory (model.pt, history.csv, ...)")
    p.add_argument("--best", help="YAML of tuned values (written by the tune stage); -S still wins")
    resume = p.add_mutually_exclusive_group()
    resume.add_argument(
        "--resume",
        action="store_const",
        const=True,
        default=None,
        help="continue the interrupted run; an error if its checkpoint is of another configuration "
        "(default: continue it when it is of this configuration, else start afresh)",
    )
    resume.add_argument(
        "--fresh", dest="resume", action="store_const", const=False, help="start afresh, whatever is there"
    )


def _evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="prepared data directory")
    p.add_argument("--model", required=True, help="model.pt written by the train stage")
    p.add_argument("--metrics", required=True, help="metrics JSON to write")
    p.add_argument("--plots", required=True, help="directory for predictions.csv and figures")


class Stage(NamedTuple):
    """One sub-command: its help, its arguments, what it runs, and the registry checks of its params."""

    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[..., str]
    checks: dict[str, bool]  # keyword arguments of mdkat.checks.check


# the console script and stages/*.py share this table
STAGES: dict[str, Stage] = {
    "prepare": Stage(
        "write the prepared data format from data.source",
        lambda p: p.add_argument("--out", required=True, help="output directory"),
        _prepare,
        {"models": False},  # no torch, no model: the data stage depends on the data code only
    ),
    "tune": Stage(
        "tune the loss weights with an Optuna study on the valid split",
        _tune_arguments,
        _tune,
        {"data": False},
    ),
    "train": Stage(
        "train a model on the prepared train split, selecting on valid",
        _train_arguments,
        _train,
        {"data": False},
    ),
    "evaluate": Stage(
        "evaluate a trained model on the test split",
        _evaluate_arguments,
        _evaluate,
        {"data": False, "models": False},  # the model file says which model it is
    ),
    "diagnose": Stage(
        "measure each module against the synthetic data's truth (cue AUC, probes, KT errors)",
        _diagnose_arguments,
        _diagnose,
        {"data": False, "models": False},
    ),
    "report": Stage(
        "ablation variants x seeds: train, test, and compare with the chosen model",
        _report_arguments,
        _report,
        {"data": False, "variants": True},
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The `mdkat` argument parser, one sub-command per stage."""
    parser = argparse.ArgumentParser(prog="mdkat", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True)
    for name, stage in STAGES.items():
        sub_parser = sub.add_parser(name, help=stage.help, description=stage.help)
        stage.arguments(sub_parser)
        _common(sub_parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one stage; return the process exit status."""
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        stage = STAGES[args.stage]
        params = load_checked(args.params, args.overrides, getattr(args, "best", None), **stage.checks)
        summary = stage.run(args, params)
    except MdkatError as e:
        print(f"mdkat {args.stage}: error: {e}", file=sys.stderr)
        return 1
    print(f"mdkat {args.stage}: {summary} [{time.perf_counter() - start:.1f} s]", file=sys.stderr)
    return 0


def run_stage(stage: str) -> None:
    """Entry point of `stages/<stage>.py`: the same as `mdkat <stage> ...`."""
    sys.exit(main([stage, *sys.argv[1:]]))


def console() -> None:
    """The `mdkat` console script."""
    sys.exit(main())
