"""The model's modules on their own: AMSA's masking, KA's and KT's losses, and the loss functions,
each against expectations computed independently (hand-computed values, or a planted structure)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mdkat import MODALITIES
from mdkat.config import load_params
from mdkat.models import config_of, encoders, losses
from mdkat.models.amsa import AdaptiveMaskedSelfAttention
from mdkat.models.ka import LABEL_SCALE, KnowledgeAggregation
from mdkat.models.kt import KnowledgeTransfer
from tests.conftest import ROOT

PARAMS = config_of(load_params(ROOT / "params.yaml"), "mdkat")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -------------------------------------------------------------------------------------------------------
# AMSA

LENGTHS = torch.tensor([10, 6, 3])
# the importance logit of each valid step (the score reads feature 0 only, see `_amsa`): a few steps far
# below the others, and a last sample whose every step is unimportant in absolute terms
LOGITS = [
    [2.0, 1.0, -6.0, 3.0, 0.5, 2.5, 1.5, -7.0, 0.0, 2.0],
    [1.0, 2.0, 0.5, 1.5, -6.0, 3.0],
    [-20.0, -25.0, -22.0],
]


def _amsa() -> AdaptiveMaskedSelfAttention:
    """AMSA at the configured threshold whose step importance is sigmoid(feature 0): known by design."""
    torch.manual_seed(0)
    amsa = AdaptiveMaskedSelfAttention(8, 2, dropout=0.0, threshold=PARAMS.amsa_threshold).eval()
    with torch.no_grad():
        amsa.score.weight.zero_()
        amsa.score.weight[0, 0] = 1.0
        amsa.score.bias.zero_()
    return amsa


def _planted() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features (B, T, 8), random also on padded steps (AMSA must go by the mask), the valid mask, and
    the importance of every step (float64, 0 on padding)."""
    g = torch.Generator().manual_seed(1)
    t = int(LENGTHS.max())
    x = torch.randn(len(LENGTHS), t, 8, generator=g) * 3
    mask = torch.arange(t)[None, :] < LENGTHS[:, None]
    importance = torch.zeros(len(LENGTHS), t, dtype=torch.float64)
    for b, logits in enumerate(LOGITS):
        x[b, : len(logits), 0] = torch.tensor(logits)
        importance[b, : len(logits)] = torch.sigmoid(torch.tensor(logits, dtype=torch.float64))
    return x, mask, importance


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The planted features and mask, and the steps AMSA should keep: valid, and at least threshold times
    the sample's highest importance."""
    x, mask, importance = _planted()
    kept = mask & (importance >= PARAMS.amsa_threshold * importance.amax(1, keepdim=True))
    return x, mask, kept


def test_amsa_keeps_the_expected_steps():
    _, mask, kept = _inputs()
    # the planted layout: two and one unimportant steps; in the last sample, whose importances are all
    # tiny, the two relatively large ones survive
    assert (mask.sum(1) - kept.sum(1)).tolist() == [2, 1, 1]
    assert kept.any(1).all()


def test_amsa_gives_padded_and_unimportant_keys_exactly_zero_attention(monkeypatch):
    amsa = _amsa()
    x, mask, kept = _inputs()
    probabilities = []
    sdpa = F.scaled_dot_product_attention

    def recording_sdpa(q, k, v, attn_mask=None, **kwargs):
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
        p = scores.softmax(-1)  # (B, heads, Tq, Tk)
        out = sdpa(q, k, v, attn_mask=attn_mask, **kwargs)
        # these are the probabilities the fused kernel applied, not merely similar ones
        torch.testing.assert_close(p @ v, out, atol=1e-5, rtol=1e-5)
        probabilities.append(p)
        return out

    monkeypatch.setattr(encoders.F, "scaled_dot_product_attention", recording_sdpa)
    with torch.no_grad():
        _, _, importance = amsa(x, mask, amsa.logit(x))

    (p,) = probabilities
    dropped = ~kept[:, None, None, :].expand_as(p)  # every query, every head
    assert (p[dropped] == 0.0).all(), "a padded or unimportant key gets attention"
    assert (p[~dropped] > 0).all()
    torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1]))
    # the importance is the score before the threshold's mask (what diagnostics compare with the truth):
    # zero on padding only
    _, _, planted = _planted()
    torch.testing.assert_close(importance.double(), planted, rtol=1e-5, atol=1e-6)
    assert (importance[~mask] == 0.0).all() and (importance[mask] > 0).all()


def test_amsa_key_bias_masks_padding_and_steps_below_threshold_times_the_maximum():
    amsa = _amsa()
    x, mask, kept = _inputs()
    with torch.no_grad():
        _, bias = amsa.key_bias(amsa.logit(x), mask)
    assert torch.equal(torch.isfinite(bias), kept)
    # the bias is the only key-dependent term of the mask: softmax over it alone shows what any query sees
    assert torch.equal(bias.softmax(-1) > 0, kept)
    # log a_t on kept keys, also for the last sample's tiny importances (around 1e-9)
    _, _, importance = _planted()
    torch.testing.assert_close(bias[kept].double(), importance[kept].log(), rtol=1e-5, atol=1e-5)


def test_amsa_pools_the_kept_steps_weighted_by_importance():
    amsa = _amsa()
    x, mask, kept = _inputs()
    _, _, importance = _planted()
    with torch.no_grad():
        refined, pooled, _ = amsa(x, mask, amsa.logit(x))
    weight = importance * kept
    # normalised per sample: the weighted mean does not depend on the importances' absolute size
    expected = (refined.double() * (weight / weight.sum(1, keepdim=True))[..., None]).sum(1)
    torch.testing.assert_close(pooled.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("changed", ["padded", "unimportant"])
def test_amsa_output_ignores_the_values_of_masked_steps(changed):
    amsa = _amsa()
    x, mask, kept = _inputs()
    target = ~mask if changed == "padded" else mask & ~kept
    g = torch.Generator().manual_seed(2)
    noisy = x.clone()
    # unimportant steps keep their importance logit (feature 0), everything else about them changes
    first = 0 if changed == "padded" else 1
    noisy[..., first:] = torch.where(
        target[..., None], torch.randn(x[..., first:].shape, generator=g) * 10, x[..., first:]
    )
    with torch.no_grad():
        refined, pooled, _ = amsa(x, mask, amsa.logit(x))
        refined_noisy, pooled_noisy, _ = amsa(noisy, mask, amsa.logit(noisy))
    torch.testing.assert_close(pooled_noisy, pooled, atol=1e-6, rtol=0)
    torch.testing.assert_close(refined_noisy[kept], refined[kept], atol=1e-6, rtol=0)


def test_amsa_output_depends_on_the_kept_steps():
    # the counterpart of the invariance above: a kept step's values do reach the pooled vector
    amsa = _amsa()
    x, mask, kept = _inputs()
    assert kept[0, 3]
    noisy = x.clone()
    noisy[0, 3, 1:] += 5.0  # its importance logit (feature 0) stays
    with torch.no_grad():
        moved = amsa(noisy, mask, amsa.logit(noisy))[1][0] - amsa(x, mask, amsa.logit(x))[1][0]
        assert moved.abs().max() > 1e-3


# -------------------------------------------------------------------------------------------------------
# input normalisation


def _correlated_steps(n: int, d: int, seed: int) -> torch.Tensor:
    """(n, d) steps with a mean, unequal scales and correlations: a random mixing of unit noise."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=g) * torch.linspace(0.1, 3.0, d)
    return torch.randn(n, d, generator=g) @ mixing + torch.randn(d, generator=g) * 5


def test_projection_standardises_with_the_training_statistics():
    projection = encoders.Projection(6, 8, kernel=1, dropout=0.0)
    steps = _correlated_steps(4000, 6, seed=0)
    torch.testing.assert_close(projection.normalise(steps), steps)  # identity before any statistics
    projection.set_statistics(steps)
    z = projection.normalise(steps).double()
    torch.testing.assert_close(z.mean(0), torch.zeros(6, dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(z.std(0), torch.ones(6, dtype=torch.float64), atol=1e-4, rtol=0)


def test_projection_whitens_the_top_principal_components():
    projection = encoders.Projection(10, 8, kernel=1, dropout=0.0, components=3)
    steps = _correlated_steps(6000, 10, seed=1)
    projection.set_statistics(steps)
    z = projection.normalise(steps).double()  # (n, 3)
    assert z.shape == (6000, 3) and projection.conv.in_channels == 3
    cov = torch.cov(z.T)
    torch.testing.assert_close(cov, torch.eye(3, dtype=torch.float64), atol=1e-3, rtol=0)
    # the kept directions are the top 3 of numpy's own eigendecomposition (a naive reference), in order
    x = steps.double().numpy()
    value, vector = np.linalg.eigh(np.cov(x.T))
    top = vector[:, ::-1][:, :3]
    basis = projection.in_basis.double().numpy() * np.sqrt(value[::-1][:3])  # undo the whitening
    np.testing.assert_allclose(np.abs(np.sum(basis * top, axis=0)), 1.0, atol=1e-4)
    # each column's largest entry positive: the same data give the same basis, whatever the solver's signs
    assert (basis[np.abs(basis).argmax(0), range(3)] > 0).all()


def test_input_statistics_come_from_valid_training_steps_only():
    torch.manual_seed(0)
    params = load_params(ROOT / "params.yaml")
    from mdkat.models import build

    batch_dims = {"text": 24, "audio": 5, "vision": 20}
    g = torch.Generator().manual_seed(3)
    lengths = torch.tensor([5, 9, 12, 7])
    features = {m: torch.randn(4, 12, d, generator=g) for m, d in batch_dims.items()}
    clean = {m: x * (torch.arange(12)[None, :] < lengths[:, None])[..., None] for m, x in features.items()}
    from mdkat.data import Batch

    def batch(feats):
        lens = {f"{m}_len": lengths for m in MODALITIES}
        return Batch(**feats, **lens, label=torch.zeros(4), id=list("abcd"))

    a, b = build(params, batch_dims), build(params, batch_dims)
    encoders.fit_input_statistics(a, batch(clean))
    encoders.fit_input_statistics(b, batch(features))  # garbage (not zero) after each sample's length
    for m in MODALITIES:
        torch.testing.assert_close(a.projection[m].in_mean, b.projection[m].in_mean)
        valid = clean[m][torch.arange(12)[None, :] < lengths[:, None]]
        torch.testing.assert_close(a.projection[m].in_mean, valid.mean(0), atol=1e-5, rtol=0)


# -------------------------------------------------------------------------------------------------------
# KA


def test_ka_is_lower_for_features_that_agree_within_samples_than_across():
    torch.manual_seed(0)
    ka = KnowledgeAggregation(16, PARAMS.ka_temperature)
    n = 16
    base = torch.randn(n, 16)
    agree = {m: base + 0.1 * torch.randn(n, 16) for m in MODALITIES}
    g = torch.Generator().manual_seed(1)
    # the same vectors, but each modality's assigned to other samples: no sample's modalities agree
    shuffled = {m: v[torch.randperm(n, generator=g)] for m, v in agree.items()}
    label = torch.linspace(-3, 3, n)
    with torch.no_grad():
        matched, mismatched = ka(agree, label).item(), ka(shuffled, label).item()
    assert matched < 0.5 * mismatched, (matched, mismatched)


@pytest.mark.parametrize("gap", [0.0, 0.5, 6.0])
def test_ka_pushes_a_negative_by_its_label_distance(gap):
    # two samples with identical features: every similarity equals the positive one, so each anchor's
    # loss is log(1 + w) with w = 1 - exp(-gap / LABEL_SCALE), the negative's weight
    torch.manual_seed(0)
    ka = KnowledgeAggregation(16, PARAMS.ka_temperature)
    one = {m: torch.randn(1, 16) for m in MODALITIES}
    pair = {m: v.expand(2, -1) for m, v in one.items()}
    label = torch.tensor([0.5, 0.5 + gap])
    with torch.no_grad():
        loss = ka(pair, label).item()
    assert loss == pytest.approx(math.log(2.0 - math.exp(-gap / LABEL_SCALE)), abs=1e-6)
    if gap == 0.0:
        assert loss < 1e-6, "a negative with the anchor's own label must not be pushed away"


def test_ka_of_one_sample_is_zero_and_differentiable():
    torch.manual_seed(0)
    ka = KnowledgeAggregation(16, PARAMS.ka_temperature)
    pooled = {m: torch.randn(1, 16, requires_grad=True) for m in MODALITIES}
    loss = ka(pooled, torch.tensor([1.2]))
    assert loss.item() == 0.0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in pooled.values())


# -------------------------------------------------------------------------------------------------------
# KT


def _kt(momentum: float = PARAMS.kt_momentum) -> KnowledgeTransfer:
    return KnowledgeTransfer(MODALITIES, PARAMS.kt_temperature, momentum)


def _predictions(label: torch.Tensor, errors: dict[str, float]) -> dict[str, torch.Tensor]:
    """Unimodal predictions whose mean absolute error is exactly `errors[m]` (alternating signs)."""
    sign = torch.ones_like(label)
    sign[1::2] = -1
    return {m: label + sign * errors[m] for m in MODALITIES}


def test_kt_running_error_is_an_exponential_moving_average():
    kt = _kt(momentum=0.9)
    label = torch.tensor([-2.0, 0.0, 1.0, 2.5])
    kt.update(_predictions(label, {"text": 0.2, "audio": 1.0, "vision": 2.0}), label)
    torch.testing.assert_close(kt.error, torch.tensor([0.2, 1.0, 2.0]))  # the first batch is taken as is
    kt.update(_predictions(label, {"text": 0.4, "audio": 0.5, "vision": 1.0}), label)
    # 0.9 * previous + 0.1 * batch
    torch.testing.assert_close(kt.error, torch.tensor([0.22, 0.95, 1.9]))
    assert kt.updates.item() == 2


def test_kt_transfers_only_from_stronger_to_weaker_modalities():
    kt = _kt()
    label = torch.tensor([-2.0, 0.0, 1.0, 2.5])
    kt.update(_predictions(label, {"text": 0.1, "audio": 1.0, "vision": 1.5}), label)
    w = kt.weights()
    t, a, v = (MODALITIES.index(m) for m in ("text", "audio", "vision"))
    assert w[t, a] > 0 and w[t, v] > 0 and w[a, v] > 0
    assert w[a, t] == 0 and w[v, t] == 0 and w[v, a] == 0
    assert (w.diagonal() == 0).all()
    assert w[t, a].item() == pytest.approx(1 - math.exp(-0.9 / PARAMS.kt_temperature), rel=1e-5)
    assert w[t, v] > w[t, a], "a larger error gap transfers more"


def test_kt_loss_leaves_the_strongest_teacher_without_gradient():
    kt = _kt()
    label = torch.tensor([-2.0, 0.0, 1.0, 2.5])
    kt.update(_predictions(label, {"text": 0.1, "audio": 1.0, "vision": 1.5}), label)
    predictions = {
        m: p.clone().requires_grad_()
        for m, p in _predictions(label, {"text": 0.1, "audio": 1, "vision": 2}).items()
    }
    loss = kt(predictions)
    assert loss > 0
    loss.backward()
    assert (predictions["text"].grad == 0).all()
    assert predictions["audio"].grad.abs().sum() > 0 and predictions["vision"].grad.abs().sum() > 0


def test_kt_loss_is_zero_before_any_update():
    # no measured strengths yet: no modality is a teacher
    label = torch.tensor([0.0, 1.0])
    assert _kt()(_predictions(label, {"text": 0.0, "audio": 1.0, "vision": 2.0})).item() == 0.0


# -------------------------------------------------------------------------------------------------------
# loss functions


def test_l1_is_the_mean_absolute_error():
    pred = torch.tensor([1.0, -1.0, 0.5])
    label = torch.tensor([0.0, 0.0, 1.0])
    assert losses.l1(pred, label).item() == pytest.approx(2.5 / 3)
    unimodal = {"text": pred, "audio": label + 2.0}  # errors 2.5 / 3 and 2
    assert losses.unimodal_l1(unimodal, label).item() == pytest.approx((2.5 / 3 + 2.0) / 2)


def test_l1_of_half_precision_predictions_is_float32():
    pred = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
    assert losses.l1(pred, torch.tensor([0.0, 0.0])).dtype == torch.float32


def _vectors(rows: list[list[list[float]]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)  # (B, T, d)


def test_orthogonality_is_the_squared_cosine_over_valid_steps():
    independent = {
        # sample 0: orthogonal, parallel, then a padded step that would score 1; sample 1: parallel
        "text": _vectors([[[1, 0], [1, 1], [1, 0]], [[0, 2], [5, 5], [5, 5]]]),
        "audio": _vectors([[[1, 0], [0, 1], [0, 0]], [[1, 0], [0, 1], [0, 0]]]),
    }
    specific = {
        "text": _vectors([[[0, 3], [2, 2], [7, 0]], [[0, 1], [0, 1], [0, 1]]]),
        # antiparallel (cos -1) and at 45 degrees (cos^2 = 1/2), lengths 2 and 1
        "audio": _vectors([[[-3, 0], [1, 1], [9, 9]], [[1, 1], [9, 9], [9, 9]]]),
    }
    mask = {
        "text": torch.tensor([[1, 1, 0], [1, 0, 0]]).bool(),
        "audio": torch.tensor([[1, 1, 0], [1, 0, 0]]).bool(),
    }
    # each modality averages over its valid steps (all samples together): text (0 + 1 + 1) / 3,
    # audio (1 + 1/2 + 1/2) / 3
    expected = (2 / 3 + 2 / 3) / 2
    assert losses.orthogonality(independent, specific, mask).item() == pytest.approx(expected, rel=1e-6)
    # blind to scale: shrinking one side cannot satisfy it
    scaled = {m: 1e-3 * s for m, s in specific.items()}
    assert losses.orthogonality(independent, scaled, mask).item() == pytest.approx(expected, rel=1e-5)


def test_orthogonality_is_zero_for_orthogonal_and_one_for_parallel_features():
    c = {"text": _vectors([[[1, 0, 0], [0, 2, 0]]])}
    mask = {"text": torch.ones(1, 2, dtype=torch.bool)}
    orthogonal = {"text": _vectors([[[0, 1, 1], [3, 0, -1]]])}
    parallel = {"text": _vectors([[[4, 0, 0], [0, -0.5, 0]]])}
    assert losses.orthogonality(c, orthogonal, mask).item() == pytest.approx(0.0, abs=1e-7)
    assert losses.orthogonality(c, parallel, mask).item() == pytest.approx(1.0, rel=1e-6)


def test_reconstruction_is_the_masked_mean_squared_error_with_a_detached_target():
    reconstructed = {
        "text": _vectors([[[1, 2], [0, 0]], [[3, 3], [100, 100]]]).requires_grad_(),
        "audio": _vectors([[[0, 0], [0, 0]], [[0, 0], [0, 0]]]).requires_grad_(),
    }
    target = {
        "text": _vectors([[[0, 0], [0, 2]], [[3, 1], [0, 0]]]).requires_grad_(),
        "audio": _vectors([[[2, 0], [0, 0]], [[0, 0], [0, 0]]]).requires_grad_(),
    }
    # text: the second step of sample 1 is padding; audio: only the first step of each sample is valid
    mask = {"text": torch.tensor([[1, 1], [1, 0]]).bool(), "audio": torch.tensor([[1, 0], [1, 0]]).bool()}
    # per valid step, the mean over features of the squared error; then the mean over valid steps:
    # text (1 + 4) / 2, (0 + 4) / 2, (0 + 4) / 2; audio (4 + 0) / 2, 0
    expected = ((2.5 + 2.0 + 2.0) / 3 + 1.0) / 2
    loss = losses.reconstruction(reconstructed, target, mask)
    assert loss.item() == pytest.approx(expected)
    loss.backward()
    assert all(t.grad is None for t in target.values()), "the reconstruction target must be detached"
    assert reconstructed["text"].grad[1, 1].abs().sum() == 0, "a padded step got a gradient"
    assert reconstructed["text"].grad[0, 0].abs().sum() > 0


def test_a_learned_text_input_keeps_the_identity_and_the_others_still_get_statistics(monkeypatch):
    """A model whose text comes from a trained encoder (BERT) skips text's projection, not the rest."""
    torch.manual_seed(0)
    from mdkat.data import Batch
    from mdkat.models import build

    params = load_params(ROOT / "params.yaml")
    dims = {"text": 24, "audio": 5, "vision": 20}
    model = build(params, dims)
    assert list(model.projection) == list(MODALITIES)  # text first: the one skipped comes before the others
    monkeypatch.setattr(type(model), "LEARNED_INPUTS", ("text",), raising=False)
    g = torch.Generator().manual_seed(4)
    feats = {m: torch.randn(3, 6, d, generator=g) + 2 for m, d in dims.items()}
    lens = {f"{m}_len": torch.tensor([6, 6, 6]) for m in MODALITIES}
    encoders.fit_input_statistics(model, Batch(**feats, **lens, label=torch.zeros(3), id=list("abc")))
    assert model.projection["text"].in_mean.eq(0).all()
    for m in ("audio", "vision"):
        torch.testing.assert_close(model.projection[m].in_mean, feats[m].reshape(-1, dims[m]).mean(0))


@pytest.mark.parametrize("width", [2, 5, 10])  # the narrowest, an odd one (a sine column more), a usual one
def test_sinusoidal_positions_follow_the_transformer_formula(width):
    # Vaswani et al. 2017: PE(t, 2i) = sin(t / 10000^(2i / d)), PE(t, 2i + 1) = cos(t / 10000^(2i / d))
    steps = 7
    table = encoders.sinusoidal_positions(steps, width, torch.device("cpu"), torch.float64)
    assert table.shape == (steps, width)
    for t in range(steps):
        for column in range(width):
            angle = t / 10000 ** (2 * (column // 2) / width)
            expected = math.sin(angle) if column % 2 == 0 else math.cos(angle)
            assert table[t, column].item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("kernel", [0, 2, 4, -2])
def test_an_even_convolution_kernel_is_refused(kernel):
    with pytest.raises(ValueError, match=f"conv kernel must be odd .* got {kernel}"):
        encoders.Projection(6, 8, kernel=kernel, dropout=0.0)


@pytest.mark.parametrize("kernel", [1, 3, 5])
def test_an_odd_convolution_kernel_keeps_every_step_centred(kernel):
    projection = encoders.Projection(2, 4, kernel=kernel, dropout=0.0)
    x = torch.zeros(1, 9, 2)
    x[0, 4, 0] = 1.0  # one impulse at step 4
    with torch.no_grad():
        projection.conv.weight.fill_(1.0)
        out = projection.conv(x.transpose(1, 2)).transpose(1, 2)  # (1, 9, 4)
    reached = torch.nonzero(out[0, :, 0]).flatten().tolist()
    assert reached == list(range(4 - kernel // 2, 4 + kernel // 2 + 1))  # symmetric around step 4


# -------------------------------------------------------------------------------------------------------
# CFF


def test_the_cff_gate_decides_how_much_of_the_other_modalities_is_added():
    from mdkat.models.cff import CrossModalLayer
    from mdkat.models.encoders import key_mask

    torch.manual_seed(0)
    layer = CrossModalLayer(8, 2, dropout=0.0).eval()
    x, others = torch.randn(2, 5, 8), torch.randn(2, 4, 8)
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    with torch.no_grad():
        layer.ffn[3].weight.zero_()  # the feed-forward's output layer: the output is norm_out(x + g * a)
        layer.ffn[3].bias.zero_()
        layer.gate.weight.zero_()
        a = layer.attn(layer.norm_q(x), layer.norm_kv(others), key_mask(mask))
        for g in (0.0, 0.25, 0.75, 1.0):
            layer.gate.bias.fill_(math.log(g / (1 - g)) if 0 < g < 1 else (-1e4 if g == 0 else 1e4))
            torch.testing.assert_close(layer(x, others, mask), layer.norm_out(x + g * a), atol=1e-5, rtol=0)


# -------------------------------------------------------------------------------------------------------
# KA, continued


def test_ka_weighs_a_negative_one_sentiment_point_away_by_one_minus_exp_minus_one():
    # the docstring's 0.63: two samples of identical features one point apart, loss = log(1 + 0.632)
    torch.manual_seed(0)
    ka = KnowledgeAggregation(16, PARAMS.ka_temperature)
    one = {m: torch.randn(1, 16) for m in MODALITIES}
    with torch.no_grad():
        loss = ka({m: v.expand(2, -1) for m, v in one.items()}, torch.tensor([0.0, 1.0])).item()
    assert loss == pytest.approx(math.log(1 + 0.6321205588), abs=1e-6)


@pytest.mark.parametrize("temperature", [0.0, -0.5, -2.0])
def test_ka_refuses_a_temperature_that_is_not_positive(temperature):
    with pytest.raises(ValueError, match=f"ka_temperature must be positive, got {temperature}"):
        KnowledgeAggregation(16, temperature)


def test_ka_on_two_ranks_of_three_samples_averages_to_the_one_process_loss(monkeypatch):
    """Under torchrun a rank's anchors find their own prototypes at rows rank * B + i of the gathered
    batch (B = 3: not a power of two, where i + offset and i ^ offset differ)."""
    import mdkat.models.ka as module

    torch.manual_seed(0)
    ka = KnowledgeAggregation(16, PARAMS.ka_temperature).train()  # no dropout inside: train mode is exact
    pooled = {m: torch.randn(6, 16) for m in MODALITIES}
    label = torch.tensor([-2.0, -0.5, 0.3, 1.0, 1.8, 2.9])
    with torch.no_grad():
        whole = ka(pooled, label).item()
        prototypes = {}
        monkeypatch.setattr(module, "gather_rows", lambda y: (y, 0))
        for rank in (0, 1):  # each rank's prototypes, as the collective would gather them
            mine = slice(3 * rank, 3 * rank + 3)
            monkeypatch.setattr(
                module, "gather_rows_with_grad", lambda p, r=rank: (prototypes.setdefault(r, p), 0)
            )
            ka({m: v[mine] for m, v in pooled.items()}, label[mine])
        losses = []
        gathered = torch.cat([prototypes[0], prototypes[1]])  # (6, d) in rank order
        for rank in (0, 1):
            mine = slice(3 * rank, 3 * rank + 3)
            monkeypatch.setattr(module, "gather_rows_with_grad", lambda p, r=rank: (gathered, 3 * r))
            monkeypatch.setattr(module, "gather_rows", lambda y: (label, 0))
            losses.append(ka({m: v[mine] for m, v in pooled.items()}, label[mine]).item())
    assert sum(losses) / 2 == pytest.approx(whole, rel=1e-5)
