"""The synthetic generator: shapes, determinism, and the planted structure, checked with statistics."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import RidgeCV

from mdkat import MODALITIES
from mdkat.config import PerModality
from mdkat.data.prepare import prepare
from mdkat.data.synthetic import STYLES, generate
from mdkat.metrics import regression_metrics
from tests.conftest import small_data


def _sized(n_train, n_valid, n_test, **syn_changes):
    cfg = small_data()
    sizes = {"n_train": n_train, "n_valid": n_valid, "n_test": n_test}
    syn = cfg.synthetic.model_copy(update={**sizes, **syn_changes})
    return cfg.model_copy(update={"synthetic": syn})


@pytest.fixture(scope="module")
def big():
    """Enough samples for stable statistics; text width reduced so that the read-outs stay cheap."""
    cfg = _sized(2000, 10, 1500, dims=PerModality(text=96, audio=5, vision=20))
    return generate(cfg)


def _pool(arrays, m, steps):
    """Mean of features over the steps marked True in `steps` (N, T)."""
    w = steps[..., None].astype(np.float64)
    return (arrays[m] * w).sum(1) / np.maximum(w.sum(1), 1)


def _valid(arrays, m):
    return np.arange(arrays[m].shape[1])[None, :] < arrays[f"{m}_len"][:, None]


def _fit_corr(x_train, y_train, x_test, y_test):
    """Test-split Pearson r of a ridge read-out (regularisation chosen on train)."""
    model = RidgeCV(alphas=np.logspace(-2, 4, 13)).fit(x_train, y_train)
    return float(np.corrcoef(model.predict(x_test), y_test)[0, 1])


def test_default_shapes_dtypes_and_padding():
    syn = generate(small_data())
    for split, n in (("train", 24), ("valid", 8), ("test", 10)):
        a = syn.splits[split]
        assert {m: a[m].shape for m in MODALITIES} == {
            "text": (n, 50, 768),
            "audio": (n, 50, 5),
            "vision": (n, 50, 20),
        }
        assert all(a[m].dtype == np.float32 and a[f"{m}_len"].dtype == np.int64 for m in MODALITIES)
        for m in MODALITIES:
            valid = _valid(a, m)
            assert not a[m][~valid].any(), "padding must be exactly zero"
            assert (np.abs(a[m][valid]).sum(-1) > 0).all()
        # aligned: one length for all modalities, and it varies between samples
        assert (a["audio_len"] == a["text_len"]).all() and (a["vision_len"] == a["text_len"]).all()
    lengths = np.concatenate([syn.splits[s]["text_len"] for s in syn.splits])
    assert lengths.min() >= 10 and lengths.max() <= 50 and len(np.unique(lengths)) > 5


def test_unaligned_option_has_its_own_time_grids():
    syn = generate(_sized(40, 4, 4, aligned=False))
    a = syn.splits["train"]
    assert (a["text"].shape[1], a["audio"].shape[1], a["vision"].shape[1]) == (50, 375, 500)
    ratio_a = a["audio_len"] / a["text_len"]
    ratio_v = a["vision_len"] / a["text_len"]
    assert np.all((ratio_a > 7.5 * 0.85) & (ratio_a < 7.5 * 1.15))
    assert np.all((ratio_v > 10 * 0.85) & (ratio_v < 10 * 1.15))
    for m in MODALITIES:
        assert not a[m][~_valid(a, m)].any()
        cue = syn.truth["train"].cue[m]
        assert not (cue & ~_valid(a, m)).any() and cue.any(1).all()
    assert syn.info["aligned"] is False


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    cfg = small_data()
    m1 = prepare(cfg, tmp_path / "a")
    m2 = prepare(cfg, tmp_path / "b")
    for name in ("train.npz", "valid.npz", "test.npz", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert m1 == m2
    m3 = prepare(cfg.model_copy(update={"seed": cfg.seed + 1}), tmp_path / "c")
    assert m3["files"]["train.npz"] != m1["files"]["train.npz"]


def test_split_sizes_do_not_change_other_splits():
    a = generate(_sized(20, 5, 5))
    b = generate(_sized(20, 5, 9))
    for key in ("text", "label", "audio_len"):
        np.testing.assert_array_equal(a.splits["train"][key], b.splits["train"][key])
    assert len(b.splits["test"]["label"]) == 9


def test_labels_lie_on_the_mosi_grid(big):
    label = big.splits["train"]["label"].astype(np.float64)
    raters = big.truth["train"].raters
    assert set(np.unique(raters)) == {3, 5}
    # a mean of 3 (5) integer ratings is a multiple of 1/3 (1/5)
    np.testing.assert_allclose(label * raters, np.round(label * raters), atol=1e-5)
    assert label.min() >= -3 and label.max() <= 3
    assert 0.02 < np.mean(label == 0) < 0.15
    assert 1.0 < label.std() < 1.8


def test_oracles_are_calibrated(big):
    test = big.splits["test"]["label"]
    full = regression_metrics(big.truth["test"].oracle, test)
    text = regression_metrics(big.truth["test"].text_oracle, test)
    assert 0.87 < full["acc2_non0"] < 0.93
    assert 0.35 < full["mae"] < 0.52
    assert full["acc2_non0"] - text["acc2_non0"] >= 0.08
    assert text["mae"] > full["mae"] + 0.2


def test_manifest_carries_both_oracles(tmp_path):
    manifest = prepare(small_data(), tmp_path / "p")
    assert manifest["oracle"]["split"] == "test"
    assert set(manifest["oracle"]) == {"split", "full", "text_only"}
    assert 0 <= manifest["oracle"]["full"]["acc2_has0"] <= 1


def test_each_modality_alone_predicts_less_than_all_together(big):
    tr, te = big.splits["train"], big.splits["test"]
    pooled = {s: {m: _pool(a, m, _valid(a, m)) for m in MODALITIES} for s, a in (("tr", tr), ("te", te))}
    corr = {m: _fit_corr(pooled["tr"][m], tr["label"], pooled["te"][m], te["label"]) for m in MODALITIES}
    all_corr = _fit_corr(
        np.hstack([pooled["tr"][m] for m in MODALITIES]),
        tr["label"],
        np.hstack([pooled["te"][m] for m in MODALITIES]),
        te["label"],
    )
    assert all(c > 0.2 for c in corr.values()), corr
    assert all_corr > max(corr.values()) + 0.05, (all_corr, corr)
    # text is the strongest single modality
    assert corr["text"] > max(corr["audio"], corr["vision"]), corr


def test_distractor_steps_carry_no_label_signal(big):
    tr, te = big.splits["train"], big.splits["test"]
    for m in MODALITIES:
        cue_tr, cue_te = big.truth["train"].cue[m], big.truth["test"].cue[m]
        on_cue = _fit_corr(_pool(tr, m, cue_tr), tr["label"], _pool(te, m, cue_te), te["label"])
        off_tr, off_te = _valid(tr, m) & ~cue_tr, _valid(te, m) & ~cue_te
        keep_tr, keep_te = off_tr.any(1), off_te.any(1)
        off = _fit_corr(
            _pool(tr, m, off_tr)[keep_tr],
            tr["label"][keep_tr],
            _pool(te, m, off_te)[keep_te],
            te["label"][keep_te],
        )
        assert on_cue > 0.4, (m, on_cue)
        assert abs(off) < 0.1, (m, off)


def test_cue_fraction_is_about_a_third(big):
    a = big.splits["train"]
    cue = big.truth["train"].cue["text"]
    assert cue.any(1).all()
    assert 0.27 < cue.sum() / _valid(a, "text").sum() < 0.38


def test_specific_factors_live_in_their_own_modality_only(big):
    tr, te = big.splits["train"], big.splits["test"]
    f_tr, f_te = big.truth["train"].factors, big.truth["test"].factors

    def r(m, k):
        x_tr = _pool(tr, m, big.truth["train"].cue[m])
        x_te = _pool(te, m, big.truth["test"].cue[m])
        return _fit_corr(x_tr, f_tr[:, k], x_te, f_te[:, k])

    for k, own in ((1, "text"), (2, "audio"), (3, "vision")):
        assert r(own, k) > 0.5, (own, r(own, k))
        for other in set(MODALITIES) - {own}:
            assert abs(r(other, k)) < 0.1, (other, k, r(other, k))
    for m in MODALITIES:  # the shared factor is readable from every modality
        assert r(m, 0) > 0.5, (m, r(m, 0))


def test_nuisance_dominates_variance_but_not_the_label(big):
    a = big.splits["train"]
    for m in MODALITIES:
        x = _pool(a, m, _valid(a, m))
        x = x - x.mean(0)
        _, s, vt = np.linalg.svd(x, full_matrices=False)
        rank = STYLES[m].nuisance_rank
        # the speaker subspace carries most of the variance of pooled features ...
        assert (s[:rank] ** 2).sum() / (s**2).sum() > 0.5, m
        # ... and none of its directions tells the label
        for k in range(rank):
            assert abs(np.corrcoef(x @ vt[k], a["label"])[0, 1]) < 0.1, (m, k)


def test_bad_sizes_are_rejected():
    with pytest.raises(Exception, match="n_valid"):
        generate(_sized(10, 0, 5))
