"""The models as wholes: shapes, padding invariance, gradients, ablation switches, KT state, fitting.

Models are built from `params.yaml`'s model section, shrunk (width, heads) only where a test's point does
not depend on the size. The modules on their own (AMSA, KA, KT, loss functions) are in
`test_model_components.py`.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mdkat import MODALITIES
from mdkat.checks import load_checked
from mdkat.config import ConfigError, Params, load_params, with_values
from mdkat.data import Batch
from mdkat.data.synthetic import generate
from mdkat.models import REGISTRY, build, config_of, loss_terms
from tests.conftest import ROOT, small_data

PARAMS = load_params(ROOT / "params.yaml")
WEIGHTS = PARAMS.weights("mdkat")
MOSI = {"text": 768, "audio": 5, "vision": 20}
MOSEI = {"text": 768, "audio": 74, "vision": 35}
ALIGNED = {"text": 50, "audio": 50, "vision": 50}
UNALIGNED = {"text": 50, "audio": 375, "vision": 500}
SMALL_ALIGNED = {"text": 12, "audio": 12, "vision": 12}
SMALL_UNALIGNED = {"text": 12, "audio": 30, "vision": 41}
ALL_TERMS = ("task", "unimodal", "rec", "orth", "ka", "kt")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def setup(name: str = "mdkat", **changes) -> Params:
    """`params.yaml` with model `name` chosen and `changes` made to its section."""
    return with_values(PARAMS, {"model.name": name, **{f"model.{name}.{k}": v for k, v in changes.items()}})


def small(name: str = "mdkat", **changes) -> Params:
    """A narrow model for tests whose point does not depend on the width."""
    return setup(name, width=16, heads=2, **changes)


def random_batch(n: int, steps: dict[str, int], dims: dict[str, int], seed: int) -> Batch:
    """Random features, zero after each sample's length; lengths in [1, T], sample 0 at full length so
    that a sample without padding is always covered; labels in [-3, 3]."""
    g = torch.Generator().manual_seed(seed)
    features, lengths = {}, {}
    for m in MODALITIES:
        t = steps[m]
        length = torch.randint(1, t + 1, (n,), generator=g)
        length[0] = t
        x = torch.randn(n, t, dims[m], generator=g)
        lengths[m] = length
        features[m] = x * (torch.arange(t)[None, :] < length[:, None])[..., None]
    label = torch.rand(n, generator=g) * 6 - 3
    return Batch(
        **features, **{f"{m}_len": lengths[m] for m in MODALITIES}, label=label, id=[str(i) for i in range(n)]
    )


def padded(batch: Batch, extra: dict[str, int], garbage_seed: int | None = None) -> Batch:
    """`batch` with `extra[m]` more steps per modality, lengths unchanged; every step past a sample's
    length is zero, or random non-zero values when `garbage_seed` is given."""
    g = torch.Generator().manual_seed(garbage_seed or 0)
    features = {}
    for m in MODALITIES:
        x = batch.features(m)
        n, t, d = x.shape
        x = torch.cat([x, torch.zeros(n, extra[m], d)], dim=1)
        if garbage_seed is not None:
            beyond = torch.arange(t + extra[m])[None, :] >= batch.lengths(m)[:, None]  # (B, T')
            x = torch.where(beyond[..., None], torch.randn(x.shape, generator=g) * 5 + 3, x)
        features[m] = x
    return dataclasses.replace(batch, **features)


def with_input_statistics(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial input standardisation (means far from zero) in every projection of `model`, so that
    padded zeros would not stay zero after it."""
    from mdkat.models.encoders import Projection

    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, Projection):
            module.set_statistics(torch.randn(64, module.in_mean.shape[0], generator=g) * 2 + 1.5)
    return model


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# -------------------------------------------------------------------------------------------------------
# shapes


@pytest.mark.parametrize("name", sorted(REGISTRY))
@pytest.mark.parametrize("steps", [SMALL_ALIGNED, SMALL_UNALIGNED], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("n", [1, 3])
def test_every_model_of_the_registry_keeps_the_interface_the_loop_relies_on(name, steps, n):
    # what the one training loop, evaluation and the report read; each model's own shapes are in its file
    p = setup(name)
    model = build(p, MOSEI, aligned=len(set(steps.values())) == 1, sizes={"train": n, "valid": n})
    batch = random_batch(n, steps, MOSEI, seed=n)
    out = model(batch)  # training mode: models with per-sample state update it here
    total, terms = model.loss(out, batch, p.weights())
    assert out.pred.shape == (n,) and out.pred.dtype == torch.float32
    assert tuple(terms) == loss_terms(p) and terms["task"].item() == pytest.approx(
        (out.pred - batch.label).abs().mean().item(), rel=1e-5
    )
    assert all(v.shape == () and torch.isfinite(v) and not v.requires_grad for v in terms.values()), terms
    assert total.requires_grad and torch.isfinite(total)
    assert {m: out.mask[m].shape for m in MODALITIES} == {m: (n, steps[m]) for m in MODALITIES}
    for m, pred in out.unimodal.items():
        assert m in MODALITIES and pred.shape == (n,)


@pytest.mark.parametrize("name", ["mdkat", "late_fusion"])
@pytest.mark.parametrize("dims", [MOSI, MOSEI], ids=["mosi", "mosei"])
@pytest.mark.parametrize("steps", [ALIGNED, UNALIGNED], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("n", [1, 3])
def test_output_shapes_for_both_datasets_alignments_and_batch_sizes(name, dims, steps, n):
    p = setup(name)
    d = config_of(p).width
    model = build(p, dims)
    batch = random_batch(n, steps, dims, seed=n)
    with torch.no_grad():
        out = model(batch)
        _, terms = model.loss(out, batch, p.weights())
    assert out.pred.shape == (n,)
    assert tuple(terms) == loss_terms(p)
    assert all(v.shape == () and torch.isfinite(v) for v in terms.values()), terms
    assert {m: out.mask[m].shape for m in MODALITIES} == {m: (n, steps[m]) for m in MODALITIES}
    assert {m: out.pooled_specific[m].shape for m in MODALITIES} == {m: (n, d) for m in MODALITIES}
    if name == "late_fusion":
        return
    for m in MODALITIES:
        assert out.unimodal[m].shape == (n,)
        for seq in ("independent", "specific", "projected", "reconstructed"):
            assert getattr(out, seq)[m].shape == (n, steps[m], d), (seq, m)
        assert out.pooled_independent[m].shape == (n, d)
        assert out.importance[m].shape == (n, steps[m])


# -------------------------------------------------------------------------------------------------------
# padding


@pytest.mark.parametrize("name", sorted(REGISTRY))
@pytest.mark.parametrize("steps", [SMALL_ALIGNED, SMALL_UNALIGNED], ids=["aligned", "unaligned"])
# equal extra steps keep aligned inputs on the shared encoder's one batched call; unequal ones move them
# to the per-modality calls, which must agree with it
@pytest.mark.parametrize("extra", [(6, 6, 6), (3, 11, 17)], ids=["equal", "unequal"])
def test_predictions_ignore_appended_padding_and_its_values(name, steps, extra):
    cfg = config_of(PARAMS, "mdkat")
    assert cfg.use_cff and cfg.use_amsa and cfg.use_decoupling  # every module is on
    torch.manual_seed(0)
    model = build(setup(name), MOSI).eval()
    batch = random_batch(5, steps, MOSI, seed=1)
    extra = dict(zip(MODALITIES, extra, strict=True))
    with torch.no_grad():
        reference = model(batch)
        for longer in (padded(batch, extra), padded(batch, extra, garbage_seed=2)):
            out = model(longer)
            assert (out.pred - reference.pred).abs().max() < 1e-5
            for m in reference.unimodal:
                assert (out.unimodal[m] - reference.unimodal[m]).abs().max() < 1e-5, m


def test_garbage_padding_lands_on_every_padded_step_and_nowhere_else():
    # otherwise the invariance above could pass because the inputs did not change
    batch = random_batch(4, SMALL_UNALIGNED, MOSI, seed=3)
    dirty = padded(batch, {"text": 2, "audio": 2, "vision": 2}, garbage_seed=4)
    for m in MODALITIES:
        t = batch.features(m).shape[1]
        valid = torch.arange(t + 2)[None, :] < batch.lengths(m)[:, None]
        assert torch.equal(dirty.features(m)[:, :t][valid[:, :t]], batch.features(m)[valid[:, :t]])
        assert (dirty.features(m)[~valid] != 0).float().mean() > 0.99


# -------------------------------------------------------------------------------------------------------
# gradients and switches


@pytest.mark.parametrize(
    ("name", "changes"),
    [
        ("mdkat", {}),
        ("mdkat", {"use_cff": False}),
        ("mdkat", {"use_amsa": False}),
        ("mdkat", {"use_ka": False}),
        ("mdkat", {"use_kt": False}),
        ("mdkat", {"use_decoupling": False}),
        ("late_fusion", {}),
    ],
    ids=["mdkat", "no_cff", "no_amsa", "no_ka", "no_kt", "no_decoupling", "late_fusion"],
)
def test_every_parameter_receives_a_nonzero_gradient(name, changes):
    torch.manual_seed(0)
    model = build(small(name, **changes), MOSI).train()
    # an odd batch: the L1 gradient of a head's output bias is the mean of +-1 signs, zero for an even
    # batch split half above and half below the labels
    batch = random_batch(5, SMALL_UNALIGNED, MOSI, seed=5)
    # a first forward gives KT running errors, hence non-zero transfer weights, for the second
    model.loss(model(batch), batch, WEIGHTS)
    total, _ = model.loss(model(batch), batch, WEIGHTS)
    total.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"parameters without gradient: {dead}"


# switch -> top-level submodules it removes, and the loss terms that remain
SWITCHES = {
    "use_cff": (("cff",), ALL_TERMS),
    "use_amsa": (("amsa",), ALL_TERMS),
    "use_ka": (("ka",), ("task", "unimodal", "rec", "orth", "kt")),
    "use_kt": (("kt",), ("task", "unimodal", "rec", "orth", "ka")),
    "use_decoupling": (("shared", "decoders"), ("task", "unimodal", "ka", "kt")),
}


@pytest.mark.parametrize("switch", sorted(SWITCHES))
def test_each_switch_removes_its_module_parameters_and_loss_term(switch):
    removed, expected_terms = SWITCHES[switch]
    full = build(small(), MOSI)
    p = small(**{switch: False})
    ablated = build(p, MOSI).train()

    batch = random_batch(3, SMALL_ALIGNED, MOSI, seed=6)
    _, terms = ablated.loss(ablated(batch), batch, WEIGHTS)
    assert tuple(terms) == loss_terms(p) == expected_terms

    assert all(getattr(ablated, name, None) is None for name in removed)
    dropped = sum(n_params(getattr(full, name)) for name in removed)
    assert n_params(full) - n_params(ablated) == dropped
    if switch == "use_kt":
        assert dropped == 0, "KT holds running errors only, no parameters"
    else:
        assert dropped > 0

    full_keys, ablated_keys = set(full.state_dict()), set(ablated.state_dict())
    assert ablated_keys <= full_keys
    assert full_keys - ablated_keys == {k for k in full_keys if k.split(".")[0] in removed}
    if switch == "use_kt":
        assert full_keys - ablated_keys == {"kt.error", "kt.updates"}


def test_full_model_computes_every_loss_term():
    p = small()
    model = build(p, MOSI)
    batch = random_batch(3, SMALL_ALIGNED, MOSI, seed=7)
    _, terms = model.loss(model(batch), batch, WEIGHTS)
    assert tuple(terms) == loss_terms(p) == ALL_TERMS


def test_late_fusion_has_only_the_task_term_whatever_weights_it_is_given():
    p = setup("late_fusion")
    model = build(p, MOSI)
    batch = random_batch(3, SMALL_ALIGNED, MOSI, seed=8)
    for weights in (p.weights(), WEIGHTS):
        total, terms = model.loss(model(batch), batch, weights)
        assert tuple(terms) == loss_terms(p) == ("task",)
        assert total.item() == terms["task"].item()


def test_total_loss_weights_each_term_by_its_own_weight():
    torch.manual_seed(0)
    model = build(small(), MOSI).eval()
    batch = random_batch(3, SMALL_ALIGNED, MOSI, seed=9)
    with torch.no_grad():
        out = model(batch)
        zero = dict.fromkeys(ALL_TERMS[1:], 0.0)
        total, terms = model.loss(out, batch, zero)
        assert total.item() == terms["task"].item()
        # one weight at a time: the total moves by that weight times that term, and nothing else
        for name in ALL_TERMS[1:]:
            one = {**zero, name: 2.5}
            moved, _ = model.loss(out, batch, one)
            assert moved.item() == pytest.approx(terms["task"].item() + 2.5 * terms[name].item(), rel=1e-6)


# -------------------------------------------------------------------------------------------------------
# KT state


def test_kt_running_errors_live_in_the_state_dict_and_move_only_in_training():
    torch.manual_seed(0)
    model = build(small(), MOSI)
    batch = random_batch(4, SMALL_ALIGNED, MOSI, seed=10)
    with torch.no_grad():
        model.eval()(batch)
        assert model.kt.updates.item() == 0 and not model.kt.error.any(), "an eval forward updated KT"
        model.train()(batch)
        model.train()(batch)
    assert model.kt.updates.item() == 2 and (model.kt.error > 0).all()

    state = model.state_dict()
    assert {"kt.error", "kt.updates"} <= set(state)
    torch.manual_seed(1)
    restored = build(small(), MOSI)
    restored.load_state_dict(state)
    assert torch.equal(restored.kt.error, model.kt.error)
    assert restored.kt.updates.item() == 2

    before = model.kt.error.clone()
    with torch.no_grad():
        model.eval()(random_batch(4, SMALL_ALIGNED, MOSI, seed=11))
    assert torch.equal(model.kt.error, before) and model.kt.updates.item() == 2


# -------------------------------------------------------------------------------------------------------
# learning and determinism


@pytest.mark.parametrize("name", ["mdkat", "late_fusion"])  # the baselines: in their own test files
def test_task_l1_falls_by_90_percent_when_overfitting_32_samples(name):
    max_steps = 60  # both models get there in about 25 full-batch Adam steps (lr 3e-3, width 32)
    data = small_data()
    data = data.model_copy(update={"synthetic": data.synthetic.model_copy(update={"n_train": 32})})
    batch = Batch.from_arrays(generate(data).splits["train"])
    no_dropout = dict.fromkeys(MODALITIES, 0.0)
    torch.manual_seed(0)
    p = setup(name, width=32, heads=2, dropout=0.0, input_dropout=no_dropout)
    model = build(p, MOSI).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    history = []
    for _ in range(max_steps):
        total, terms = model.loss(model(batch), batch, p.weights())
        history.append(terms["task"].item())
        if history[-1] < 0.1 * history[0]:
            break
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    assert history[-1] < 0.1 * history[0], f"task L1 every 10 steps: {history[::10]}, last {history[-1]}"


def test_same_seed_gives_identical_outputs_and_gradients_in_training_mode():
    p = small()
    cfg = config_of(p)
    assert cfg.dropout > 0 and cfg.input_dropout.text > 0  # dropout draws must be reproducible too
    batch = random_batch(4, SMALL_UNALIGNED, MOSI, seed=12)

    def run(seed):
        torch.manual_seed(seed)
        model = build(p, MOSI).train()
        out = model(batch)
        total, terms = model.loss(out, batch, WEIGHTS)
        total.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        return out.pred.detach(), terms, grads

    pred_a, terms_a, grads_a = run(3)
    pred_b, terms_b, grads_b = run(3)
    assert torch.equal(pred_a, pred_b)
    assert all(torch.equal(terms_a[k], terms_b[k]) for k in terms_a)
    assert [n for n in grads_a if not torch.equal(grads_a[n], grads_b[n])] == []
    pred_c, _, _ = run(4)
    assert not torch.equal(pred_a, pred_c), "the seed does not reach the model"


# -------------------------------------------------------------------------------------------------------
# configuration


def test_unknown_model_name_is_rejected_when_loading_params():
    with pytest.raises(ConfigError) as raised:
        load_checked(ROOT / "params.yaml", ["model.name=nope"])
    assert raised.value.key == "model.name"
    message = str(raised.value)
    assert "model.name" in message and "'nope'" in message
    assert all(name in message for name in REGISTRY), message


def test_aligned_data_share_one_importance_per_step_and_unaligned_do_not():
    torch.manual_seed(0)
    batch = random_batch(4, SMALL_ALIGNED, MOSI, seed=13)
    same_lengths = {f"{m}_len": batch.text_len for m in MODALITIES}
    features = {m: batch.features(m) for m in MODALITIES}
    batch = Batch(**features, **same_lengths, label=batch.label, id=batch.id)
    with torch.no_grad():
        shared = build(small(), MOSI, aligned=True).eval()(batch).importance
        own = build(small(), MOSI, aligned=False).eval()(batch).importance
    assert torch.equal(shared["text"], shared["audio"]) and torch.equal(shared["text"], shared["vision"])
    assert not torch.equal(own["text"], own["audio"])
    # unaligned shapes cannot share a time axis: each modality scores its own steps
    unaligned = random_batch(4, SMALL_UNALIGNED, MOSI, seed=14)
    with torch.no_grad():
        out = build(small(), MOSI, aligned=False).eval()(unaligned).importance
    assert {m: out[m].shape[1] for m in MODALITIES} == SMALL_UNALIGNED


# each report variant of MDKAT -> the submodules its model must lack (the label says which)
VARIANT_REMOVES = {
    "no_cff": ("w/o CFF", ("cff",)),
    "no_amsa": ("w/o AMSA", ("amsa",)),
    "no_ka": ("w/o KA", ("ka",)),
    "no_kt": ("w/o KT", ("kt",)),
    "no_decoupling": ("w/o decoupling", ("shared", "decoders")),
}


@pytest.mark.parametrize("variant", sorted(VARIANT_REMOVES))
def test_each_ablation_of_the_report_builds_a_model_without_the_module_it_names(variant):
    from mdkat.models import variant_label, variant_values

    label, removed = VARIANT_REMOVES[variant]
    params = small()
    ablated = build(with_values(params, variant_values(params, variant)), MOSI)
    full = build(params, MOSI)
    assert variant_label(params, variant) == label
    assert all(getattr(full, name) is not None and getattr(ablated, name, None) is None for name in removed)
    kept = [n for _, (_, names) in VARIANT_REMOVES.items() for n in names if n not in removed]
    assert all(getattr(ablated, name) is not None for name in kept)  # and nothing else
