"""TFN: shapes, padding invariance, gradients, the loss, fitting, state, and the tensor fusion layer against
hand-computed outer products."""

from __future__ import annotations

import dataclasses
import functools
import itertools

import pytest
import torch

from mdkat import MODALITIES
from mdkat.models.encoders import fit_input_statistics
from mdkat.models.tfn import TFN, TFNConfig, tensor_fusion
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
    with_input_statistics,
)

# `params.yaml`'s `model.tfn` section (with changes) and `loss.tfn` weights
config = functools.partial(section, "tfn")
weights = functools.partial(section_weights, "tfn")


pytestmark = pytest.mark.usefixtures("one_torch_thread")

NO_DROPOUT = {"dropout": {"text": 0.0, "audio": 0.0, "vision": 0.0}, "fusion_dropout": 0.0}


def narrow(**changes) -> TFNConfig:
    """A small model for tests whose point does not depend on the widths."""
    return config(
        **{"hidden": {"text": 8, "audio": 6, "vision": 6}, "text_out": 5, "post_fusion": 8, **changes}
    )


def fused_size(cfg: TFNConfig) -> int:
    return (cfg.hidden.audio + 1) * (cfg.hidden.vision + 1) * (cfg.text_out + 1)


# -------------------------------------------------------------------------------------------------------
# shapes


@pytest.mark.parametrize("dims", [MOSI, MOSEI], ids=["mosi", "mosei"])
@pytest.mark.parametrize("steps", [ALIGNED, UNALIGNED], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("n", [1, 3])
def test_output_shapes_for_both_datasets_alignments_and_batch_sizes(dims, steps, n):
    torch.manual_seed(0)
    cfg = config()
    model = TFN(cfg, dims)  # training mode: a batch of one must work there too
    batch = random_batch(n, steps, dims, seed=n)
    with torch.no_grad():
        out = model(batch)
        total, terms = model.loss(out, batch, weights())
    assert out.pred.shape == (n,)
    assert {m: out.mask[m].shape for m in MODALITIES} == {m: (n, steps[m]) for m in MODALITIES}
    assert {m: out.embedded[m].shape for m in MODALITIES} == {
        "text": (n, cfg.text_out),
        "audio": (n, cfg.hidden.audio),
        "vision": (n, cfg.hidden.vision),
    }
    assert out.fused.shape == (n, fused_size(cfg)) == (n, 33 * 129 * 33)
    assert tuple(terms) == TFN.loss_terms(cfg) == ("task",)
    assert all(v.shape == () and torch.isfinite(v) for v in terms.values()), terms
    assert total.shape == () and torch.isfinite(total)
    assert ((out.pred > -3) & (out.pred < 3)).all()  # bounded output


# -------------------------------------------------------------------------------------------------------
# padding


@pytest.mark.parametrize("steps", [SMALL_ALIGNED, SMALL_UNALIGNED], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("extra", [(6, 6, 6), (3, 11, 17)], ids=["equal", "unequal"])
def test_predictions_ignore_appended_padding_and_its_values(steps, extra):
    torch.manual_seed(0)
    model = with_input_statistics(TFN(config(), MOSI), seed=1).eval()
    batch = random_batch(5, steps, MOSI, seed=1)
    extra = dict(zip(MODALITIES, extra, strict=True))
    with torch.no_grad():
        reference = model(batch)
        for longer in (padded(batch, extra), padded(batch, extra, garbage_seed=2)):
            out = model(longer)
            assert (out.pred - reference.pred).abs().max() < 1e-5
            for m in MODALITIES:
                assert (out.embedded[m] - reference.embedded[m]).abs().max() < 1e-5, m


def test_a_sample_without_words_is_defined_and_ignores_padding():
    # the packed LSTM needs a length >= 1: a text of length 0 reads one zeroed step
    torch.manual_seed(0)
    model = with_input_statistics(TFN(narrow(), MOSI), seed=2).eval()
    batch = random_batch(3, SMALL_UNALIGNED, MOSI, seed=3)
    batch = dataclasses.replace(batch, text_len=torch.tensor([12, 0, 4]))
    with torch.no_grad():
        reference = model(batch).pred
        out = model(padded(batch, {"text": 5, "audio": 2, "vision": 3}, garbage_seed=4)).pred
    assert torch.isfinite(reference).all()
    assert (out - reference).abs().max() < 1e-5


def test_audio_and_vision_embed_the_mean_of_their_valid_steps():
    # independent computation: standardise each sample's valid steps, average, run the subnet on one sample
    torch.manual_seed(0)
    model = with_input_statistics(TFN(narrow(), MOSI), seed=5).eval()
    batch = random_batch(4, SMALL_UNALIGNED, MOSI, seed=6)
    with torch.no_grad():
        out = model(batch)
        for m in ("audio", "vision"):
            p = model.projection[m]
            for b in range(len(batch)):
                x = batch.features(m)[b, : batch.lengths(m)[b]]  # (L, d_m)
                mean = ((x - p.in_mean) * p.in_scale).mean(0)
                expected = model.subnets[m](mean[None])[0]
                torch.testing.assert_close(out.embedded[m][b], expected, rtol=1e-5, atol=1e-6)


def test_text_embeds_the_lstm_state_after_the_last_valid_word():
    torch.manual_seed(0)
    model = with_input_statistics(TFN(narrow(), MOSI), seed=7).eval()
    batch = random_batch(4, SMALL_UNALIGNED, MOSI, seed=8)
    p = model.projection["text"]
    with torch.no_grad():
        out = model(batch)
        for b in range(len(batch)):
            x = p.normalise(batch.text[b, : batch.text_len[b]])  # (L, k_t), one sample alone
            _, (h, _) = model.text.lstm(x[None])
            torch.testing.assert_close(
                out.embedded["text"][b], model.text.linear(h[-1, 0]), rtol=1e-5, atol=1e-6
            )


# -------------------------------------------------------------------------------------------------------
# gradients and loss


def test_every_parameter_receives_a_nonzero_gradient():
    torch.manual_seed(0)
    model = TFN(narrow(), MOSI).train()
    # an odd batch: the L1 gradient of the output bias is a mean of +-1 signs, zero for an even split
    batch = random_batch(5, SMALL_UNALIGNED, MOSI, seed=5)
    total, _ = model.loss(model(batch), batch, weights())
    total.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"parameters without gradient: {dead}"  # no exceptions: every parameter learns


def test_the_loss_is_the_task_l1_alone_and_moves_with_the_labels():
    torch.manual_seed(0)
    model = TFN(narrow(), MOSI).eval()
    batch = random_batch(5, SMALL_ALIGNED, MOSI, seed=9)
    with torch.no_grad():
        out = model(batch)
    expected = sum(abs(p - y) for p, y in zip(out.pred.tolist(), batch.label.tolist(), strict=True)) / 5
    assert TFN.WEIGHTED_TERMS == () and weights() == {}
    for w in ({}, {"unimodal": 7.0, "rec": 3.0}):  # weights of absent terms are ignored
        total, terms = model.loss(out, batch, w)
        assert list(terms) == ["task"]
        assert total.item() == pytest.approx(expected, abs=1e-6)
        assert terms["task"].item() == pytest.approx(expected, abs=1e-6)
    # every prediction lies in (-3, 3), so with every label at 4 the L1 is exactly 4 - mean(pred)
    high = dataclasses.replace(batch, label=torch.full((5,), 4.0))
    moved, _ = model.loss(out, high, {})
    assert moved.item() == pytest.approx(4.0 - out.pred.mean().item(), abs=1e-5)


def test_a_tiny_batch_is_overfitted():
    torch.manual_seed(0)
    model = TFN(narrow(**NO_DROPOUT), MOSI).train()
    batch = random_batch(24, SMALL_UNALIGNED, MOSI, seed=10)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    start = None
    for _ in range(100):
        total, terms = model.loss(model(batch), batch, weights())
        start = terms["task"].item() if start is None else start
        if terms["task"].item() < 0.1 * start:
            break
        opt.zero_grad()
        total.backward()
        opt.step()
    assert terms["task"].item() < 0.1 * start, (start, terms["task"].item())


# -------------------------------------------------------------------------------------------------------
# state


def test_state_dict_round_trip_keeps_outputs_and_statistics():
    torch.manual_seed(0)
    model = TFN(narrow(), MOSI)
    train = random_batch(16, SMALL_UNALIGNED, MOSI, seed=11)
    fit_input_statistics(model, train)  # fills the standardisation buffers like any projection
    for m in MODALITIES:
        assert not torch.equal(model.projection[m].in_mean, torch.zeros_like(model.projection[m].in_mean))
    state = model.state_dict()
    for m in MODALITIES:
        assert f"projection.{m}.in_mean" in state
    assert "projection.text.in_basis" in state  # the default whitens the text to principal components
    assert "projection.audio.in_scale" in state and "projection.vision.in_scale" in state
    assert not any("conv" in k for k in state)  # the standardisation carries no convolution

    torch.manual_seed(1)
    other = TFN(narrow(), MOSI)
    batch = random_batch(3, SMALL_UNALIGNED, MOSI, seed=12)
    with torch.no_grad():
        assert not torch.equal(other.eval()(batch).pred, model.eval()(batch).pred)
        other.load_state_dict(state)
        assert torch.equal(other(batch).pred, model(batch).pred)


# -------------------------------------------------------------------------------------------------------
# the tensor fusion layer


def test_fusion_of_a_hand_built_case():
    # [z; 1] per modality, the 1 last; flattened with audio slowest and text fastest:
    # a in (2, 1), v in (3, 1), t in (5, 1):
    # (2,3,5) (2,3,1) (2,1,5) (2,1,1) (1,3,5) (1,3,1) (1,1,5) (1,1,1)
    fused = tensor_fusion(torch.tensor([[2.0]]), torch.tensor([[3.0]]), torch.tensor([[5.0]]))
    assert fused.tolist() == [[30.0, 6.0, 10.0, 2.0, 15.0, 3.0, 5.0, 1.0]]
    assert fused.shape[1] == (1 + 1) * (1 + 1) * (1 + 1)


def test_fusion_holds_every_triple_product_at_its_index():
    g = torch.Generator().manual_seed(13)
    d_a, d_v, d_t = 2, 3, 4
    z_a, z_v, z_t = (torch.randn(2, d, generator=g) for d in (d_a, d_v, d_t))
    fused = tensor_fusion(z_a, z_v, z_t)
    assert fused.shape == (2, (d_a + 1) * (d_v + 1) * (d_t + 1))
    for b in range(2):
        a, v, t = ([*z[b].tolist(), 1.0] for z in (z_a, z_v, z_t))
        expected = [
            a[i] * v[j] * t[k]
            for i, j, k in itertools.product(range(d_a + 1), range(d_v + 1), range(d_t + 1))
        ]
        torch.testing.assert_close(fused[b], torch.tensor(expected), rtol=1e-6, atol=1e-6)
        cube = fused[b].view(d_a + 1, d_v + 1, d_t + 1)
        # the appended 1 keeps the unimodal and bimodal terms, and a constant
        torch.testing.assert_close(cube[:d_a, d_v, d_t], z_a[b])
        torch.testing.assert_close(cube[d_a, :d_v, d_t], z_v[b])
        torch.testing.assert_close(cube[d_a, d_v, :d_t], z_t[b])
        torch.testing.assert_close(cube[:d_a, :d_v, d_t], torch.outer(z_a[b], z_v[b]))
        assert cube[d_a, d_v, d_t].item() == 1.0


def test_the_model_fuses_its_own_embeddings_and_reads_the_whole_tensor():
    torch.manual_seed(0)
    cfg = narrow()
    model = TFN(cfg, MOSEI).eval()
    batch = random_batch(3, SMALL_ALIGNED, MOSEI, seed=14)
    with torch.no_grad():
        out = model(batch)
    e = out.embedded
    torch.testing.assert_close(out.fused, tensor_fusion(e["audio"], e["vision"], e["text"]))
    assert out.fused.shape == (3, fused_size(cfg)) == (3, 7 * 7 * 6)
    assert model.head[1].in_features == fused_size(cfg)
