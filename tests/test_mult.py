"""MulT and its crossmodal blocks: shapes, padding invariance, gradients, the loss, fitting, state, padded
keys against truncated sources, and every modality reaching the prediction."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from mdkat import MODALITIES
from mdkat.models import losses
from mdkat.models.crossmodal import CrossModalTransformer, MultimodalTransformer, last_valid
from mdkat.models.mult import MulT, MulTConfig
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

# `params.yaml`'s `model.mult` section (with changes) and `loss.mult` weights
config = functools.partial(section, "mult")
weights = functools.partial(section_weights, "mult")


pytestmark = pytest.mark.usefixtures("one_torch_thread")

NO_DROPOUT = {"input_dropout": {"text": 0.0, "audio": 0.0, "vision": 0.0}, "dropout": 0.0, "out_dropout": 0.0}


def narrow(**changes) -> MulTConfig:
    """A small model for tests whose point does not depend on the widths."""
    return config(**{"width": 8, "heads": 2, "layers": 2, "memory_layers": 1, **changes})


# -------------------------------------------------------------------------------------------------------
# shapes


@pytest.mark.parametrize("dims", [MOSI, MOSEI], ids=["mosi", "mosei"])
@pytest.mark.parametrize("steps", [ALIGNED, UNALIGNED], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("n", [1, 3])
def test_output_shapes_for_both_datasets_alignments_and_batch_sizes(dims, steps, n):
    torch.manual_seed(0)
    cfg = config()
    model = MulT(cfg, dims, aligned=steps is ALIGNED)  # training mode: a batch of one must work there too
    batch = random_batch(n, steps, dims, seed=n)
    with torch.no_grad():
        out = model(batch)
        total, terms = model.loss(out, batch, weights())
    assert out.pred.shape == (n,)
    assert {m: out.mask[m].shape for m in MODALITIES} == {m: (n, steps[m]) for m in MODALITIES}
    assert {m: out.projected[m].shape for m in MODALITIES} == {
        m: (n, steps[m], cfg.width) for m in MODALITIES
    }
    assert {m: out.last[m].shape for m in MODALITIES} == {m: (n, 2 * cfg.width) for m in MODALITIES}
    assert tuple(terms) == MulT.loss_terms(cfg) == ("task",)
    assert all(v.shape == () and torch.isfinite(v) for v in terms.values()), terms
    assert total.shape == () and torch.isfinite(total)


def test_all_six_directions_exist():
    model = MulT(narrow(), MOSI)
    assert sorted(model.fusion.crossmodal) == sorted(
        f"{s}_to_{t}" for t in MODALITIES for s in MODALITIES if s != t
    )
    assert len(model.fusion.crossmodal) == 6


# -------------------------------------------------------------------------------------------------------
# padding


@pytest.mark.parametrize("steps", [SMALL_ALIGNED, SMALL_UNALIGNED], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("extra", [(6, 6, 6), (3, 11, 17)], ids=["equal", "unequal"])
def test_predictions_ignore_appended_padding_and_its_values(steps, extra):
    torch.manual_seed(0)
    model = with_input_statistics(MulT(config(), MOSI), seed=1).eval()
    batch = random_batch(5, steps, MOSI, seed=1)
    extra = dict(zip(MODALITIES, extra, strict=True))
    with torch.no_grad():
        reference = model(batch)
        for longer in (padded(batch, extra), padded(batch, extra, garbage_seed=2)):
            out = model(longer)
            assert (out.pred - reference.pred).abs().max() < 1e-5
            for m in MODALITIES:
                assert (out.last[m] - reference.last[m]).abs().max() < 1e-5, m


def test_a_sample_without_steps_is_defined_and_ignores_padding():
    torch.manual_seed(0)
    model = with_input_statistics(MulT(narrow(), MOSI), seed=2).eval()
    batch = random_batch(3, SMALL_UNALIGNED, MOSI, seed=3)
    batch = dataclasses.replace(batch, text_len=torch.tensor([12, 0, 4]))
    with torch.no_grad():
        reference = model(batch).pred
        out = model(padded(batch, {"text": 5, "audio": 2, "vision": 3}, garbage_seed=4)).pred
    assert torch.isfinite(reference).all()
    assert (out - reference).abs().max() < 1e-5


# -------------------------------------------------------------------------------------------------------
# the crossmodal block


def test_padded_source_keys_give_the_output_of_the_truncated_source():
    torch.manual_seed(0)
    block = CrossModalTransformer(width=8, heads=2, layers=2, dropout=0.0).eval()
    g = torch.Generator().manual_seed(1)
    target = torch.randn(4, 7, 8, generator=g)  # (B, Tx, d)
    source = torch.randn(4, 11, 8, generator=g)  # (B, Ty, d): garbage after each length
    lengths = torch.tensor([11, 1, 5, 8])
    mask = torch.arange(11)[None, :] < lengths[:, None]  # (B, Ty)
    with torch.no_grad():
        out = block(target, source, mask)  # (B, Tx, d)
        for b in range(4):
            alone = block(
                target[b : b + 1], source[b : b + 1, : lengths[b]], torch.ones(1, int(lengths[b]), dtype=bool)
            )
            torch.testing.assert_close(out[b], alone[0], rtol=1e-5, atol=1e-6)
        # and the padded keys really are the ones being ignored: unmasked, they change the output
        unmasked = block(target, source, torch.ones_like(mask))
    assert (unmasked[1] - out[1]).abs().max() > 1e-3


def test_crossmodal_output_depends_on_the_source():
    torch.manual_seed(0)
    block = CrossModalTransformer(width=8, heads=2, layers=1, dropout=0.0).eval()
    target, source = torch.randn(2, 5, 8), torch.randn(2, 6, 8)
    mask = torch.ones(2, 6, dtype=bool)
    with torch.no_grad():
        a, b = block(target, source, mask), block(target, source + torch.randn(2, 6, 8), mask)
    assert (a - b).abs().min() > 0  # every target step moves with the source


def test_last_valid_reads_the_step_before_each_length():
    x = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    out = last_valid(x, torch.tensor([5, 2]))
    torch.testing.assert_close(out, torch.stack([x[0, 4], x[1, 1]]))


def test_fusion_reads_each_target_at_its_last_valid_step():
    # independent computation: each sample alone, cut to its valid steps, read at index -1 (the paper's way)
    torch.manual_seed(0)
    fusion = MultimodalTransformer(MODALITIES, 8, 2, 1, 1, 0.0).eval()
    g = torch.Generator().manual_seed(2)
    steps = {"text": 6, "audio": 9, "vision": 4}
    lengths = {
        "text": torch.tensor([6, 2, 3]),
        "audio": torch.tensor([9, 5, 1]),
        "vision": torch.tensor([4, 4, 2]),
    }
    x = {m: torch.randn(3, steps[m], 8, generator=g) for m in MODALITIES}
    mask = {m: torch.arange(steps[m])[None, :] < lengths[m][:, None] for m in MODALITIES}
    with torch.no_grad():
        out = fusion(x, mask, lengths)
        for b in range(3):
            cut = {m: x[m][b : b + 1, : lengths[m][b]] for m in MODALITIES}
            full = {m: torch.ones(1, int(lengths[m][b]), dtype=bool) for m in MODALITIES}
            ones = {m: lengths[m][b : b + 1] for m in MODALITIES}
            alone = fusion(cut, full, ones)
            for m in MODALITIES:
                torch.testing.assert_close(out[m][b], alone[m][0], rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------------------------------------------
# every modality reaches the prediction; steps past the length do not


@pytest.mark.parametrize("steps", [SMALL_ALIGNED, SMALL_UNALIGNED], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("modality", MODALITIES)
def test_prediction_depends_on_every_modality_and_not_on_steps_past_the_length(steps, modality):
    torch.manual_seed(0)
    model = with_input_statistics(MulT(narrow(), MOSI), seed=3).eval()
    batch = random_batch(4, steps, MOSI, seed=4)
    x = batch.features(modality)
    valid = (torch.arange(x.shape[1])[None, :] < batch.lengths(modality)[:, None])[..., None]  # (B, T, 1)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    inside = dataclasses.replace(batch, **{modality: x + noise * valid})
    outside = dataclasses.replace(batch, **{modality: x + (noise * 3 + 2) * ~valid})
    with torch.no_grad():
        reference, moved, same = model(batch).pred, model(inside).pred, model(outside).pred
    assert ((moved - reference).abs() > 1e-4).all(), modality  # every sample, through this modality alone
    assert (same - reference).abs().max() < 1e-5


# -------------------------------------------------------------------------------------------------------
# gradients and loss


def test_every_parameter_learns_from_one_backward():
    torch.manual_seed(0)
    model = with_input_statistics(MulT(config(), MOSI), seed=6)
    batch = random_batch(5, SMALL_UNALIGNED, MOSI, seed=7)
    total, _ = model.loss(model(batch), batch, weights())
    total.backward()
    silent = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert silent == []  # no exceptions: every parameter reaches the prediction


def test_the_loss_is_the_task_l1_and_ignores_weights():
    torch.manual_seed(0)
    model = MulT(narrow(), MOSI).eval()
    batch = random_batch(6, SMALL_ALIGNED, MOSI, seed=8)
    with torch.no_grad():
        out = model(batch)
        total, terms = model.loss(out, batch, {})
        other, _ = model.loss(out, batch, {"rec": 5.0})
    expected = (out.pred - batch.label).abs().mean()
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(terms["task"], expected)
    torch.testing.assert_close(other, total)
    assert losses.l1(out.pred + 1.0, batch.label) != terms["task"]  # the term moves with its input


def test_a_narrow_model_fits_a_tiny_batch():
    torch.manual_seed(0)
    model = MulT(narrow(width=16, layers=1, **NO_DROPOUT), MOSI)
    batch = random_batch(16, SMALL_UNALIGNED, MOSI, seed=9)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = last = None
    for _ in range(100):
        optimizer.zero_grad()
        total, terms = model.loss(model(batch), batch, weights())
        total.backward()
        optimizer.step()
        first = terms["task"].item() if first is None else first
        last = terms["task"].item()
        if last < 0.1 * first:
            break
    assert last < 0.1 * first, (first, last)


# -------------------------------------------------------------------------------------------------------
# state


def test_state_dict_round_trip_gives_identical_outputs_and_holds_the_buffers():
    torch.manual_seed(0)
    model = with_input_statistics(MulT(narrow(), MOSI), seed=10).eval()
    state = model.state_dict()
    for m in MODALITIES:
        assert f"projection.{m}.in_mean" in state and f"projection.{m}.in_scale" in state
    torch.manual_seed(1)
    other = MulT(narrow(), MOSI).eval()
    other.load_state_dict(state)
    batch = random_batch(3, SMALL_UNALIGNED, MOSI, seed=11)
    with torch.no_grad():
        torch.testing.assert_close(other(batch).pred, model(batch).pred, rtol=0, atol=0)
