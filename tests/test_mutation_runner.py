"""The mutation-testing runner (`tests/mutation.py`): its sample, its counts and its interval."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.mutation import _config, _leave_out_all_but_a_sample, summarize, wilson_interval

MODULE = """def sign(x):
    if x > 0:
        return 1
    if x < 0:
        return -1
    return 0


def clip(x, low=0, high=10):
    return min(max(x, low), high)
"""


def test_wilson_interval_matches_published_values():
    # 8 of 10 by hand: centre (0.8 + 3.8415/20) / 1.38415 = 0.7167, half-width 1.96 / 1.38415 * 0.16 =
    # 0.2266, so [0.4902, 0.9433] (statsmodels' proportion_confint(8, 10, method="wilson") agrees)
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0) and wilson_interval(0, 10)[0] == pytest.approx(
        0.0
    )
    low, high = wilson_interval(0, 10)  # no success: the upper bound is z^2 / (n + z^2)
    assert high == pytest.approx(1.959964**2 / (10 + 1.959964**2))


def test_the_rate_leaves_out_accepted_incompetent_and_not_drawn_mutants():
    def rec(outcome, occurrence):
        return {"target": "m", "operator": "op", "occurrence": occurrence, "outcome": outcome}

    outcomes = ["killed"] * 6 + ["timeout"] * 2 + ["survived"] * 3 + ["incompetent", "skipped", "skipped"]
    records = [rec(o, i) for i, o in enumerate(outcomes)]
    (row,) = summarize(records, {"m": {"op#8": "invisible"}})  # occurrence 8 is the first survivor
    assert (row["mutants"], row["skipped"], row["accepted"], row["incompetent"]) == (14, 2, 1, 1)
    assert row["kill_rate"] == 8 / 10  # (6 killed + 2 timed out) / (6 + 2 + 3 - 1 accepted)
    assert row["kill_rate_95"] == pytest.approx(list(wilson_interval(8, 10)))
    (full,) = summarize([r for r in records if r["outcome"] != "skipped"], {})
    assert full["kill_rate"] == 8 / 11 and full["kill_rate_95"] == [8 / 11, 8 / 11]  # no sample, no interval


def _session(tmp_path, name):
    from cosmic_ray.work_db import WorkDB, use_db

    (tmp_path / "toy.py").write_text(MODULE)
    config, session = tmp_path / f"{name}.toml", tmp_path / f"{name}.sqlite"
    config.write_text(_config("toy.py", ["-k", "nothing"], 10))
    subprocess.run(
        [sys.executable, "-m", "cosmic_ray.cli", "init", str(config), str(session)],
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    _leave_out_all_but_a_sample(session, 0.25, "toy.py")
    with use_db(str(session), WorkDB.Mode.open) as db:
        every = {(w.mutations[0].operator_name, w.mutations[0].occurrence) for w in db.work_items}
        pending = {(w.mutations[0].operator_name, w.mutations[0].occurrence) for w in db.pending_work_items}
    return every, pending


def test_a_sample_is_the_same_fraction_and_the_same_mutants_in_every_session(tmp_path):
    every, first = _session(tmp_path, "a")
    again_every, again = _session(tmp_path, "b")  # new random job ids, same mutants
    assert len(every) > 20 and again_every == every
    assert len(first) == round(len(every) * 0.25) and first <= every
    assert again == first


def test_a_survivor_of_a_target_of_several_files_is_named_with_its_file():
    from tests.mutation import _key

    one = {"target": "align", "module": "mdkat/data/align.py", "operator": "core/X", "occurrence": 3}
    several = {"target": "models", "module": "mdkat/models/ka.py", "operator": "core/X", "occurrence": 3}
    assert _key(one) == "core/X#3" and _key(several) == "ka.py:core/X#3"
    # the same operator and occurrence in two files of one target are two mutants, accepted one by one
    other = {**several, "module": "mdkat/models/kt.py", "outcome": "survived"}
    rows = summarize([{**several, "outcome": "survived"}, other], {"models": {"ka.py:core/X#3": "why"}})
    assert rows[0]["accepted"] == 1 and rows[0]["kill_rate"] == 0.0
