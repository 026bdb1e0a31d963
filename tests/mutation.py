"""Mutation testing of the core modules (`make mutation`): cosmic-ray mutates one module at a time, each
against its own test files, in a copy of the project (cosmic-ray edits the files it mutates); the report
counts killed, survived and timed-out mutants per module.

    python -m tests.mutation --out reports/mutation [--only metrics,align] [--timeout 120]

Writes `<out>/mutation.json` (every mutant: module, operator, position, outcome, diff of the survivors)
and `<out>/mutation.md` (per module: mutants, killed, survived, timed out, kill rate; the survivors'
diffs). A survivor that changes nothing a user could see stays listed, with the reason in
`<out>/accepted.yaml` (`target: {"operator#occurrence": reason}`), which the table counts apart.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import yaml

from mdkat.ci import project_files
from mdkat.io import atomic_open, write_json

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_SEED = 16  # fixed: a sample is the same on every machine and every run of the same code


class Target(NamedTuple):
    """Files mutated together, the tests every mutant runs, and those a `--recheck` of a survivor runs
    (the same when empty; the whole of a test file whose slow part `tests` leaves out)."""

    files: list[str]
    tests: list[str]
    recheck: list[str] = []


# The tests of each module; where its own file runs for minutes (a real `dvc repro`, a PostgreSQL server),
# every mutant runs the fast tests and only the survivors all of them (`--recheck`), so a run ends in hours.
_CI_FAST = [
    "every_metric_has_a_positive_tolerance",
    "verdicts_follow_each_metrics_direction_and_tolerance",
    "check_fails_on_regression_and_on_unequal_repeats",
    "a_baseline_of_another_profile_is_refused",
    "profile_parameters_apply_the_overrides_then_the_extra_ones",
    "project_files_are_the_tracked_and_untracked_files_not_the_ignored_ones",
]
_TRACKING_SERVER = [  # a real mlflow server on PostgreSQL, or a degraded one that takes a minute to fail
    "two_processes_log_at_once_to_a_shared_tracking_server",
    "the_health_check_passes_credentials_in_the_server_uri",
    "a_degraded_tracking_server_ends_training_within_a_minute_in_one_line",
]
TARGETS: dict[str, Target] = {
    "metrics": Target(["mdkat/metrics.py"], ["tests/test_metrics.py"]),
    "align": Target(["mdkat/data/align.py"], ["tests/test_align.py"]),
    "csd": Target(["mdkat/data/csd.py"], ["tests/test_csd.py"]),
    "mmsa": Target(["mdkat/data/mmsa.py"], ["tests/test_mmsa.py"]),
    "prepared": Target(["mdkat/data/prepared.py"], ["tests/test_prepared.py"]),
    "training": Target(["mdkat/training.py"], ["tests/test_training.py"]),
    "models": Target(
        [f"mdkat/models/{m}.py" for m in ("losses", "encoders", "cff", "amsa", "ka", "kt", "mdkat")],
        ["tests/test_model_components.py", "tests/test_models.py"],
    ),
    "tuning": Target(["mdkat/tuning.py"], ["tests/test_tuning.py"]),
    "tracking": Target(
        ["mdkat/tracking.py"],
        [
            "tests/test_tracking.py",
            *(a for t in _TRACKING_SERVER for a in ("--deselect", f"tests/test_tracking.py::test_{t}")),
        ],
        ["tests/test_tracking.py"],
    ),
    "ci": Target(
        ["mdkat/ci.py"],
        [f"tests/test_ci.py::test_{t}" for t in _CI_FAST],
        ["tests/test_ci.py"],
    ),
}


def _test_command(tests: list[str]) -> list[str]:
    # -x: the first failing test kills the mutant; `env` sets one torch thread (no shell runs the command)
    return [
        "env",
        "OMP_NUM_THREADS=1",
        sys.executable,
        "-m",
        "pytest",
        "-x",
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",  # plugins the tests do not use cost a second of start-up per mutant
        "no:hydra_pytest",
        "-p",
        "no:anyio",
        *tests,
    ]


def _config(module: str, tests: list[str], timeout_s: float) -> str:
    return (
        "[cosmic-ray]\n"
        f'module-path = "{module}"\n'
        f"timeout = {timeout_s}\n"
        "excluded-modules = []\n"
        f'test-command = "{" ".join(_test_command(tests))}"\n'
        '[cosmic-ray.distributor]\nname = "local"\n'
    )


def _cosmic_ray(*args: str, cwd: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "cosmic_ray.cli", *args], cwd=cwd, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"cosmic-ray {' '.join(args)} failed:\n{done.stderr[-3000:]}")


def _leave_out_all_but_a_sample(session: Path, fraction: float, module: str) -> None:
    """Mark all but a seeded `fraction` of the session's mutants skipped, so that `exec` runs the sample.

    The draw depends on the module and the mutants alone (cosmic-ray's job ids are random uuids), so the
    same code gives the same sample on every machine.
    """
    import random

    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    with use_db(str(session), WorkDB.Mode.open) as db:
        items = sorted(db.work_items, key=lambda w: (w.mutations[0].operator_name, w.mutations[0].occurrence))
        keep = round(len(items) * fraction)
        chosen = set(random.Random(f"{SAMPLE_SEED}:{module}").sample(range(len(items)), keep))
        left = [w.job_id for i, w in enumerate(items) if i not in chosen]
        db.set_multiple_results(left, WorkResult(worker_outcome=WorkerOutcome.SKIPPED))


def mutate(name: str, copy: Path, timeout_s: float, sample: float = 1.0) -> list[dict]:
    """The mutants of target `name` (a seeded `sample` of them) run against its tests in `copy`; one record
    per mutant, those not drawn with outcome "skipped"."""
    from cosmic_ray.work_db import WorkDB, use_db

    files, tests, _ = TARGETS[name]
    records = []
    for module in files:
        config = copy / f".mutation-{Path(module).stem}.toml"
        session = copy / f".mutation-{Path(module).stem}.sqlite"
        config.write_text(_config(module, tests, timeout_s))
        session.unlink(missing_ok=True)
        _cosmic_ray("init", str(config), str(session), cwd=copy)
        if sample < 1.0:
            _leave_out_all_but_a_sample(session, sample, module)
        start = time.perf_counter()
        _cosmic_ray("exec", str(config), str(session), cwd=copy)
        print(f"{module}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        with use_db(str(session), WorkDB.Mode.open) as db:
            for item, result in db.completed_work_items:
                (mutation,) = item.mutations
                timed_out = "timeout" in (result.output or "").lower()
                outcome = "timeout" if timed_out else (result.test_outcome or result.worker_outcome).value
                # "skipped": not in the sample
                records.append(
                    {
                        "target": name,
                        "module": module,
                        "operator": mutation.operator_name,
                        "occurrence": mutation.occurrence,
                        "line": mutation.start_pos[0],
                        "outcome": outcome,
                        "diff": result.diff if outcome == "survived" else None,
                    }
                )
    return records


def recheck(
    records: list[dict], copy: Path, timeout_s: float, accepted: dict[str, dict[str, str]] | None = None
) -> None:
    """Run each survivor of `records` again against the current tests (after tests were added), in place;
    those `accepted` as invisible stay as they are (a type annotation runs every test to the end)."""
    for r in records:
        if r["outcome"] != "survived" or _key(r) in (accepted or {}).get(r["target"], {}):
            continue
        original = (copy / r["module"]).read_bytes()
        try:
            _cosmic_ray("apply", r["module"], r["operator"], str(r["occurrence"]), cwd=copy)
            target = TARGETS[r["target"]]
            command = _test_command(target.recheck or target.tests)
            done = subprocess.run(command, cwd=copy, capture_output=True, timeout=timeout_s)
            r["outcome"] = "killed" if done.returncode != 0 else "survived"
        except subprocess.TimeoutExpired:
            r["outcome"] = "timeout"
        finally:
            (copy / r["module"]).write_bytes(original)
        if r["outcome"] != "survived":
            r["diff"], r["rechecked"] = None, True


def _key(record: dict) -> str:
    """A mutant's name in accepted.yaml: its operator and occurrence, unique within its module; prefixed
    with the file's name where a target mutates several files (`encoders.py:core/...#3`)."""
    key = f"{record['operator']}#{record['occurrence']}"
    target = TARGETS.get(record["target"])
    return f"{Path(record['module']).name}:{key}" if target and len(target.files) > 1 else key


def summarize(records: list[dict], accepted: dict[str, dict[str, str]]) -> list[dict]:
    """Per target: mutants, killed, survived (and of them accepted as invisible), timed out, kill rate.

    The kill rate counts timed-out mutants as killed (a hang fails the suite through its timeout) and
    leaves out the incompetent ones (mutants that cannot even be imported) and the accepted survivors.
    """
    rows = []
    for name in dict.fromkeys(r["target"] for r in records):
        mine = [r for r in records if r["target"] == name]
        count = {
            k: sum(r["outcome"] == k for r in mine)
            for k in ("killed", "survived", "timeout", "incompetent", "skipped")
        }
        ok = accepted.get(name, {})
        waved = sum(1 for r in mine if r["outcome"] == "survived" and _key(r) in ok)
        judged = count["killed"] + count["timeout"] + count["survived"] - waved
        caught = count["killed"] + count["timeout"]
        rate = caught / judged if judged else float("nan")
        # a sample's rate is an estimate: Wilson's 95 % interval says how far the whole module may lie
        low, high = wilson_interval(caught, judged) if count["skipped"] else (rate, rate)
        rows.append(
            {
                "target": name,
                "mutants": len(mine),
                **count,
                "accepted": waved,
                "kill_rate": rate,
                "kill_rate_95": [low, high],
            }
        )
    return rows


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson's score interval of a binomial proportion (95 % for the default z)."""
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5
    return max(0.0, centre - half), min(1.0, centre + half)


def _markdown(rows: list[dict], records: list[dict], accepted: dict[str, dict[str, str]]) -> str:
    lines = [
        "# Mutation testing (cosmic-ray, `make mutation`)",
        "",
        "Each module mutated against its own tests (`tests/mutation.py`, TARGETS). Kill rate = (killed +",
        "timed out) / (mutants that import, less the survivors accepted as invisible in accepted.yaml).",
        "",
        "A module run on a seeded sample (`--sample`) shows the mutants not drawn as 'not run' and its",
        "kill rate with Wilson's 95 % interval.",
        "",
        "| module | mutants | not run | killed | timed out | survived | accepted | incompetent | kill rate |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        rate = f"{r['kill_rate']:.1%}"
        if r.get("skipped"):
            low, high = r["kill_rate_95"]
            rate += f" ({low:.0%}-{high:.0%})"
        lines.append(
            f"| {r['target']} | {r['mutants']} | {r.get('skipped', 0)} | {r['killed']} | {r['timeout']} | "
            f"{r['survived']} | {r['accepted']} | {r['incompetent']} | {rate} |"
        )
    lines += ["", "## Survivors", ""]
    for r in records:
        if r["outcome"] != "survived":
            continue
        reason = accepted.get(r["target"], {}).get(_key(r))
        lines += [
            f"### {r['module']}:{r['line']} {r['operator']}" + (f" (accepted: {reason})" if reason else "")
        ]
        lines += ["```diff", (r["diff"] or "").strip(), "```", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.mutation", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="reports/mutation", help="folder of mutation.json / mutation.md")
    p.add_argument("--only", default=",".join(TARGETS), help=f"comma-separated targets of {list(TARGETS)}")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per mutant's test run")
    p.add_argument(
        "--sample",
        type=float,
        default=1.0,
        help="run a seeded fraction (0-1] of each module's mutants; the rate gets a 95%% interval",
    )
    p.add_argument(
        "--recheck",
        action="store_true",
        help="only run the last report's survivors again (after adding tests), less the accepted ones",
    )
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(TARGETS))
    if unknown:
        p.error(f"--only: unknown targets {unknown}; expected some of {list(TARGETS)}")
    if not 0 < args.sample <= 1:
        p.error(f"--sample: expected a fraction in (0, 1], got {args.sample}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    accepted_file = out / "accepted.yaml"
    accepted = yaml.safe_load(accepted_file.read_text()) if accepted_file.exists() else {}
    previous = json.loads((out / "mutation.json").read_text()) if (out / "mutation.json").exists() else []
    records = [r for r in previous if r["target"] not in names]  # other targets keep their last run
    with tempfile.TemporaryDirectory(prefix="mdkat-mutation-") as tmp:
        copy = Path(tmp)
        for rel in project_files(ROOT):
            (copy / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, copy / rel)
        if args.recheck:
            records = previous
            recheck([r for r in records if r["target"] in names], copy, args.timeout, accepted)
            write_json(out / "mutation.json", records)
        for name in [] if args.recheck else names:
            records += mutate(name, copy, args.timeout, args.sample)
            write_json(out / "mutation.json", records)  # a long run keeps what it has so far
    order = list(TARGETS)  # the table in TARGETS' order, whichever targets this run replaced
    records.sort(key=lambda r: order.index(r["target"]) if r["target"] in order else len(order))
    write_json(out / "mutation.json", records)
    rows = summarize(records, accepted or {})
    with atomic_open(out / "mutation.md") as f:
        f.write(_markdown(rows, records, accepted or {}).encode())
    for r in rows:
        print(f"{r['target']}: {r['kill_rate']:.1%} of {r['mutants']} mutants killed", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
