"""The ablation and multi-seed report: statistics against hand computations, resume, fingerprints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from mdkat.checks import load_checked
from mdkat.config import ConfigError, load_params, with_values
from mdkat.data.prepare import prepare
from mdkat.metrics import METRIC_NAMES
from mdkat.models import REGISTRY, config_of
from mdkat.models.mdkat import MDKAT
from mdkat.report import _reading, code_digest, fingerprint, holm, report, run_params, summarize
from tests.conftest import ROOT, small_data


def _runs(values: dict[str, list[float]]) -> pd.DataFrame:
    """A runs table with every metric of a variant equal to its list (one value per seed)."""
    rows = []
    for variant, per_seed in values.items():
        for seed, value in enumerate(per_seed, 1):
            rows.append({"variant": variant, "seed": seed, **{m: value for m in METRIC_NAMES}})
    return pd.DataFrame(rows)


def test_summary_matches_hand_computed_paired_t_test():
    # differences 1, 2, 3: mean 2, sd 1, t = 2 / (1 / sqrt 3) = 2 sqrt 3 with 2 degrees of freedom, where
    # the two-sided p-value has the closed form 1 - |t| / sqrt(t^2 + 2) = 1 - sqrt(12 / 14)
    runs = _runs({"mdkat": [10.0, 20.0, 30.0], "no_ka": [11.0, 22.0, 33.0]})
    table = summarize(runs, alpha=0.05, reference="mdkat")
    row = table[(table.variant == "no_ka") & (table.metric == "mae")].iloc[0]
    assert row["mean"] == pytest.approx(22.0)
    assert row["std"] == pytest.approx(11.0)  # sample std of 11, 22, 33
    assert row["diff"] == pytest.approx(2.0)
    assert row["diff_std"] == pytest.approx(1.0)
    assert row["p_value"] == pytest.approx(1 - math.sqrt(12 / 14), rel=1e-9)
    assert not row["significant"]  # p = 0.074
    reference = table[table.variant == "mdkat"]
    assert reference["diff"].isna().all() and reference["p_value"].isna().all()
    assert len(table) == 2 * len(METRIC_NAMES)


def test_identical_variants_are_not_significant_and_a_consistent_gap_is():
    table = summarize(
        _runs({"mdkat": [1.0, 2.0, 4.0], "no_kt": [1.0, 2.0, 4.0], "no_cff": [1.5, 2.49, 4.51]}),
        alpha=0.05,
        reference="mdkat",
    )
    same = table[(table.variant == "no_kt") & (table.metric == "corr")].iloc[0]
    assert same["diff"] == 0.0 and same["p_value"] == 1.0 and not same["significant"]
    gap = table[(table.variant == "no_cff") & (table.metric == "corr")].iloc[0]
    assert gap["diff"] == pytest.approx(0.5) and gap["significant"]


def test_holm_adjusts_by_rank_and_keeps_the_order():
    # sorted 0.01, 0.03, 0.04 of m = 3: 3 x 0.01 = 0.03, 2 x 0.03 = 0.06, then max(0.06, 1 x 0.04) = 0.06
    adjusted = holm(np.array([0.01, 0.04, math.nan, 0.03]))
    assert adjusted[[0, 1, 3]] == pytest.approx([0.03, 0.06, 0.06]) and math.isnan(adjusted[2])
    assert holm(np.array([0.6, 0.9])) == pytest.approx([1.0, 1.0])  # capped at 1


def test_a_single_marginal_difference_is_no_verdict_on_its_module():
    params = load_checked(ROOT / "params.yaml", variants=True)
    base = [1.0, 2.0, 4.0, 3.0, 5.0]
    runs = _runs({"mdkat": base, "no_cff": base, "no_ka": base})
    # CFF: Acc-5 lower on every seed by a margin that a lone t-test calls significant (p about 0.02), but
    # not among the 16 comparisons of the table
    runs.loc[runs.variant == "no_cff", "acc5"] -= [0.1, 0.12, 0.08, 0.15, 0.05]
    table = summarize(runs, alpha=0.05, reference="mdkat")
    row = table[(table.variant == "no_cff") & (table.metric == "acc5")].iloc[0]
    assert row.significant and row.p_holm >= 0.05
    lines = {line.split(":")[0]: line for line in _reading(table, params).splitlines()}
    assert "worse than MDKAT (all modules) in Acc-5" in lines["- w/o CFF"]
    assert lines["- w/o CFF"].endswith("nothing survives Holm's correction, no firm evidence either way.")


def test_the_reading_names_what_each_module_contributes():
    params = load_checked(ROOT / "params.yaml", variants=True)
    base, noise = [1.0, 2.0, 4.0], [0.0, 0.01, -0.01]
    runs = _runs({"mdkat": base, "no_ka": base, "no_amsa": base, "no_kt": base, "late_fusion": base})
    lower = [m for m in METRIC_NAMES if m == "mae"]
    for variant, sign in (("no_amsa", 1.0), ("late_fusion", 1.0), ("no_kt", -1.0)):
        # worse (sign +1) or better (sign -1) in every metric: MAE up means worse, anything else down does
        for metric in METRIC_NAMES:
            step = 0.5 if metric in lower else -0.5
            runs.loc[runs.variant == variant, metric] += [sign * step + n for n in noise]
    text = _reading(summarize(runs, alpha=0.05, reference="mdkat"), params)
    lines = {line.split(":")[0]: line for line in text.splitlines() if line.startswith("- ")}
    assert lines["- w/o AMSA"].endswith("the module helps.") and "MAE +0.500" in lines["- w/o AMSA"]
    assert lines["- w/o KT"].endswith("the model does better without the module.")
    assert "MAE -0.500" in lines["- w/o KT"] and "worse" not in lines["- w/o KT"]
    assert lines["- w/o KA"].endswith("no measurable effect with these seeds and this budget.")
    # the baseline is not an ablation: compared, but no module is named
    assert lines["- late fusion (baseline)"].startswith("- late fusion (baseline): worse than MDKAT")
    assert "the module" not in lines["- late fusion (baseline)"]
    assert "with 32 comparisons about 1.6 are expected" in text  # 4 variants x 8 metrics x 0.05


def test_run_params_apply_the_variant_seed_and_budget():
    params = load_checked(ROOT / "params.yaml", variants=True)
    assert set(params.report.variants) <= {*REGISTRY, *MDKAT.ABLATIONS}
    p = run_params(params, "no_decoupling", 1113)
    assert config_of(p).use_decoupling is False and config_of(p).use_cff is True
    assert p.train.seed == 1113
    assert (p.train.epochs, p.train.patience) == (params.report.budget.epochs, params.report.budget.patience)
    unbudgeted = with_values(params, {"report.budget.epochs": None, "report.budget.patience": None})
    q = run_params(unbudgeted, "late_fusion", 1111)
    assert q.model.name == "late_fusion"
    assert (q.train.epochs, q.train.patience) == (params.train.epochs, params.train.patience)
    # what the result depends on is in the fingerprint; where it is tracked is not
    assert fingerprint(p, "x") != fingerprint(run_params(params, "no_decoupling", 1114), "x")
    assert fingerprint(p, "x") != fingerprint(p, "y")
    assert fingerprint(p, "x") == fingerprint(with_values(p, {"mlflow.experiment": "other"}), "x")
    # and so is the code that shapes a run: results never outlive the code that made them
    assert fingerprint(p, "x", code="a") != fingerprint(p, "x", code="b")
    assert fingerprint(p, "x") == fingerprint(p, "x", code=code_digest(p.model.name))


@pytest.fixture
def tiny(tmp_path):
    data = tmp_path / "data"
    prepare(small_data(), data)
    params = with_values(
        load_params(ROOT / "params.yaml"),
        {
            "data.synthetic.n_train": 24,
            "model.mdkat.width": 16,
            "model.mdkat.heads": 2,
            "model.late_fusion.width": 16,
            "model.late_fusion.heads": 2,
            "train.device": "cpu",
            "train.batch_size": 8,
            "report.variants": ["mdkat", "no_kt", "late_fusion"],
            "report.seeds": [1, 2],
            "report.budget.epochs": 1,
        },
    )
    return params, data


def test_report_writes_tables_and_resumes_only_what_is_missing(tiny, tmp_path, capsys):
    params, data = tiny
    out = tmp_path / "report"
    table = report(params, data, out, track=False)
    runs = pd.read_csv(out / "runs.csv")
    assert list(zip(runs.variant, runs.seed, strict=True)) == [
        (v, s) for v in ("mdkat", "no_kt", "late_fusion") for s in (1, 2)
    ]
    saved = json.loads((out / "runs" / "no_kt-2.json").read_text())
    assert runs[(runs.variant == "no_kt") & (runs.seed == 2)]["mae"].item() == pytest.approx(
        saved["test"]["mae"]
    )
    means = table.set_index(["variant", "metric"])["mean"]
    assert means[("late_fusion", "corr")] == pytest.approx(runs[runs.variant == "late_fusion"]["corr"].mean())
    text = (out / "ablation.md").read_text()
    assert "synthetic data" in text and "w/o KT" in text and "at most 1 epochs" in text
    # the diagnostics of every run: AMSA's AUC where there is an AMSA, KT's errors where there is a KT
    assert runs[runs.variant != "late_fusion"]["diag.amsa_cue_auc.text"].between(0, 1).all()
    assert runs[runs.variant == "no_kt"]["diag.kt_error.text"].isna().all()
    assert runs[runs.variant == "late_fusion"]["diag.amsa_cue_auc.text"].isna().all()
    assert saved["diagnostics"]["kt_error"] is None and saved["diagnostics"]["amsa_cue_auc"] is not None
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
    assert "Diagnostics against the generator's truth" in text
    assert rows["| late fusion (baseline)"].count("–") == 4  # AUC, both C_m probes, KT
    assert pd.read_csv(out / "ablation.csv").shape[0] == 3 * len(METRIC_NAMES)

    # an interrupted report: one unit lost; a re-run trains only that unit and keeps the others' results
    first = json.loads((out / "runs" / "mdkat-2.json").read_text())["test"]
    (out / "runs" / "mdkat-2.json").unlink()
    before = {p.name: p.read_text() for p in (out / "runs").glob("*.json")}
    capsys.readouterr()
    report(params, data, out, track=False)
    err = capsys.readouterr().err
    assert "1 of 6 runs to train" in err and err.count("done before") == 5 and "[1/1] mdkat-2: test" in err
    assert {p.name: p.read_text() for p in (out / "runs").glob("*.json") if p.name in before} == before
    # the retrained unit repeats its first result exactly (same seed, CPU)
    assert json.loads((out / "runs" / "mdkat-2.json").read_text())["test"] == first

    # a changed budget changes what the results mean: every unit is trained again
    capsys.readouterr()
    report(with_values(params, {"report.budget.epochs": 2}), data, out, track=False)
    assert "6 of 6 runs to train" in capsys.readouterr().err


def test_the_models_table_shares_runs_with_the_ablation_table_and_tags_each_run_with_its_model(tiny, store):
    params, data = tiny
    params = with_values(params, {"report.models": ["mdkat", "tfn", "self_mm"], "report.variants": ["mdkat"]})
    out = store_dir = Path(store.removeprefix("sqlite:///")).parent / "report"
    report(params, data, out)  # the ablation table: mdkat x 2 seeds
    trained = {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    summary = report(params, data, out, table="models")
    # mdkat's runs are the ablation table's: not trained again
    assert {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("mdkat-*.json")} == trained
    runs = pd.read_csv(out / "models_runs.csv")
    assert list(zip(runs.variant, runs.seed, strict=True)) == [
        (v, s) for v in ("mdkat", "tfn", "self_mm") for s in (1, 2)
    ]
    assert (out / "runs.csv").exists() and pd.read_csv(out / "runs.csv").variant.unique().tolist() == [
        "mdkat"
    ]
    assert set(summary.variant) == {"mdkat", "tfn", "self_mm"}
    page = (out / "models.md").read_text()
    assert page.startswith("# Model comparison") and REGISTRY["tfn"].LABEL in page and "models.csv" in page
    assert "Ablation" not in page and "models compare" in page
    # a baseline is no ablation: its verdict says nothing of a module
    verdicts = [line for line in page.splitlines() if line.startswith(f"- {REGISTRY['tfn'].LABEL}: ")]
    assert len(verdicts) == 1 and "the module" not in verdicts[0]
    # one parent run per table; every child says which model it trained
    client = MlflowClient(store)
    children = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "tags.`report.table` = 'models'"
    )
    parents = {r.info.run_name: r for r in children if "mlflow.parentRunId" not in r.data.tags}
    assert set(parents) == {"report models"}
    kids = [
        r for r in children if r.data.tags.get("mlflow.parentRunId") == parents["report models"].info.run_id
    ]
    assert sorted((r.data.tags["model"], r.data.tags["report.seed"]) for r in kids) == [
        ("self_mm", "1"),
        ("self_mm", "2"),
        ("tfn", "1"),
        ("tfn", "2"),
    ]
    assert store_dir.exists()


def test_report_models_are_models_of_the_registry(root):
    with pytest.raises(ConfigError, match=r"'report.models' expected items of .*, got 'no_cff'"):
        load_checked(root / "params.yaml", ["report.models=[mdkat, no_cff]"], variants=True)


def test_variants_are_the_chosen_models_ablations_or_other_models(root):
    def load(*overrides):
        return load_checked(root / "params.yaml", overrides, variants=True)

    with pytest.raises(ConfigError, match=r"'report.variants' expected items of .*, got 'no_cfff'"):
        load("report.variants=[mdkat, no_cfff]")
    # late fusion has no ablations: MDKAT's are not its variants
    with pytest.raises(
        ConfigError, match=r"expected items of \['mdkat', 'late_fusion', 'tfn', .*\], got 'no_cff'"
    ):
        load("model.name=late_fusion")
    # ... but the train stage's checks do not read the report's list
    load_checked(root / "params.yaml", ["model.name=late_fusion"])


def test_worker_processes_give_the_results_of_one_process(tiny, tmp_path):
    params, data = tiny
    small = with_values(params, {"report.variants": ["mdkat", "late_fusion"], "report.seeds": [1]})
    one = report(small, data, tmp_path / "one", track=False)
    two = report(small, data, tmp_path / "two", workers=2, track=False)
    assert sorted(p.name for p in (tmp_path / "two" / "runs").glob("*.json")) == [
        "late_fusion-1.json",
        "mdkat-1.json",
    ]
    # one torch thread per worker: the same arithmetic up to the order of a few sums
    pd.testing.assert_frame_equal(one, two, check_exact=False, atol=1e-4)


def test_the_code_digest_follows_the_code_not_its_comments_or_docstrings():
    from mdkat.fingerprint import _code

    a = 'def f(x):\n    """Doc."""\n    return x + 1  # comment\n'
    b = '"""Module doc."""\n\n\ndef f(x):\n    """Other doc."""\n    # another comment\n    return x + 1\n'
    c = 'def f(x):\n    """Doc."""\n    return x + 2\n'
    assert _code(a) == _code(b) != _code(c)


def test_each_model_s_code_digest_reads_its_own_imports_and_not_the_other_models(tmp_path):
    from mdkat.fingerprint import model_files

    models = tmp_path / "mdkat" / "models"
    models.mkdir(parents=True)
    (models / "__init__.py").write_text("from mdkat.models.a import A\nfrom mdkat.models.c import C\n")
    (models / "a.py").write_text("from mdkat.models import shared\nfrom mdkat.models.b import f\nA = 1\n")
    (models / "b.py").write_text("import mdkat.models.shared\n\ndef f():\n    import torch\n")
    # shared.py imports from the package (__init__), which is never followed
    (models / "shared.py").write_text("from mdkat.models import model_class\nX = 0\n")
    (models / "c.py").write_text("C = 2\n")
    found = model_files(tmp_path / "mdkat", "mdkat.models.a")
    assert {p.name for p in found} == {"a.py", "b.py", "shared.py"}
    assert {p.name for p in model_files(tmp_path / "mdkat", "mdkat.models.c")} == {"c.py"}

    from mdkat.fingerprint import code_digest
    from mdkat.models import REGISTRY

    digests = {name: code_digest(name) for name in REGISTRY}
    assert len(set(digests.values())) == len(REGISTRY)  # each model its own code
    assert code_digest() not in digests.values()  # None: every model's code at once


def test_a_work_folder_of_another_configuration_is_emptied_before_it_takes_the_new_fingerprint(tmp_path):
    from mdkat.report import claim_work

    work = tmp_path / "work" / "mdkat-1"
    work.mkdir(parents=True)
    (work / "fingerprint").write_text("old")
    (work / "checkpoint.pt").write_bytes(b"a run of the old configuration")
    assert claim_work(work, "new") is False
    assert sorted(p.name for p in work.iterdir()) == ["fingerprint"]
    # killed before its first epoch, then run again: the same configuration, so it resumes (nothing yet)
    assert claim_work(work, "new") is True
    (work / "checkpoint.pt").write_bytes(b"a run of the new configuration")
    assert claim_work(work, "new") is True and (work / "checkpoint.pt").exists()
    assert claim_work(tmp_path / "work" / "fresh", "new") is False


def test_a_key_added_later_and_left_unset_keeps_earlier_fingerprints():
    from mdkat.fingerprint import identity

    params = load_params(ROOT / "params.yaml")
    assert params.data.tokenizer is None and "data.tokenizer" not in identity(params, "x")["params"]
    changed = load_params(ROOT / "params.yaml", ["data.tokenizer=/models/bert"])
    assert identity(changed, "x")["params"]["data.tokenizer"] == "/models/bert"
    assert fingerprint(changed, "x") != fingerprint(params, "x")
