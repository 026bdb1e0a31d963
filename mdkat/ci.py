"""CI regression of metrics: the real pipeline on a small problem, compared with a committed baseline.

    python -m mdkat.ci run --out DIR [-S key=value ...]   # dvc repro of the CI profile in a copy at DIR
    python -m mdkat.ci check --now DIR [--repeat DIR2]    # table against ci.baseline; exit 1 on regression
    python -m mdkat.ci baseline --now DIR                 # make DIR's test metrics the new baseline
    python -m mdkat.ci notebook --project DIR             # execute notebooks/compare_runs.ipynb against DIR
    python -m mdkat.ci spread --seeds 1111 1112 1113      # the profile's test metrics over training seeds

`run` copies the repository's files (tracked and untracked, not ignored) to DIR, writes the CI profile
(`ci.overrides` applied to `params.yaml`) there and runs `dvc repro` in it, with fresh MLflow and Optuna
stores: the committed `dvc.lock` and the studies and runs of the working copy stay untouched. The check
fails when a test metric is worse than the baseline by more than its tolerance (`Metric.ci_tolerance` in
`mdkat.metrics`), when the baseline was
made for another profile, and (with `--repeat`) when two runs of the profile differ at all, since on a CPU
the same seeds must give the same numbers. `spread` trains and tests the profile with several training
seeds (train + evaluate, no tracking): the tolerances of `mdkat.metrics` are set from its standard
deviations, so that the check fails on a change that costs more than the seeds' own variation.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mdkat.checks import load_checked
from mdkat.config import Params, load_params, parse_override, set_dotted, with_values
from mdkat.data import load_prepared
from mdkat.data.prepare import prepare
from mdkat.errors import MdkatError
from mdkat.evaluation import evaluate_model
from mdkat.io import atomic_open, project_root, write_json
from mdkat.metrics import BY_NAME, METRIC_NAMES, METRICS, worsening
from mdkat.training import fit

METRICS_FILE = Path("metrics") / "test.json"  # written by the evaluate stage (dvc.yaml)
NOTEBOOK = Path("notebooks") / "compare_runs.ipynb"
RUN_RECORD = "ci_run.json"


def project_files(root: Path) -> list[Path]:
    """The files of the working tree that git tracks or would track (relative to `root`)."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=root,
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise MdkatError(f"{root}: cannot list the project's files with git ({e})") from None
    files = [Path(p) for p in listed.decode().split("\0") if p]
    return [p for p in files if (root / p).is_file()]  # deleted but not yet committed files are skipped


def profile_params(params_file: Path, extra: Sequence[str] = ()) -> str:
    """The text of the CI profile's parameter file: `params_file` with `ci.overrides`, then `extra`."""
    params = load_params(params_file)
    raw = yaml.safe_load(params_file.read_text())
    for item in (*params.ci.overrides, *extra):
        key, value = parse_override(item)
        set_dotted(raw, key, value, f"{params_file}: 'ci.overrides' item {item!r}")
    text = "# The CI profile: params.yaml with ci.overrides applied (written by mdkat.ci)\n"
    return text + yaml.safe_dump(raw, sort_keys=False)


def profile(params_file: Path, extra: Sequence[str] = ()) -> Params:
    """The CI profile's parameters: `params_file` with `ci.overrides`, then `extra`, checked."""
    return load_checked(params_file, [*load_params(params_file).ci.overrides, *extra])


def train_and_test(params: Params, data_dir: Path, work: Path) -> dict[str, float]:
    """Train and test as the train and evaluate stages do (no tracking); the test metrics."""
    data = load_prepared(data_dir)
    result = fit(params, data, work, progress=False)
    return evaluate_model(result.model, data, params.train.eval_batch_size)[1]["test"]


def spread(params_file: Path, seeds: Sequence[int], work: Path) -> dict[str, Any]:
    """The profile's test metrics for each training seed, their mean and sample std, and 3 std each."""
    params = profile(params_file)
    prepare(params.data, work / "prepared")
    per_seed = {}
    for seed in seeds:
        print(f"CI profile, train.seed={seed}", file=sys.stderr, flush=True)
        seeded = with_values(params, {"train.seed": seed}, f"spread seed {seed}")
        per_seed[seed] = train_and_test(seeded, work / "prepared", work / f"seed-{seed}")
    summary = {}
    for metric in METRIC_NAMES:
        values = np.array([per_seed[s][metric] for s in seeds])
        std = float(values.std(ddof=1)) if len(values) > 1 else math.nan
        summary[metric] = {"mean": float(values.mean()), "std": std, "three_std": 3 * std}
    return {
        "overrides": list(params.ci.overrides),
        "seeds": list(seeds),
        "per_seed": per_seed,
        "summary": summary,
    }


def run(
    out: str | Path,
    extra: Sequence[str] = (),
    root: Path | None = None,
    threads: int | None = None,
    log: Path | None = None,
) -> dict[str, Any]:
    """Copy the project to `out`, write the CI profile there and `dvc repro` it; return the run record.

    `threads` caps torch's threads (OMP_NUM_THREADS) for runs that share the cores; `log` takes the stages'
    output instead of the console (its tail is in the error when the run fails).
    """
    root = root or project_root()
    out = Path(out).resolve()
    if out.exists():
        shutil.rmtree(out)  # a fresh copy every time: no study or run store survives from before
    for rel in project_files(root):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, out / rel)
    profile = profile_params(root / "params.yaml", extra)
    (out / "params.yaml").write_text(profile)
    load_checked(out / "params.yaml")  # a broken profile fails here, naming the key, not deep in a stage
    # the copy is not a git repository; DVC then needs to be told to work without one
    with open(out / ".dvc" / "config.local", "a") as f:
        f.write("[core]\n    no_scm = true\n")

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the copy's own store
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # dvc.yaml's `python`
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    overrides = [*load_params(root / "params.yaml").ci.overrides, *extra]
    print(f"CI profile in {out}: {' '.join(overrides)}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with open(log, "wb") if log is not None else contextlib.nullcontext() as sink:
        streams = {"stdout": sink, "stderr": subprocess.STDOUT} if sink is not None else {}
        done = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=out, env=env, **streams)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = f":\n{log.read_text(errors='replace')[-3000:]}" if log is not None else ""
        raise MdkatError(f"dvc repro of the CI profile failed in {out} (exit status {done.returncode}){tail}")
    record = {"overrides": overrides, "seconds": round(seconds, 1), "metrics": str(out / METRICS_FILE)}
    write_json(out / RUN_RECORD, record)
    print(f"CI profile done in {seconds:.0f} s", file=sys.stderr)
    return record


def run_all(outs: Sequence[Path], extra: Sequence[str], root: Path) -> None:
    """`run` into each of `outs`; several at once, one torch thread each, logs next to each copy.

    The profile's small models use a second thread poorly, so two runs sharing two cores take little
    longer than one; each run alone gives the same numbers (one seed, one thread count for both).
    """
    if len(outs) == 1:
        run(outs[0], extra, root=root)
        return
    with concurrent.futures.ThreadPoolExecutor(len(outs)) as pool:
        jobs = [pool.submit(run, o, extra, root, 1, o.with_name(o.name + ".log")) for o in outs]
        for job in jobs:
            job.result()  # the first failure, with its log's tail


def read_test_metrics(run_dir: str | Path) -> dict[str, float]:
    """The test metrics a CI run wrote."""
    path = Path(run_dir) / METRICS_FILE
    try:
        return json.loads(path.read_text())["test"]
    except (FileNotFoundError, KeyError, json.JSONDecodeError) as e:
        raise MdkatError(f"{path}: no test metrics ({e!r}); run `python -m mdkat.ci run` first") from None


def compare(baseline: dict[str, float], now: dict[str, float]) -> list[dict[str, Any]]:
    """One row per metric: baseline, now, delta, tolerance and verdict (ok, better, REGRESSION)."""
    rows = []
    for metric in METRICS:
        base, value, tolerance = baseline.get(metric.name), now.get(metric.name), metric.ci_tolerance
        if base is None or value is None or math.isnan(value):
            verdict = "REGRESSION" if base is not None and not math.isnan(base) else "ok"
            delta = math.nan
        else:
            delta = value - base
            worse = worsening(metric.name, value, base)
            verdict = "REGRESSION" if worse > tolerance else "better" if worse < -tolerance else "ok"
        rows.append(
            {
                "metric": metric.name,
                "baseline": base,
                "now": value,
                "delta": delta,
                "tolerance": tolerance,
                "verdict": verdict,
            }
        )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """The comparison as an aligned text table."""

    def number(x: Any) -> str:
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"

    header = f"{'metric':<10} {'baseline':>9} {'now':>9} {'delta':>9} {'tolerance':>9}  verdict"
    lines = [header, "-" * len(header)]
    for r in rows:
        delta = "-" if math.isnan(r["delta"]) else f"{r['delta']:+.4f}"
        lines.append(
            f"{r['metric']:<10} {number(r['baseline']):>9} {number(r['now']):>9} {delta:>9} "
            f"{r['tolerance']:>9.4f}  {r['verdict']}"
        )
    return "\n".join(lines)


def read_baseline(path: Path, params: Params) -> dict[str, float]:
    """The baseline's test metrics, after checking it belongs to the current CI profile."""
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        raise MdkatError(
            f"{path}: no baseline; create it with `python -m mdkat.ci baseline --now DIR`"
        ) from None
    if saved.get("overrides") != list(params.ci.overrides):
        raise MdkatError(
            f"{path}: the baseline was made for the CI profile {saved.get('overrides')}, but "
            f"ci.overrides is now {list(params.ci.overrides)}; re-run the profile and update the "
            "baseline deliberately "
            "(`python -m mdkat.ci baseline --now DIR`)"
        )
    return saved["test"]


def check(now_dir: Path, params_file: Path, repeat_dir: Path | None = None) -> bool:
    """Print the table of `now_dir` against the baseline (and the repeat comparison); True when all pass."""
    params = load_params(params_file)
    baseline_file = params_file.parent / params.ci.baseline
    now = read_test_metrics(now_dir)
    rows = compare(read_baseline(baseline_file, params), now)
    print(f"CI profile test metrics of {now_dir} against {baseline_file}:")
    print(format_table(rows))
    ok = all(r["verdict"] != "REGRESSION" for r in rows)
    if not ok:
        bad = ", ".join(r["metric"] for r in rows if r["verdict"] == "REGRESSION")
        print(f"FAILED: {bad} worse than the baseline beyond tolerance (ci_tolerance in mdkat/metrics.py)")
    if repeat_dir is not None:
        again = read_test_metrics(repeat_dir)
        differ = [m for m in METRIC_NAMES if not _same(now.get(m), again.get(m))]
        if differ:
            ok = False
            print(f"FAILED: a second run ({repeat_dir}) of the same profile differs in: {', '.join(differ)}")
            for m in differ:
                print(f"  {m}: {now.get(m)!r} vs {again.get(m)!r}")
        else:
            print(f"repeat: {repeat_dir} gives identical metrics")
    if ok:
        print("CI metrics check passed")
    return ok


def _same(a: Any, b: Any) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def write_baseline(now_dir: Path, params_file: Path) -> Path:
    """Make the test metrics of the CI run in `now_dir` the committed baseline."""
    params = load_params(params_file)
    record_file = Path(now_dir) / RUN_RECORD
    record = json.loads(record_file.read_text()) if record_file.exists() else {}
    if record.get("overrides") != list(params.ci.overrides):
        raise MdkatError(
            f"{now_dir}: this run used the overrides {record.get('overrides')}, not ci.overrides "
            f"{list(params.ci.overrides)}; a baseline must come from the profile itself"
        )
    path = params_file.parent / params.ci.baseline
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"overrides": list(params.ci.overrides), "test": read_test_metrics(now_dir)})
    return path


def execute_notebook(project: Path, notebook: Path = NOTEBOOK, timeout_s: int = 600) -> Path:
    """Run every cell of the project's comparison notebook against its runs; save the executed copy."""
    import nbclient
    import nbformat

    project = Path(project).resolve()
    path = project / notebook
    nb = nbformat.read(path, as_version=4)
    previous = {k: os.environ.get(k) for k in ("MDKAT_PROJECT", "MLFLOW_TRACKING_URI")}
    os.environ["MDKAT_PROJECT"] = str(project)  # the kernel inherits the environment
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        client = nbclient.NotebookClient(
            nb, timeout=timeout_s, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
        )
        try:
            client.execute()
        except nbclient.exceptions.CellExecutionError as e:
            raise MdkatError(f"{path}: a cell failed:\n{e}") from None
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    executed = path.with_name(path.stem + ".executed.ipynb")
    with atomic_open(executed) as f:
        f.write(nbformat.writes(nb).encode())
    return executed


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m mdkat.ci run|check|baseline|notebook ...`; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m mdkat.ci", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="the project's parameter file")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="dvc repro of the CI profile in a fresh copy of the project")
    p.add_argument(
        "--out",
        required=True,
        action="append",
        help="folder for the copy (replaced); twice: two runs at once",
    )
    p.add_argument("-S", "--set", dest="extra", action="append", default=[], help="more overrides")
    p = sub.add_parser("check", help="compare a CI run with the baseline; exit 1 on a regression")
    p.add_argument("--now", required=True, help="folder of a CI run")
    p.add_argument("--repeat", help="folder of a second run of the same profile: must be identical")
    p = sub.add_parser("baseline", help="make a CI run's test metrics the committed baseline")
    p.add_argument("--now", required=True, help="folder of a CI run of the profile itself")
    p = sub.add_parser("notebook", help="execute the comparison notebook against a CI run")
    p.add_argument("--project", required=True, help="folder of a CI run")
    p = sub.add_parser("spread", help="the profile's test metrics over training seeds (for the tolerances)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1111, 1112, 1113, 1114, 1115])
    p.add_argument("--work", default=".ci-runs/spread", help="working folder (replaced)")
    p.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args(argv)
    params_file = Path(args.params).resolve()
    try:
        if args.command == "run":
            run_all([Path(o) for o in args.out], args.extra, params_file.parent)
        elif args.command == "check":
            return 0 if check(Path(args.now), params_file, Path(args.repeat) if args.repeat else None) else 1
        elif args.command == "baseline":
            print(f"baseline written: {write_baseline(Path(args.now), params_file)}")
        elif args.command == "spread":
            work = Path(args.work)
            shutil.rmtree(work, ignore_errors=True)
            result = spread(params_file, args.seeds, work)
            for metric, s in result["summary"].items():
                tolerance = BY_NAME[metric].ci_tolerance
                print(
                    f"{metric:<10} mean {s['mean']:.4f}  std {s['std']:.4f}  3 std {s['three_std']:.4f}  "
                    f"tolerance now {tolerance:.4f}"
                )
            if args.json:
                write_json(args.json, result)
        else:
            print(f"notebook executed: {execute_notebook(Path(args.project))}")
    except MdkatError as e:
        print(f"mdkat.ci {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
