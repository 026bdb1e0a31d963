"""DMD: shapes, padding invariance, gradients, the weighted terms, fitting, state, the graph distillation
units (edges, the distillation term), time bins, the margin loss and the parameter count against the
authors' model."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from mdkat import MODALITIES
from mdkat.models.dmd import DMD, DMDConfig, GraphDistillation, distillation, margin_loss, time_bins
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

# `params.yaml`'s `model.dmd` section (with changes) and `loss.dmd` weights
config = functools.partial(section, "dmd")
weights = functools.partial(section_weights, "dmd")


pytestmark = pytest.mark.usefixtures("one_torch_thread")

NO_DROPOUT = {
    "input_dropout": {"text": 0.0, "audio": 0.0, "vision": 0.0},
    "dropout": 0.0,
    "embed_dropout": 0.0,
    "out_dropout": 0.0,
}
# the authors' model without BERT (module docstring): all parameters, and those its forward pass uses
AUTHORS_PARAMETERS = 4_750_732
AUTHORS_USED_PARAMETERS = 4_405_582


def narrow(**changes) -> DMDConfig:
    """A small model for tests whose point does not depend on the widths."""
    small = {"width": 8, "heads": 2, "layers": 1, "memory_layers": 1, "bins": 4}
    return config(**{**small, "homo_gd_hidden": 6, "hetero_gd_hidden": 5, **changes})


def stack(values: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.stack([values[m] for m in MODALITIES], 1)


# -------------------------------------------------------------------------------------------------------
# shapes


@pytest.mark.parametrize("dims", [MOSI, MOSEI], ids=["mosi", "mosei"])
@pytest.mark.parametrize("steps", [ALIGNED, UNALIGNED], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("n", [1, 3])
def test_output_shapes_for_both_datasets_alignments_and_batch_sizes(dims, steps, n):
    torch.manual_seed(0)
    cfg = narrow()
    d = cfg.width
    model = DMD(cfg, dims, aligned=steps is ALIGNED)  # training mode: a batch of one must work there too
    batch = random_batch(n, steps, dims, seed=n)
    with torch.no_grad():
        out = model(batch)
        total, terms = model.loss(out, batch, weights())
    assert out.pred.shape == out.shared.shape == (n,)
    assert out.homo_edges.shape == out.hetero_edges.shape == (n, 3, 3)
    for m in MODALITIES:
        assert out.mask[m].shape == (n, steps[m])
        assert out.unimodal[m].shape == out.homo[m].shape == out.hetero[m].shape == (n,)
        for seq in ("independent", "specific", "projected", "reconstructed", "cycled"):
            assert getattr(out, seq)[m].shape == (n, steps[m], d), (seq, m)
        for pooled in ("pooled_independent", "pooled_specific", "aligned_shared"):
            assert getattr(out, pooled)[m].shape == (n, d), (pooled, m)
    assert tuple(terms) == DMD.loss_terms(cfg) == ("task", *DMD.WEIGHTED_TERMS)
    assert set(weights()) == set(DMD.WEIGHTED_TERMS)
    assert all(v.shape == () and torch.isfinite(v) for v in terms.values()), terms
    assert total.shape == () and torch.isfinite(total)


# -------------------------------------------------------------------------------------------------------
# padding


@pytest.mark.parametrize("steps", [SMALL_ALIGNED, SMALL_UNALIGNED], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("extra", [(6, 6, 6), (3, 11, 17)], ids=["equal", "unequal"])
def test_predictions_and_terms_ignore_appended_padding_and_its_values(steps, extra):
    torch.manual_seed(0)
    model = with_input_statistics(DMD(narrow(width=16), MOSI), seed=1).eval()
    batch = random_batch(5, steps, MOSI, seed=1)
    extra = dict(zip(MODALITIES, extra, strict=True))
    with torch.no_grad():
        reference = model(batch)
        _, reference_terms = model.loss(reference, batch, weights())
        for longer in (padded(batch, extra), padded(batch, extra, garbage_seed=2)):
            out = model(longer)
            assert (out.pred - reference.pred).abs().max() < 1e-5
            assert (out.shared - reference.shared).abs().max() < 1e-5
            for edges in ("homo_edges", "hetero_edges"):
                assert (getattr(out, edges) - getattr(reference, edges)).abs().max() < 1e-5, edges
            for m in MODALITIES:
                for field in ("homo", "hetero", "aligned_shared"):
                    assert (getattr(out, field)[m] - getattr(reference, field)[m]).abs().max() < 1e-5, field
            _, terms = model.loss(out, longer, weights())
            for name, value in terms.items():
                assert (value - reference_terms[name]).abs() < 1e-5, name


def test_a_sample_without_steps_is_defined_and_ignores_padding():
    torch.manual_seed(0)
    model = with_input_statistics(DMD(narrow(), MOSI), seed=2).eval()
    batch = random_batch(3, SMALL_UNALIGNED, MOSI, seed=3)
    batch = dataclasses.replace(batch, audio_len=torch.tensor([30, 0, 4]))
    with torch.no_grad():
        reference = model(batch)
        out = model(padded(batch, {"text": 5, "audio": 2, "vision": 3}, garbage_seed=4))
        _, terms = model.loss(reference, batch, weights())
    assert torch.isfinite(reference.pred).all()
    assert all(torch.isfinite(v) for v in terms.values()), terms
    assert (out.pred - reference.pred).abs().max() < 1e-5


# -------------------------------------------------------------------------------------------------------
# graph distillation units


def test_edges_are_non_negative_zero_on_the_diagonal_rows_normalised_and_input_dependent():
    torch.manual_seed(0)
    model = with_input_statistics(DMD(narrow(), MOSI), seed=5).eval()
    batch = random_batch(6, SMALL_UNALIGNED, MOSI, seed=6)
    with torch.no_grad():
        out = model(batch)
    for edges in (out.homo_edges, out.hetero_edges):
        assert (edges >= 0).all()
        assert (torch.diagonal(edges, dim1=1, dim2=2) == 0).all()  # no self-distillation
        torch.testing.assert_close(edges.sum(-1), torch.ones(6, 3))  # each student's teachers sum to 1
        assert (edges[1:] - edges[:1]).abs().amax((1, 2)).min() > 1e-6  # every sample its own graph


def test_edge_weights_are_the_scaled_softmax_of_the_pair_scores():
    # independent computation of one edge row: scores g([z_j; z_i]) of the other modalities, softmax
    torch.manual_seed(0)
    gd = GraphDistillation(repr_dim=4, hidden=3, scale=0.125)
    logits, reprs = torch.randn(2, 3), torch.randn(2, 3, 4)
    with torch.no_grad():
        edges = gd(logits, reprs)
        z = torch.cat([gd.logit(logits[..., None]), gd.repr(reprs)], -1)  # (B, M, 2h)
        for b in range(2):
            for j in range(3):
                teachers = [i for i in range(3) if i != j]
                score = torch.stack([gd.edge(torch.cat([z[b, j], z[b, i]]))[0] for i in teachers]) * 0.125
                torch.testing.assert_close(edges[b, j, teachers], score.softmax(0))


def test_distillation_is_zero_when_all_unimodal_logits_are_equal():
    torch.manual_seed(0)
    gd = GraphDistillation(repr_dim=4, hidden=3, scale=0.125)
    logits = torch.full((5, 3), 0.7)  # every modality predicts the same for each sample
    edges = gd(logits, torch.randn(5, 3, 4))
    assert distillation(logits, edges) == 0
    hand = torch.tensor([[[0.0, 0.3, 0.7], [0.5, 0.0, 0.5], [1.0, 0.0, 0.0]]])
    assert distillation(torch.tensor([[-1.2, -1.2, -1.2]]), hand) == 0


def test_distillation_weights_each_gap_by_its_edge_and_holds_the_teacher_fixed():
    # one sample, logits l = (0, 1, 3); rows are students, columns teachers
    edges = torch.tensor([[[0.0, 0.3, 0.7], [0.5, 0.0, 0.5], [1.0, 0.0, 0.0]]])
    logits = torch.tensor([[0.0, 1.0, 3.0]], requires_grad=True)
    loss = distillation(logits, edges)
    # student 0: 0.3 |0-1| + 0.7 |0-3| = 2.4; student 1: 0.5 |1-0| + 0.5 |1-3| = 1.5; student 2: 1.0 |3-0| = 3
    torch.testing.assert_close(loss, torch.tensor(6.9))
    loss.backward()
    # each logit moves only as a student: d/dl_j = sum_i w_ji sign(l_j - l_i)
    torch.testing.assert_close(logits.grad, torch.tensor([[-1.0, 0.0, 1.0]]))


# -------------------------------------------------------------------------------------------------------
# time bins and the margin loss


def test_time_bins_average_the_valid_steps_of_each_sample():
    x = torch.arange(2 * 6, dtype=torch.float32).view(2, 6, 1)  # sample 0: 0..5, sample 1: 6..11
    out = time_bins(x, torch.tensor([5, 2]), bins=2)  # (B, 2, 1)
    torch.testing.assert_close(out[0, :, 0], torch.tensor([(0 + 1 + 2) / 3, (2 + 3 + 4) / 3]))
    torch.testing.assert_close(out[1, :, 0], torch.tensor([6.0, 7.0]))
    short = time_bins(x, torch.tensor([6, 2]), bins=4)  # fewer steps than bins: each step fills two bins
    torch.testing.assert_close(short[1, :, 0], torch.tensor([6.0, 6.0, 7.0, 7.0]))


def test_margin_loss_against_a_loop_over_triplets_and_in_chunks():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(4, 3, 5, generator=g)  # (B, M, d)
    label = torch.tensor([1.0, -0.5, 1.0, 2.0])
    x = torch.nn.functional.normalize(features.flatten(0, 1), dim=-1)
    y = label.repeat_interleave(3)
    per_anchor = []
    for a in range(12):
        positives = [p for p in range(12) if p != a and y[p] == y[a]]
        negatives = [n for n in range(12) if y[n] != y[a]]
        hinges = [
            max(0.0, 0.15 * abs(y[a] - y[n]) - x[a] @ x[p] + x[a] @ x[n])
            for p in positives
            for n in negatives
        ]
        per_anchor.append(sum(hinges) / len(hinges))
    expected = torch.tensor(per_anchor).mean()
    torch.testing.assert_close(margin_loss(features, label, 0.15), expected)
    torch.testing.assert_close(margin_loss(features, label, 0.15, budget=1), expected)
    assert margin_loss(features[:1], label[:1], 0.15) == 0  # one sample: no negatives, no term


# -------------------------------------------------------------------------------------------------------
# gradients and loss


def test_every_parameter_learns_from_one_backward():
    torch.manual_seed(0)
    model = with_input_statistics(DMD(narrow(), MOSI), seed=7)
    batch = random_batch(5, SMALL_UNALIGNED, MOSI, seed=8)
    total, _ = model.loss(model(batch), batch, weights())
    total.backward()
    silent = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert silent == []  # no exceptions: every parameter reaches a weighted term


@pytest.mark.parametrize("term", DMD.WEIGHTED_TERMS)
def test_each_weighted_term_adds_weight_times_its_value(term):
    torch.manual_seed(0)
    model = with_input_statistics(DMD(narrow(), MOSI), seed=9).eval()
    batch = random_batch(6, SMALL_UNALIGNED, MOSI, seed=10)
    zero = dict.fromkeys(DMD.WEIGHTED_TERMS, 0.0)
    with torch.no_grad():
        out = model(batch)
        base, terms = model.loss(out, batch, zero)
        weighted, _ = model.loss(out, batch, {**zero, term: 0.37})
    torch.testing.assert_close(base, terms["task"])
    torch.testing.assert_close(weighted - base, 0.37 * terms[term])
    assert terms[term] > 0


def test_every_term_moves_with_the_model():
    torch.manual_seed(0)
    model = with_input_statistics(DMD(narrow(), MOSI), seed=11).eval()
    batch = random_batch(6, SMALL_UNALIGNED, MOSI, seed=12)
    with torch.no_grad():
        _, before = model.loss(model(batch), batch, weights())
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        _, after = model.loss(model(batch), batch, weights())
    moved = {name: (after[name] - before[name]).abs().item() for name in before}
    assert all(v > 1e-6 for v in moved.values()), moved


def test_a_narrow_model_fits_a_tiny_batch():
    torch.manual_seed(0)
    model = DMD(narrow(width=16, **NO_DROPOUT), MOSI)
    batch = random_batch(16, SMALL_UNALIGNED, MOSI, seed=13)
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
# state and size


def test_state_dict_round_trip_gives_identical_outputs_and_holds_the_buffers():
    torch.manual_seed(0)
    model = with_input_statistics(DMD(narrow(), MOSI), seed=14).eval()
    state = model.state_dict()
    for m in MODALITIES:
        assert f"projection.{m}.in_mean" in state and f"projection.{m}.in_scale" in state
    torch.manual_seed(1)
    other = DMD(narrow(), MOSI).eval()
    other.load_state_dict(state)
    batch = random_batch(3, SMALL_UNALIGNED, MOSI, seed=15)
    with torch.no_grad():
        a, b = model(batch), other(batch)
    torch.testing.assert_close(b.pred, a.pred, rtol=0, atol=0)
    torch.testing.assert_close(b.hetero_edges, a.hetero_edges, rtol=0, atol=0)


def test_the_parameter_count_matches_the_authors_model_at_their_mosi_setting():
    model = DMD(config(), MOSI, aligned=True)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert count == 4_407_982  # the module docstring's number
    assert abs(count - AUTHORS_USED_PARAMETERS) / AUTHORS_USED_PARAMETERS < 0.03
    # the authors' total also holds proj_cosine_* (3 x 115,150), which no output or loss reads
    assert AUTHORS_PARAMETERS - AUTHORS_USED_PARAMETERS == 3 * (46 * 50 * 50 + 50)
