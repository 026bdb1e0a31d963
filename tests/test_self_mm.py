"""Self-MM: shapes, padding invariance, gradients, the loss, fitting, state, and the ULGM (unimodal label
generation) against hand-computed labels, momentum fractions and per-sample buffers."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from mdkat import MODALITIES
from mdkat.models.encoders import fit_input_statistics
from mdkat.models.self_mm import REPRESENTATIONS, SelfMM, SelfMMConfig, UnimodalLabels
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

# `params.yaml`'s `model.self_mm` section (with changes) and `loss.self_mm` weights
config = functools.partial(section, "self_mm")
weights = functools.partial(section_weights, "self_mm")


pytestmark = pytest.mark.usefixtures("one_torch_thread")

NO_DROPOUT = {
    "text_dropout": 0.0,
    "lstm_dropout": {"audio": 0.0, "vision": 0.0},
    "post_dropout": {"text": 0.0, "audio": 0.0, "vision": 0.0},
    "fusion_dropout": 0.0,
}


def narrow(**changes) -> SelfMMConfig:
    """A small model for tests whose point does not depend on the widths."""
    return config(
        **{
            "encoder_out": {"text": 12, "audio": 6, "vision": 6},
            "post_dim": {"text": 8, "audio": 6, "vision": 6},
            "lstm_hidden": {"audio": 6, "vision": 6},
            "fusion_dim": 12,
            **changes,
        }
    )


def numbered(batch, index: list[int]):
    """`batch` whose samples sit at positions `index` of the training split."""
    return dataclasses.replace(batch, index=torch.tensor(index))


def buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: b.clone() for name, b in model.named_buffers()}


# -------------------------------------------------------------------------------------------------------
# shapes


@pytest.mark.parametrize("dims", [MOSI, MOSEI], ids=["mosi", "mosei"])
@pytest.mark.parametrize("steps", [ALIGNED, UNALIGNED], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("n", [1, 3])
def test_output_shapes_for_both_datasets_alignments_and_batch_sizes(dims, steps, n):
    torch.manual_seed(0)
    cfg = config()
    model = SelfMM(cfg, dims, steps is ALIGNED, {"train": n, "valid": 2})
    batch = random_batch(n, steps, dims, seed=n)
    with torch.no_grad():
        for _ in range(3):  # training mode; the second and third forwards update the labels
            out = model(batch)
            total, terms = model.loss(out, batch, weights())
        model.eval()
        evaluated = model(batch)
    assert out.pred.shape == evaluated.pred.shape == (n,)
    assert {m: out.mask[m].shape for m in MODALITIES} == {m: (n, steps[m]) for m in MODALITIES}
    assert {m: out.unimodal[m].shape for m in MODALITIES} == {m: (n,) for m in MODALITIES}
    assert {m: out.targets[m].shape for m in MODALITIES} == {m: (n,) for m in MODALITIES}
    assert {m: out.pooled_specific[m].shape for m in MODALITIES} == {
        "text": (n, 32),
        "audio": (n, 16),
        "vision": (n, 32),
    }
    assert out.fused.shape == (n, 128)
    assert tuple(terms) == SelfMM.loss_terms(cfg) == ("task", "unimodal")
    assert all(v.shape == () and torch.isfinite(v) for v in terms.values()), terms
    assert total.shape == () and torch.isfinite(total)
    assert model.ulgm.generated.shape == (n, 3) and torch.isfinite(model.ulgm.generated).all()


def test_parameter_count_at_the_default_section_matches_the_docstring():
    model = SelfMM(config(), MOSI, True, {"train": 1284})
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 749_924
    assert model.text.weight.numel() + model.text.bias.numel() == 590_592


# -------------------------------------------------------------------------------------------------------
# padding


@pytest.mark.parametrize("steps", [SMALL_ALIGNED, SMALL_UNALIGNED], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("extra", [(6, 6, 6), (3, 11, 17)], ids=["equal", "unequal"])
@pytest.mark.parametrize("pooling", ["mean", "first"])
def test_predictions_ignore_appended_padding_and_its_values(steps, extra, pooling):
    torch.manual_seed(0)
    model = with_input_statistics(SelfMM(config(text_pooling=pooling), MOSI), seed=3).eval()
    batch = random_batch(5, steps, MOSI, seed=1)
    extra = dict(zip(MODALITIES, extra, strict=True))
    with torch.no_grad():
        reference = model(batch)
        for longer in (padded(batch, extra), padded(batch, extra, garbage_seed=2)):
            out = model(longer)
            assert (out.pred - reference.pred).abs().max() < 1e-5
            for m in MODALITIES:
                assert (out.unimodal[m] - reference.unimodal[m]).abs().max() < 1e-5, m
    assert reference.pred.abs().min() > 0  # the comparison is not between zeros


@pytest.mark.parametrize("pooling", ["mean", "first"])
def test_a_sample_without_valid_steps_reads_zeros_whatever_its_padding_holds(pooling):
    torch.manual_seed(0)
    model = with_input_statistics(SelfMM(config(text_pooling=pooling), MOSI), seed=3).eval()
    batch = random_batch(4, SMALL_UNALIGNED, MOSI, seed=15)
    empty = {f"{m}_len": batch.lengths(m).clone().index_fill_(0, torch.tensor([1]), 0) for m in MODALITIES}
    batch = dataclasses.replace(
        batch, **empty, **{m: batch.features(m) * (torch.arange(4) != 1)[:, None, None] for m in MODALITIES}
    )
    with torch.no_grad():
        reference = model(batch)
        out = model(padded(batch, {"text": 2, "audio": 3, "vision": 4}, garbage_seed=16))
    assert torch.isfinite(reference.pred).all()
    assert (out.pred - reference.pred).abs().max() < 1e-5


def test_generated_labels_ignore_padding():
    """The ULGM reads representations only: padded steps change neither the labels nor the memory."""
    batch = random_batch(6, SMALL_UNALIGNED, MOSI, seed=4)
    longer = padded(batch, {"text": 4, "audio": 9, "vision": 2}, garbage_seed=5)
    states = []
    for b in (batch, longer):
        torch.manual_seed(0)
        model = with_input_statistics(SelfMM(config(**NO_DROPOUT), MOSI, False, {"train": 6}), seed=3)
        with torch.no_grad():
            for _ in range(3):
                model(b)
        states.append(buffers(model.ulgm))
    for name, value in states[0].items():
        assert torch.allclose(value.float(), states[1][name].float(), atol=1e-5), name
    assert not torch.equal(states[0]["generated"], states[0]["human"][:, None].expand(-1, 3))


# -------------------------------------------------------------------------------------------------------
# gradients and the loss


def test_every_parameter_learns_once_generated_labels_differ():
    torch.manual_seed(0)
    model = SelfMM(config(), MOSI, False, {"train": 5})
    batch = random_batch(5, SMALL_UNALIGNED, MOSI, seed=2)
    with torch.no_grad():  # first forward: labels start as y; second: the first update
        model(batch)
        model(batch)
    total, terms = model.loss(model(batch), batch, weights())
    total.backward()
    assert terms["unimodal"] > 0
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert no_grad == []


def test_unimodal_heads_learn_nothing_while_their_labels_equal_the_human_ones():
    """w = tanh(|y_s - y|) = 0 in the first epoch: the paper's weighting, not a broken head."""
    torch.manual_seed(0)
    model = SelfMM(config(), MOSI, False, {"train": 5})
    batch = random_batch(5, SMALL_UNALIGNED, MOSI, seed=2)
    out = model(batch)
    total, terms = model.loss(out, batch, weights())
    total.backward()
    assert terms["unimodal"] == 0
    assert all(torch.equal(out.targets[m], batch.label) for m in MODALITIES)
    for m in MODALITIES:
        assert all(p.grad.abs().sum() == 0 for p in model.heads[m].parameters()), m
    assert all(p.grad.abs().sum() > 0 for p in model.heads["fusion"].parameters())


def test_total_is_task_plus_weight_times_unimodal_and_the_term_is_the_weighted_l1():
    torch.manual_seed(0)
    model = SelfMM(narrow(), MOSI, True, {"train": 7})
    batch = random_batch(7, SMALL_ALIGNED, MOSI, seed=6)
    with torch.no_grad():
        model(batch)
        model(batch)
        out = model(batch)
        base, terms = model.loss(out, batch, {"unimodal": 0.0})
        assert terms["unimodal"] > 0 and torch.isfinite(terms["unimodal"])
        assert base == terms["task"]
        for w in (0.5, 2.0):
            total, _ = model.loss(out, batch, {"unimodal": w})
            assert torch.isclose(total - base, w * terms["unimodal"], rtol=1e-5, atol=1e-7)
        weight = {m: torch.tanh((out.targets[m] - batch.label).abs()) for m in MODALITIES}
        expected = sum((weight[m] * (out.unimodal[m] - out.targets[m]).abs()).mean() for m in MODALITIES)
        assert torch.isclose(terms["unimodal"], expected, rtol=1e-5)
        # the term moves with the targets and with the heads' predictions
        moved = dataclasses.replace(out, targets={m: t + 0.3 for m, t in out.targets.items()})
        assert model.loss(moved, batch, {"unimodal": 1.0})[1]["unimodal"] != terms["unimodal"]
        shifted = dataclasses.replace(out, unimodal={m: p + 0.7 for m, p in out.unimodal.items()})
        assert model.loss(shifted, batch, {"unimodal": 1.0})[1]["unimodal"] != terms["unimodal"]
        model.eval()  # the human labels are the targets: the term vanishes, the total is the task L1
        evaluated = model(batch)
        total, terms = model.loss(evaluated, batch, weights())
    assert terms["unimodal"] == 0 and total == terms["task"]


def test_a_tiny_batch_is_overfitted():
    torch.manual_seed(0)
    model = SelfMM(narrow(**NO_DROPOUT), MOSI, True, {"train": 24})
    batch = random_batch(24, SMALL_ALIGNED, MOSI, seed=7)
    fit_input_statistics(model, batch)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(100):
        total, terms = model.loss(model(batch), batch, weights())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        first = terms["task"] if first is None else first
        if terms["task"] < 0.1 * first:
            break
    assert terms["task"] < 0.1 * first, (first, terms)


# -------------------------------------------------------------------------------------------------------
# state


def test_state_dict_round_trip_gives_identical_eval_outputs_and_carries_the_buffers():
    torch.manual_seed(0)
    model = with_input_statistics(SelfMM(config(), MOSI, False, {"train": 6}), seed=1)
    batch = random_batch(6, SMALL_UNALIGNED, MOSI, seed=8)
    with torch.no_grad():
        model(batch)
        model(batch)
    state = model.state_dict()
    for name in ("human", "generated", "visits", *(f"memory_{r}" for r in REPRESENTATIONS)):
        assert f"ulgm.{name}" in state
    assert {f"normalise.{m}.in_mean" for m in MODALITIES} <= set(state)
    torch.manual_seed(1)
    copy = SelfMM(config(), MOSI, False, {"train": 6})
    copy.load_state_dict(state)
    model.eval(), copy.eval()
    with torch.no_grad():
        assert torch.equal(model(batch).pred, copy(batch).pred)


def test_fit_input_statistics_reaches_the_normalisation():
    model = SelfMM(config(), MOSI)
    batch = random_batch(8, SMALL_UNALIGNED, MOSI, seed=9)
    batch = dataclasses.replace(batch, audio=batch.audio + 4.0 * (batch.audio != 0))
    fit_input_statistics(model, batch)
    assert model.normalise["audio"].in_mean.abs().min() > 1.0


# -------------------------------------------------------------------------------------------------------
# the ULGM


def hand_built(squared: bool) -> UnimodalLabels:
    """Three seen training samples with 2-d representations; human labels 2, -1, 1.2.

    Centres (sample 2's stored representations are zero and it is positive everywhere):
      fusion: positive mean((2, 0), (0, 0)) = (1, 0), negative (0, 2)
      text:   positive mean((4, 0), (0, 0)) = (2, 0), negative (0, 1)
      audio:  positive mean((0, 0), (0, 0)) = (0, 0), negative (3, 0)
      vision: every representation zero, so both centres are (0, 0)
    """
    ulgm = UnimodalLabels(3, dict.fromkeys(REPRESENTATIONS, 2), bound=3.0, squared=squared)
    ulgm.human.copy_(torch.tensor([2.0, -1.0, 1.2]))
    ulgm.generated.copy_(ulgm.human[:, None].expand(-1, 3))
    ulgm.visits.fill_(1)
    ulgm.memory_fusion.copy_(torch.tensor([[2.0, 0.0], [0.0, 2.0], [0.0, 0.0]]))
    ulgm.memory_text.copy_(torch.tensor([[4.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    ulgm.memory_audio.copy_(torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 0.0]]))
    return ulgm


# sample 2's representations now: zero, except audio at (0.5, 0)
NOW = {"fusion": [[0.0, 0.0]], "text": [[0.0, 0.0]], "audio": [[0.5, 0.0]], "vision": [[0.0, 0.0]]}


def now() -> dict[str, torch.Tensor]:
    return {name: torch.tensor(v) for name, v in NOW.items()}


def delta(y: float, alpha_s: float, alpha_f: float) -> float:
    """The paper's offset delta_sf = (alpha_s - alpha_f)(y + alpha_f) / (2 alpha_f)."""
    return (alpha_s - alpha_f) * (y + alpha_f) / (2 * alpha_f)


def test_centres_are_the_means_of_the_seen_positive_and_negative_samples():
    ulgm = hand_built(squared=True)
    expected = {
        "fusion": ([1.0, 0.0], [0.0, 2.0]),
        "text": ([2.0, 0.0], [0.0, 1.0]),
        "audio": ([0.0, 0.0], [3.0, 0.0]),
        "vision": ([0.0, 0.0], [0.0, 0.0]),
    }
    for name, (pos, neg) in expected.items():
        c_p, c_n = ulgm.centres(name)
        assert c_p.tolist() == pos and c_n.tolist() == neg, name
    ulgm.visits[0] = 0  # an unseen sample's (stale) representation counts in no centre
    assert ulgm.centres("text")[0].tolist() == [0.0, 0.0]
    ulgm.visits[0], ulgm.human[2] = 1, 0.0  # a zero label is neither positive nor negative
    assert ulgm.centres("fusion")[0].tolist() == [2.0, 0.0]


@pytest.mark.parametrize("squared", [True, False], ids=["paper", "authors_code"])
def test_generated_label_equals_the_paper_formula_by_hand(squared):
    """Sample 2 (y = 1.2).

    Paper distances ||F - C||^2 / sqrt(d) (the sqrt(d) cancels in alpha):
      fusion: D^p ~ 1, D^n ~ 4: alpha_f = 3;   text: 4 and 1: alpha_t = -0.75
      audio: 0.25 and 6.25: alpha_a = 24;      vision: 0 and 0: alpha_v = 0
      y_t = 1.2 + (-0.75 - 3)(1.2 + 3) / 6 = 1.2 - 2.625 = -1.425
      y_a = 1.2 + (24 - 3)(4.2) / 6 = 15.9, clipped to H = 3
      y_v = 1.2 + (0 - 3)(4.2) / 6 = -0.9
    The authors' code's distances ||F - C||: alpha_f = (2 - 1) / 1 = 1, alpha_t = (1 - 2) / 2 = -0.5,
    alpha_a = (2.5 - 0.5) / 0.5 = 4, alpha_v = 0:
      y_t = 1.2 + (-1.5)(2.2) / 2 = -0.45,  y_a = 1.2 + 3 (2.2) / 2 = 4.5 -> 3,  y_v = 1.2 - 2.2 / 2 = 0.1
    """
    ulgm = hand_built(squared)
    expected = [-1.425, 3.0, -0.9] if squared else [-0.45, 3.0, 0.1]
    alpha_f, alpha = (3.0, (-0.75, 24.0, 0.0)) if squared else (1.0, (-0.5, 4.0, 0.0))
    by_delta = [min(1.2 + delta(1.2, a, alpha_f), 3.0) for a in alpha]  # y + delta_sf, clipped to H
    assert by_delta == pytest.approx(expected)
    estimate = ulgm.estimate(torch.tensor([2]), now())
    assert torch.allclose(estimate, torch.tensor([expected]), atol=1e-5), estimate


def test_momentum_moves_two_thirds_then_one_half_of_the_way_to_the_new_estimate():
    """First update of sample 2 (its second forward, n = 2): y = 1.2 + 2/3 (estimate - 1.2):
      text: 1.2 + 2/3 (-1.425 - 1.2) = -0.55;  audio: 1.2 + 2/3 (3 - 1.2) = 2.4;  vision: 1.2 - 1.4 = -0.2
    Second update (n = 3), same representations. Text is now negative for sample 2, so the text centres
    are positive (4, 0) (sample 0), negative mean((0, 1), (0, 0)) = (0, 0.5); D^p = 16, D^n = 0.25:
      alpha_t = (0.25 - 16) / 16 = -0.984375, estimate 1.2 + (-3.984375)(4.2) / 6 = -1.5890625
      y_t = -0.55 + 1/2 (-1.5890625 + 0.55) = -1.06953125
    """
    ulgm = hand_built(squared=True)
    index, label = torch.tensor([2]), torch.tensor([1.2])
    targets = ulgm.step(index, label, now())
    assert torch.allclose(targets, torch.tensor([[1.2, 1.2, 1.2]]))  # the labels before the update
    assert torch.allclose(ulgm.generated[2], torch.tensor([-0.55, 2.4, -0.2]), atol=1e-5)
    assert ulgm.visits.tolist() == [1, 1, 2]

    before = ulgm.generated[2].clone()
    estimate = ulgm.estimate(index, now())[0]
    assert abs(estimate[0].item() - -1.5890625) < 1e-5
    ulgm.step(index, label, now())
    assert torch.allclose(ulgm.generated[2], before + 0.5 * (estimate - before), atol=1e-6)
    assert abs(ulgm.generated[2, 0].item() - -1.06953125) < 1e-5
    assert ulgm.visits.tolist() == [1, 1, 3]


def test_each_sample_moves_by_the_fraction_of_its_own_count():
    """Samples 0 (third forward: 2/4) and 2 (second forward: 2/3) in one batch; 1 - first forward - stays."""
    ulgm = hand_built(squared=True)
    ulgm.visits.copy_(torch.tensor([2, 0, 1]))
    index, label = torch.tensor([0, 1, 2]), torch.tensor([2.0, -1.0, 1.2])
    g = torch.Generator().manual_seed(0)
    features = {name: torch.randn(3, 2, generator=g) for name in REPRESENTATIONS}
    before = ulgm.generated.clone()
    estimate = ulgm.estimate(index, features)
    ulgm.step(index, label, features)
    fraction = torch.tensor([[1 / 2], [0.0], [2 / 3]])
    assert torch.allclose(ulgm.generated, before + fraction * (estimate - before), atol=1e-6)
    assert ulgm.visits.tolist() == [3, 1, 2]
    assert all(torch.equal(ulgm.memory(name), features[name]) for name in REPRESENTATIONS)


def test_labels_start_as_the_human_label_and_are_bounded():
    ulgm = UnimodalLabels(4, dict.fromkeys(REPRESENTATIONS, 3), bound=3.0, squared=True)
    g = torch.Generator().manual_seed(1)
    label = torch.tensor([2.5, -0.4, 0.0, -3.0])
    for _ in range(6):
        features = {name: torch.randn(4, 3, generator=g) * 5 for name in REPRESENTATIONS}
        targets = ulgm.step(torch.arange(4), label, features)
        if _ == 0:
            assert torch.equal(targets, label[:, None].expand(-1, 3))
    assert torch.isfinite(ulgm.generated).all() and ulgm.generated.abs().max() <= 3.0
    assert not torch.equal(ulgm.generated, label[:, None].expand(-1, 3))


def test_eval_forwards_never_change_the_buffers():
    torch.manual_seed(0)
    model = SelfMM(narrow(), MOSI, False, {"train": 6})
    batch = numbered(random_batch(6, SMALL_UNALIGNED, MOSI, seed=10), [0, 1, 2, 3, 4, 5])
    with torch.no_grad():
        model(batch)
        model(batch)
    before = buffers(model)
    model.eval()
    with torch.no_grad():
        for _ in range(3):
            out = model(batch)
            model.loss(out, batch, weights())
    after = buffers(model)
    assert all(torch.equal(before[name], after[name]) for name in before)
    model.train()
    with torch.no_grad():
        model(batch)
    assert not torch.equal(after["ulgm.generated"], model.ulgm.generated)  # training mode does update


def test_restored_buffers_give_identical_subsequent_updates():
    batch = random_batch(6, SMALL_UNALIGNED, MOSI, seed=11)
    torch.manual_seed(0)
    model = SelfMM(narrow(**NO_DROPOUT), MOSI, False, {"train": 6})
    with torch.no_grad():
        model(batch)
        model(batch)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    restored = SelfMM(narrow(**NO_DROPOUT), MOSI, False, {"train": 6})
    restored.load_state_dict(state)
    weights_only = SelfMM(narrow(**NO_DROPOUT), MOSI, False, {"train": 6})  # same weights, fresh ULGM
    weights_only.load_state_dict({k: v for k, v in state.items() if not k.startswith("ulgm.")}, strict=False)
    with torch.no_grad():
        outs = [m(batch) for m in (model, restored, weights_only)]
    assert torch.equal(model.ulgm.generated, restored.ulgm.generated)
    mine, theirs = buffers(model), buffers(restored)
    assert all(torch.equal(mine[name], theirs[name]) for name in mine)
    assert all(torch.equal(outs[0].targets[m], outs[1].targets[m]) for m in MODALITIES)
    assert not torch.equal(model.ulgm.generated, weights_only.ulgm.generated)  # the buffers carry the state


def test_a_training_forward_changes_only_the_rows_of_its_samples():
    torch.manual_seed(0)
    model = SelfMM(narrow(), MOSI, True, {"train": 10})
    everyone = random_batch(10, SMALL_ALIGNED, MOSI, seed=12)
    with torch.no_grad():
        model(everyone)  # every sample seen once: labels set, representations stored
        before = buffers(model.ulgm)
        model(numbered(everyone.select(torch.tensor([3, 7])), [3, 7]))
    after = buffers(model.ulgm)
    others = torch.tensor([i for i in range(10) if i not in (3, 7)])
    for name in before:
        assert torch.equal(before[name][others], after[name][others]), name
    assert after["visits"].tolist() == [1, 1, 1, 2, 1, 1, 1, 2, 1, 1]
    for row in (3, 7):
        assert not torch.equal(before["generated"][row], after["generated"][row]), row
        assert not torch.equal(before["memory_fusion"][row], after["memory_fusion"][row]), row


def test_select_keeps_each_samples_position_in_the_split():
    """The loop indexes batches with `Batch.select`, which carries the positions the buffers need."""
    everyone = random_batch(10, SMALL_ALIGNED, MOSI, seed=12)
    assert everyone.select(torch.tensor([7, 3])).index.tolist() == [7, 3]


def test_the_update_runs_in_float32_under_bf16_autocast():
    """The loop trains under bf16 autocast on CUDA; CPU autocast stands in for it (matmul goes to bf16)."""

    def run(autocast: bool) -> UnimodalLabels:
        ulgm = UnimodalLabels(8, dict.fromkeys(REPRESENTATIONS, 5), bound=3.0, squared=True)
        g = torch.Generator().manual_seed(17)
        label = torch.randn(8, generator=g)
        for _ in range(3):
            features = {name: (torch.randn(8, 5, generator=g) * 3).bfloat16() for name in REPRESENTATIONS}
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                ulgm.step(torch.arange(8), label, features)
        return ulgm

    under, plain = run(True), run(False)
    assert under.generated.dtype == under.memory_fusion.dtype == torch.float32
    assert torch.equal(under.generated, plain.generated)


def test_training_without_split_sizes_is_a_clear_error_and_eval_works():
    model = SelfMM(narrow(), MOSI)
    batch = random_batch(3, SMALL_ALIGNED, MOSI, seed=13)
    with pytest.raises(ValueError, match=r"sizes\['train'\]"):
        model(batch)
    model.eval()
    with torch.no_grad():
        assert model(batch).pred.shape == (3,)


def test_the_distance_scale_cancels_in_alpha():
    """sqrt(d) divides both distances of the paper's alpha: it changes nothing but the epsilon's weight."""
    from mdkat.models.self_mm import relative_distance

    g = torch.Generator().manual_seed(14)
    f, pos, neg = torch.randn(5, 9, generator=g), torch.randn(9, generator=g), torch.randn(9, generator=g)
    d_p, d_n = (f - pos).pow(2).sum(-1), (f - neg).pow(2).sum(-1)
    assert torch.allclose(relative_distance(f, pos, neg, squared=True), (d_n - d_p) / d_p, rtol=1e-5)
    assert torch.allclose(
        relative_distance(f, pos, neg, squared=False), (d_n.sqrt() - d_p.sqrt()) / d_p.sqrt(), rtol=1e-5
    )
