"""MISA: shapes, padding invariance, gradients, loss weights, fitting, state, and its own losses (CMD,
soft orthogonality, reconstruction) against naive references written out moment by moment."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import pytest
import torch

from mdkat import MODALITIES
from mdkat.models.encoders import fit_input_statistics
from mdkat.models.misa import MISA, MISAConfig, cmd, difference
from tests.conftest import section, section_weights
from tests.test_models import (
    ALIGNED,
    MOSEI,
    MOSI,
    SMALL_ALIGNED,
    SMALL_UNALIGNED,
    UNALIGNED,
    padded,
    random_batch,
)

# `params.yaml`'s `model.misa` section (with changes) and `loss.misa` weights
config = functools.partial(section, "misa")
weights = functools.partial(section_weights, "misa")


def narrow(**changes) -> MISAConfig:
    """A small model for tests whose point does not depend on the size."""
    small = {
        "width": 16,
        "fusion_ff": 32,
        "rnn_width": {"text": 8, "audio": 0, "vision": 0},
        "input_pca": {"text": 16, "audio": 0, "vision": 0},
    }
    return config(**{**small, **changes})


def model(cfg: MISAConfig, dims: dict[str, int] = MOSI, seed: int = 0) -> MISA:
    torch.manual_seed(seed)
    return MISA(cfg, dims)


# -------------------------------------------------------------------------------------------------------
# the interface


@pytest.mark.parametrize("dims", [MOSI, MOSEI], ids=["mosi", "mosei"])
@pytest.mark.parametrize("steps", [ALIGNED, UNALIGNED], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("n", [1, 3])
def test_output_shapes_and_finite_terms_for_both_datasets_alignments_and_batch_sizes(dims, steps, n):
    cfg = config()
    net = model(cfg, dims)
    batch = random_batch(n, steps, dims, seed=n)
    out = net(batch)
    total, terms = net.loss(out, batch, weights())
    assert out.pred.shape == (n,)
    assert tuple(terms) == ("task", *MISA.WEIGHTED_TERMS) == ("task", "sim", "diff", "recon")
    assert all(v.shape == () and torch.isfinite(v) for v in terms.values()), terms
    assert {m: out.mask[m].shape for m in MODALITIES} == {m: (n, steps[m]) for m in MODALITIES}
    for field in ("pooled_independent", "pooled_specific", "utterance", "decoded"):
        assert {m: getattr(out, field)[m].shape for m in MODALITIES} == dict.fromkeys(
            MODALITIES, (n, cfg.width)
        )
    for field in ("pooled_independent", "pooled_specific"):  # sigmoid outputs: CMD's range [0, 1]
        assert all(((v >= 0) & (v <= 1)).all() for v in getattr(out, field).values())
    # a batch of one has no spread: its central moments and centred rows are 0, and the gradients stay finite
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


@pytest.mark.parametrize("steps", [SMALL_ALIGNED, SMALL_UNALIGNED], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("extra", [(6, 6, 6), (3, 11, 17)], ids=["equal", "unequal"])
def test_predictions_ignore_appended_padding_and_its_values(steps, extra):
    net = model(config()).eval()
    batch = random_batch(5, steps, MOSI, seed=1)
    extra = dict(zip(MODALITIES, extra, strict=True))
    with torch.no_grad():
        reference = net(batch)
        for longer in (padded(batch, extra), padded(batch, extra, garbage_seed=2)):
            out = net(longer)
            assert (out.pred - reference.pred).abs().max() < 1e-5
            for m in MODALITIES:
                assert (out.utterance[m] - reference.utterance[m]).abs().max() < 1e-5, m


def test_each_modality_reads_its_own_length_on_unaligned_data():
    """A change at an audio step past the text's length but within the audio's length moves the output."""
    net = model(config()).eval()
    batch = random_batch(3, SMALL_UNALIGNED, MOSI, seed=3)
    step = SMALL_UNALIGNED["text"] + 5  # sample 0 has every step of every modality
    audio = batch.audio.clone()
    audio[0, step] += 3.0
    with torch.no_grad():
        before, after = net(batch), net(dataclasses.replace(batch, audio=audio))
    assert (after.utterance["audio"][0] - before.utterance["audio"][0]).abs().max() > 1e-4
    assert (after.pred[0] - before.pred[0]).abs() > 1e-6
    assert torch.equal(after.utterance["text"], before.utterance["text"])


def test_every_parameter_learns_from_one_backward():
    net = model(config()).train()
    batch = random_batch(5, SMALL_UNALIGNED, MOSI, seed=4)
    total, _ = net.loss(net(batch), batch, weights())
    total.backward()
    silent = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert silent == []  # no exceptions: every module feeds the prediction or a loss term
    assert not any("normalise" in name for name, _ in net.named_parameters())  # statistics are buffers


@pytest.mark.parametrize("term", MISA.WEIGHTED_TERMS)
def test_total_moves_by_weight_times_term(term):
    net = model(narrow())
    batch = random_batch(5, SMALL_ALIGNED, MOSI, seed=5)
    out = net(batch)
    zero = dict.fromkeys(MISA.WEIGHTED_TERMS, 0.0)
    base, terms = net.loss(out, batch, zero)
    moved, _ = net.loss(out, batch, {**zero, term: 0.7})
    assert torch.isfinite(terms[term]) and terms[term] > 0
    assert torch.allclose(base, terms["task"])
    assert torch.allclose(moved - base, 0.7 * terms[term], rtol=1e-5, atol=1e-7)
    # the term moves when the inputs do
    other = random_batch(5, SMALL_ALIGNED, MOSI, seed=6)
    _, other_terms = net.loss(net(other), other, zero)
    assert other_terms[term] != terms[term]


def test_overfits_a_tiny_batch():
    """60 Adam steps at 3e-3, decayed linearly to 0: L1's constant-size gradients keep a fixed rate
    bouncing around the minimum, the decay lets it settle (about 1 % of the start across seeds)."""
    net = model(narrow(dropout=0.0, fusion_dropout=0.0)).train()
    batch = random_batch(16, {"text": 6, "audio": 6, "vision": 6}, MOSI, seed=7)
    optimiser = torch.optim.Adam(net.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: 1 - step / 60)
    start = None
    for _ in range(60):
        optimiser.zero_grad()
        total, terms = net.loss(net(batch), batch, weights())
        start = terms["task"] if start is None else start
        total.backward()
        optimiser.step()
        schedule.step()
    with torch.no_grad():
        _, terms = net.loss(net(batch), batch, weights())
    assert terms["task"] < 0.1 * start, (start, terms["task"])


def test_state_dict_round_trip_keeps_buffers_and_outputs():
    batch = random_batch(6, SMALL_UNALIGNED, MOSI, seed=8)
    net = model(config(), seed=0)
    fit_input_statistics(net, batch)
    state = net.state_dict()
    for m in MODALITIES:  # text is whitened (a basis), audio and vision standardised (a scale)
        assert f"normalise.{m}.in_mean" in state
    assert "normalise.text.in_basis" in state and "normalise.audio.in_scale" in state
    assert not torch.allclose(state["normalise.audio.in_mean"], torch.zeros(MOSI["audio"]))
    other = model(config(), seed=1)
    other.load_state_dict(state)
    net.eval(), other.eval()
    with torch.no_grad():
        assert torch.equal(net(batch).pred, other(batch).pred)


# -------------------------------------------------------------------------------------------------------
# the losses against naive references


def naive_cmd(x: torch.Tensor, y: torch.Tensor, moments: int) -> float:
    """Zellinger et al.'s CMD on [0, 1]: ||E x - E y|| + sum_k ||E (x - E x)^k - E (y - E y)^k||, k = 2..K,
    one feature and one moment at a time, in float64."""
    x, y = x.double(), y.double()
    n, d = x.shape
    total = 0.0
    for k in range(1, moments + 1):
        squares = 0.0
        for j in range(d):
            mean_x = sum(x[i, j].item() for i in range(n)) / n
            mean_y = sum(y[i, j].item() for i in range(n)) / n
            if k == 1:
                gap = mean_x - mean_y
            else:
                gap = (
                    sum((x[i, j].item() - mean_x) ** k for i in range(n)) / n
                    - sum((y[i, j].item() - mean_y) ** k for i in range(n)) / n
                )
            squares += gap**2
        total += math.sqrt(squares)
    return total


def naive_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """||A^T B||_F^2 / d^2 with A, B centred over the batch and each row scaled to unit length, by loops."""

    def prepare(x: torch.Tensor) -> list[list[float]]:
        x = x.double()
        n, d = x.shape
        centred = [
            [x[i, j].item() - sum(x[r, j].item() for r in range(n)) / n for j in range(d)] for i in range(n)
        ]
        return [[v / max(math.sqrt(sum(w * w for w in row)), 1e-6) for v in row] for row in centred]

    pa, pb = prepare(a), prepare(b)
    d_a, d_b = len(pa[0]), len(pb[0])
    frobenius = sum(
        sum(pa[i][j] * pb[i][k] for i in range(len(pa))) ** 2 for j in range(d_a) for k in range(d_b)
    )
    return frobenius / (d_a * d_b)


def test_cmd_of_identical_batches_is_zero_and_of_shifted_ones_the_mean_gap():
    g = torch.Generator().manual_seed(9)
    x = torch.rand(7, 6, generator=g) * 0.5
    assert cmd(x, x.clone(), 5) == 0
    shift = torch.tensor([0.1, -0.2, 0.0, 0.3, 0.05, -0.1])
    # the central moments of x + shift are those of x: only the first-moment term is left
    assert torch.isclose(
        cmd(x, x + shift, 5), torch.tensor(math.sqrt((shift.double() ** 2).sum().item())), atol=1e-5
    )
    assert cmd(x, x + shift, 5) == pytest.approx(cmd(x, x + shift, 1).item(), abs=1e-5)


@pytest.mark.parametrize("moments", [1, 2, 5])
def test_cmd_matches_a_naive_moment_by_moment_reference(moments):
    g = torch.Generator().manual_seed(10 + moments)
    x, y = torch.rand(9, 5, generator=g), torch.rand(9, 5, generator=g) ** 2
    assert cmd(x, y, moments).item() == pytest.approx(naive_cmd(x, y, moments), rel=1e-5)
    assert cmd(x, y, moments) > 0


def test_difference_is_zero_for_orthogonal_matrices_and_positive_otherwise():
    # zero-mean batch directions u and v with disjoint support: every sample is on one side only, so each
    # term of (A^T B)_jk = sum_i a_ij b_ik is 0
    u = torch.tensor([1.0, -1.0, 0.0, 0.0])
    v = torch.tensor([0.0, 0.0, 2.0, -2.0])
    a = u[:, None] * torch.tensor([0.3, -1.0, 2.0])[None, :] + torch.tensor([0.5, 0.1, 0.9])  # (4, 3)
    b = v[:, None] * torch.tensor([1.0, 0.4, -0.7])[None, :] + torch.tensor([0.2, 0.2, 0.6])
    assert difference(a, b).abs() < 1e-12
    assert naive_difference(a, b) == pytest.approx(0.0, abs=1e-12)
    assert difference(a, a) > 0.1  # a matrix is far from orthogonal to itself
    g = torch.Generator().manual_seed(11)
    x, y = torch.rand(6, 4, generator=g), torch.rand(6, 5, generator=g)
    assert difference(x, y).item() == pytest.approx(naive_difference(x, y), rel=1e-5)
    assert difference(x, y) > 0
    assert difference(3.0 * x + 1.0, y).item() == pytest.approx(
        difference(x, y).item(), rel=1e-5
    )  # scale-free


def test_model_terms_pair_the_modalities_as_the_paper_does():
    """sim: mean of CMD over the 3 invariant pairs; diff: shared-private per modality + the 3 private pairs,
    summed; recon: mean squared error of D's output against u_m, averaged over modalities."""
    cfg = narrow()
    net = model(cfg)
    batch = random_batch(5, SMALL_ALIGNED, MOSI, seed=12)
    with torch.no_grad():
        out = net(batch)
        _, terms = net.loss(out, batch, weights())
    c, p = out.pooled_independent, out.pooled_specific
    pairs = list(itertools.combinations(MODALITIES, 2))
    sim = sum(naive_cmd(c[a], c[b], cfg.cmd_moments) for a, b in pairs) / 3
    diff = sum(naive_difference(c[m], p[m]) for m in MODALITIES) + sum(
        naive_difference(p[a], p[b]) for a, b in pairs
    )
    recon = sum(
        ((out.decoded[m] - out.utterance[m]) ** 2).sum().item() / out.decoded[m].numel() for m in MODALITIES
    )
    assert terms["sim"].item() == pytest.approx(sim, rel=1e-5)
    assert terms["diff"].item() == pytest.approx(diff, rel=1e-5)
    assert terms["recon"].item() == pytest.approx(recon / 3, rel=1e-5)


def test_reconstruction_is_zero_when_the_decoder_reproduces_its_target():
    """Constant utterance vectors (the projections' weights zeroed) and a decoder whose bias is that vector:
    D reproduces u_m exactly; moving the bias by delta gives mean(delta^2)."""
    cfg = narrow()
    net = model(cfg).eval()
    d = cfg.width
    g = torch.Generator().manual_seed(13)
    bias, gain, shift = (
        torch.rand(d, generator=g),
        torch.rand(d, generator=g) + 0.5,
        torch.randn(d, generator=g),
    )
    with torch.no_grad():
        for m in MODALITIES:  # the same u for every modality and every sample
            linear, _, norm = net.project[m]
            linear.weight.zero_()
            linear.bias.copy_(bias)
            norm.weight.copy_(gain)
            norm.bias.copy_(shift)
        batch = random_batch(4, SMALL_UNALIGNED, MOSI, seed=14)
        target = torch.nn.functional.layer_norm(bias.relu(), (d,), gain, shift)  # u, by hand
        net.decoder.weight.zero_()
        net.decoder.bias.copy_(target)
        out = net(batch)
        _, terms = net.loss(out, batch, weights())
        assert all(torch.allclose(out.utterance[m], target.expand(4, d), atol=1e-6) for m in MODALITIES)
        assert terms["recon"] < 1e-12
        delta = torch.randn(d, generator=g) * 0.1
        net.decoder.bias.add_(delta)
        _, terms = net.loss(net(batch), batch, weights())
        assert terms["recon"].item() == pytest.approx((delta.double() ** 2).mean().item(), rel=1e-5)


def test_the_loop_trains_misa_at_its_own_learning_rate_not_train_lr(tmp_path):
    from mdkat.data import load_prepared
    from mdkat.training import fit
    from tests.conftest import prepared, tiny_params

    params = tiny_params("model.name=misa", "model.misa.lr=5.0e-4", "train.lr=3.0e-3", "train.epochs=1")
    result = fit(params, load_prepared(prepared(params, tmp_path)), tmp_path / "out", progress=False)
    assert result.history[0]["lr"] == 5.0e-4
    groups = result.model.parameter_groups(params.train.lr)
    assert [g["lr"] for g in groups] == [5.0e-4]
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(
        p.numel() for p in result.model.parameters()
    )
