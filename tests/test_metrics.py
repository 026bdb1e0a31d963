"""regression_metrics against values computed by hand."""

import json
import math

import numpy as np
import pytest

from mdkat.io import write_json
from mdkat.metrics import METRIC_NAMES, METRICS, is_better, regression_metrics, worsening


def test_binary_metrics_and_weighted_f1_by_hand():
    t = [1, 2, -1, -2, 0, 0.4]
    p = [1, -1, -1, 0, -0.5, 0]
    m = regression_metrics(p, t)
    # Has0: t>=0 = 110011, p>=0 = 100101 -> 3 of 6 agree.
    assert m["acc2_has0"] == pytest.approx(0.5)
    # positive class: P=2/3 R=1/2 F1=4/7 (support 4); negative: P=1/3 R=1/2 F1=2/5 (support 2).
    assert m["f1_has0"] == pytest.approx((4 * 4 / 7 + 2 * 2 / 5) / 6)
    # Non0 drops the zero label; zero predictions count as negative: t>0 = 11001, p>0 = 10000.
    assert m["acc2_non0"] == pytest.approx(3 / 5)
    # positive: P=1 R=1/3 F1=1/2 (support 3); negative: P=1/2 R=1 F1=2/3 (support 2).
    assert m["f1_non0"] == pytest.approx((3 * 1 / 2 + 2 * 2 / 3) / 5)
    assert m["mae"] == pytest.approx(5.9 / 6)


def test_mae_acc7_acc5_by_hand():
    p = [0.5, -0.5, 1.5, 2.5, -2.6, 0.0, 4.0]
    t = [1.0, -1.0, 2.0, 2.0, -3.0, 0.0, 3.0]
    m = regression_metrics(p, t)
    assert m["mae"] == pytest.approx((0.5 + 0.5 + 0.5 + 0.5 + 0.4 + 0 + 1.0) / 7)
    # rounded predictions 0,0,2,2,-3,0,3 vs labels 1,-1,2,2,-3,0,3
    assert m["acc7"] == pytest.approx(5 / 7)
    # clipped to +-2: predictions 0,0,2,2,-2,0,2 vs labels 1,-1,2,2,-2,0,2
    assert m["acc5"] == pytest.approx(5 / 7)


def test_acc5_clips_negative_labels_at_minus_2_and_acc2_splits_at_zero():
    m = regression_metrics([-2.4, -1.2, 1.0], [-3.0, -1.0, 1.0])
    assert m["acc5"] == 1.0  # -2.4 and -3 both become -2; -1.2 rounds to -1
    # predictions beyond the label range are clipped before rounding: -3.6 and 3.6 count as -3 and 3
    assert regression_metrics([-3.6, 3.6], [-3.0, 3.0])["acc7"] == 1.0
    # labels between -1 and 1 keep their sign: Non0 keeps -0.5 and 0.5 and gets both right, and Has0
    # counts 0 and 0.5 as non-negative
    m = regression_metrics([-1.0, 1.0, 0.3], [-0.5, 0.5, 0.0])
    assert m["acc2_non0"] == 1.0 and m["acc2_has0"] == 1.0


def test_ties_round_half_to_even():
    p = [0.5, 1.5, 2.5, -0.5, -1.5, -2.5]
    assert regression_metrics(p, [0, 2, 2, 0, -2, -2])["acc7"] == 1.0
    m = regression_metrics(p, [1, 1, 3, -1, -1, -3])
    assert m["acc7"] == 0.0
    # with clip +-2 the labels 3 and -3 become 2 and -2, which 2.5 and -2.5 round to
    assert m["acc5"] == pytest.approx(2 / 6)


def test_pearson_by_hand():
    assert regression_metrics([1, 2, 3], [1, 3, 2])["corr"] == pytest.approx(0.5)
    assert regression_metrics([1, 2, 3], [3, 2, 1])["corr"] == pytest.approx(-1.0)
    # variances other than 1 (the formula must divide by both standard deviations):
    # centred p = (-4, -1, 5)/3, t = (-2, 2, 0); cov = 1, var p = 7/3, var t = 4
    assert regression_metrics([0, 1, 3], [2, 6, 4])["corr"] == pytest.approx(0.5 / math.sqrt(7 / 3))
    # t = (1, 4, 2): centred (-4, 5, -1)/3; cov = 1/3, var p = var t = 7/3
    assert regression_metrics([0, 1, 3], [1, 4, 2])["corr"] == pytest.approx(1 / 7)


def test_is_better_follows_each_metrics_direction_and_ties_do_not_improve():
    assert is_better("mae", 0.5, 0.6) and not is_better("mae", 0.6, 0.6) and not is_better("mae", 0.7, 0.6)
    assert is_better("corr", 0.7, 0.6) and not is_better("corr", 0.6, 0.6) and not is_better("corr", 0.5, 0.6)
    assert is_better("acc2_non0", 0.1, None) and not is_better("mae", math.nan, None)


def test_worsening_is_signed_in_each_metrics_own_units():
    assert worsening("mae", 1.3, 0.5) == pytest.approx(0.8)  # higher MAE: worse
    assert worsening("mae", 0.5, 1.3) == pytest.approx(-0.8)
    assert worsening("corr", 0.5, 0.7) == pytest.approx(0.2)  # lower Corr: worse
    assert worsening("acc7", 0.9, 0.4) == pytest.approx(-0.5)


def test_only_mae_is_lower_is_better():
    assert [m.name for m in METRICS if m.lower_is_better] == ["mae"]


def test_ci_tolerances_are_small_positive_fractions():
    # 3 seed standard deviations of the CI profile: a few points at most, or the gate lets a broken model
    # through (a model without text loses more than 0.1 MAE on the profile)
    assert all(0 < m.ci_tolerance < 0.1 for m in METRICS)


def test_constant_prediction_gives_nan_corr_written_as_null(tmp_path):
    with pytest.warns(UserWarning, match="corr is undefined"):
        m = regression_metrics([0.3, 0.3, 0.3], [1, -1, 2])
    assert math.isnan(m["corr"])
    assert m["acc2_has0"] == pytest.approx(2 / 3)
    write_json(tmp_path / "m.json", m)
    assert json.loads((tmp_path / "m.json").read_text())["corr"] is None


def test_all_zero_labels_give_nan_non0():
    with pytest.warns(UserWarning, match="corr is undefined"):
        m = regression_metrics([0.5, -0.5], [0.0, 0.0])
    assert math.isnan(m["acc2_non0"]) and math.isnan(m["f1_non0"])
    assert m["acc2_has0"] == 0.5


def test_keys_and_bad_input():
    m = regression_metrics(np.array([[0.1], [0.2]]), np.array([0.0, 1.0]))
    assert tuple(m) == METRIC_NAMES
    with pytest.raises(ValueError, match="2 predictions for 3 labels"):
        regression_metrics([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        regression_metrics([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="finite"):
        regression_metrics([np.nan, 1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="no samples"):
        regression_metrics([], [])
    with pytest.warns(UserWarning, match="corr is undefined"):
        assert regression_metrics([0.5], [1.0])["mae"] == 0.5  # one sample: metrics, but no correlation
