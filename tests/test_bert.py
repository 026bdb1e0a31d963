"""`model.text_encoder: bert`: word pieces through prepare, a tiny BERT made here fine-tuned at its own rate,
every model reading text through it, model files that rebuild without the checkpoint, and the errors.

The BERT is a 2-layer, 16-wide random `BertModel` saved with a tokenizer whose vocabulary the test writes;
the MMSA pickle's `text_bert` holds that tokenizer's word pieces of sentences whose words carry the label.
"""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
import torch

from mdkat.checks import load_checked
from mdkat.config import ConfigError
from mdkat.data import Batch, load_prepared
from mdkat.data.prepare import prepare
from mdkat.data.prepared import DataError, validate_split
from mdkat.errors import MdkatError
from mdkat.models import REGISTRY, build, config_of, loss_terms
from mdkat.training import fit, load_checkpoint, model_from_file, predict
from tests.conftest import ROOT, prepared, tiny_params

pytestmark = pytest.mark.usefixtures("one_torch_thread")

POSITIVE, NEGATIVE, NEUTRAL = ["good", "great", "fun"], ["bad", "awful", "dull"], ["the", "movie", "was", "a"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POSITIVE, *NEGATIVE, *NEUTRAL]
HIDDEN, STEPS = 16, 8
DIMS = {"text": 12, "audio": 3, "vision": 4}  # the frozen text features BERT replaces are 12-d


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A tiny random BERT and its tokenizer, saved as a local checkpoint folder."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    BertModel(config).save_pretrained(folder)
    BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(folder)
    return folder


def _sentences(rng: np.random.Generator, n: int) -> tuple[list[str], np.ndarray]:
    label = np.round(rng.uniform(-3, 3, n), 1)
    words = [
        [*rng.choice(NEUTRAL, 2), rng.choice(POSITIVE if y > 0 else NEGATIVE), *rng.choice(NEUTRAL, 1)]
        for y in label
    ]
    return [" ".join(w) for w in words], label


@pytest.fixture(scope="module")
def mmsa_pickle(bert_dir, tmp_path_factory):
    """An aligned MMSA-format pickle whose `text_bert` holds the tokenizer's word pieces."""
    from mdkat.models.bert import load_tokenizer

    tokenizer = load_tokenizer(bert_dir)
    rng = np.random.default_rng(0)
    data = {}
    for split, n in {"train": 40, "valid": 12, "test": 12}.items():
        text, label = _sentences(rng, n)
        pieces = tokenizer(text, max_length=STEPS, padding="max_length", truncation=True, return_tensors="np")
        ids, mask, segment = pieces["input_ids"], pieces["attention_mask"], pieces["token_type_ids"]
        data[split] = {
            **{m: rng.normal(size=(n, STEPS, d)).astype(np.float32) for m, d in DIMS.items()},
            "text_bert": np.stack([ids, mask, segment], axis=1).astype(np.float64),  # (N, 3, T) as MMSA
            "regression_labels": label,
            "id": np.array([f"{split}{i}" for i in range(n)], dtype=object),
            "raw_text": np.array(text, dtype=object),
        }
    path = tmp_path_factory.mktemp("mmsa") / "aligned.pkl"
    path.write_bytes(pickle.dumps(data))
    return path


@pytest.fixture(scope="module")
def prepared_tokens(mmsa_pickle, tmp_path_factory):
    params = tiny_params("data.source=mmsa", f"data.path={mmsa_pickle}")
    out = tmp_path_factory.mktemp("prepared") / "prepared"
    prepare(params.data, out)
    return out


def _bert_params(bert_dir, *overrides):
    return tiny_params("model.text_encoder=bert", f"model.bert.checkpoint={bert_dir}", *overrides)


# -------------------------------------------------------------------------------------------------------
# data


def test_prepare_keeps_the_word_pieces_of_an_mmsa_pickle(mmsa_pickle, prepared_tokens):
    raw = pickle.loads(mmsa_pickle.read_bytes())
    data = load_prepared(prepared_tokens)
    assert data.manifest["text_tokens"] == STEPS
    for split in ("train", "valid", "test"):
        batch, text_bert = getattr(data, split), raw[split]["text_bert"]
        assert torch.equal(batch.text_ids, torch.from_numpy(text_bert[:, 0].astype(np.int64)))
        assert torch.equal(batch.text_mask, torch.from_numpy(text_bert[:, 1].astype(np.int64)))
        assert torch.equal(batch.text_len, batch.text_mask.sum(1))
    # a [CLS] first, a [SEP] after the last word piece, padding after that
    first = data.train.select(torch.tensor([0]))
    length = int(first.text_len)
    assert first.text_ids[0, 0].item() == VOCAB.index("[CLS]")
    assert first.text_ids[0, length - 1].item() == VOCAB.index("[SEP]")
    assert (first.text_ids[0, length:] == 0).all()


def test_data_without_word_pieces_keep_the_manifest_and_files_they_always_had(tmp_path):
    data = load_prepared(prepared(tiny_params(), tmp_path))
    assert "text_tokens" not in data.manifest and not data.train.has_tokens
    with np.load(tmp_path / "prepared" / "train.npz") as npz:
        assert "text_ids" not in npz.files


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda a: a.pop("text_segment"), "all three or none"),
        (lambda a: a.__setitem__("text_mask", a["text_mask"][:, ::-1].copy()), "precede the padding"),
        (lambda a: a.__setitem__("text_segment", a["text_segment"][:, :3].copy()), "'text_segment'"),
        (lambda a: a.__setitem__("text_ids", a["text_ids"].astype(np.int32)), "expected int64"),
    ],
    ids=["missing", "mask-reversed", "shape", "dtype"],
)
def test_damaged_word_pieces_are_data_errors_naming_split_and_key(prepared_tokens, damage, expected):
    with np.load(prepared_tokens / "valid.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    damage(arrays)
    with pytest.raises(DataError, match="split 'valid'") as raised:
        validate_split(arrays, "valid", "valid.npz")
    assert expected in str(raised.value)


# -------------------------------------------------------------------------------------------------------
# every model reads text through BERT


def _token_batch(data_dir, n=5) -> Batch:
    return load_prepared(data_dir, splits=("train",)).train.select(torch.arange(n))


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_model_reads_its_text_through_bert_and_trains_it(name, bert_dir, prepared_tokens):
    params = _bert_params(bert_dir, f"model.name={name}")
    torch.manual_seed(0)
    model = build(params, DIMS, aligned=True, sizes={"train": 40, "valid": 12}).train()
    batch = _token_batch(prepared_tokens)
    total, terms = model.loss(model(batch), batch, params.weights())
    assert tuple(terms) == loss_terms(params)
    total.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.bert.encoder.parameters())
    # the text the wrapped model reads is BERT's, whatever the frozen features hold
    other = Batch(**{**vars(batch), "text": torch.randn_like(batch.text)})
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(batch).pred, model(other).pred)


def test_bert_trains_at_its_own_rate_and_the_model_file_needs_no_checkpoint(
    bert_dir, tmp_path, prepared_tokens
):
    folder = tmp_path / "bert"
    shutil.copytree(bert_dir, folder)
    params = _bert_params(folder, "train.epochs=2")
    result = fit(
        params, load_prepared(prepared_tokens, splits=("train", "valid")), tmp_path / "out", progress=False
    )
    groups = load_checkpoint(tmp_path / "out" / "checkpoint.pt")["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == [params.train.lr, params.model.bert.lr]
    assert result.history[0]["lr"] == params.train.lr
    from mdkat.models.bert import load_bert

    pretrained = load_bert(params.model.bert, "test").state_dict()
    tuned = result.model.bert.state_dict()
    assert any(not torch.equal(pretrained[k], tuned[k]) for k in pretrained), "BERT did not move"
    shutil.rmtree(folder)  # the model file carries BERT's architecture and weights
    valid = load_prepared(prepared_tokens, splits=("valid",)).valid
    reloaded = model_from_file(tmp_path / "out" / "model.pt")
    np.testing.assert_allclose(predict(reloaded, valid, 5), predict(result.model, valid, 16), atol=1e-5)


def test_bert_does_not_standardise_or_reduce_its_own_states(bert_dir, prepared_tokens):
    params = _bert_params(bert_dir)
    assert config_of(params).input_pca.text > 0  # what the features path would use
    model = build(params, DIMS, aligned=True)
    text = model.model.projection["text"]
    assert text.components == 0 and text.conv.in_channels == HIDDEN
    from mdkat.models.encoders import fit_input_statistics

    fit_input_statistics(model, load_prepared(prepared_tokens, splits=("train",)).train)
    assert torch.equal(text.in_mean, torch.zeros(HIDDEN)) and torch.equal(text.in_scale, torch.ones(HIDDEN))
    assert not torch.equal(model.model.projection["audio"].in_scale, torch.ones(DIMS["audio"]))


# -------------------------------------------------------------------------------------------------------
# errors


def test_a_missing_or_unset_checkpoint_is_a_config_error_naming_the_key(tmp_path):
    for value, expected in (("null", "null"), (tmp_path / "nowhere", "not a BERT folder")):
        with pytest.raises(ConfigError) as raised:
            load_checked(ROOT / "params.yaml", ["model.text_encoder=bert", f"model.bert.checkpoint={value}"])
        assert raised.value.key == "model.bert.checkpoint" and expected in str(raised.value)
        assert "params.yaml" in str(raised.value) and "set by -S" in str(raised.value)


def test_bert_on_data_without_word_pieces_is_refused_before_training(bert_dir, tmp_path):
    data = load_prepared(prepared(tiny_params(), tmp_path), splits=("train", "valid"))
    with pytest.raises(MdkatError, match="no word pieces"):
        fit(_bert_params(bert_dir), data, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "checkpoint.pt").exists()


def test_a_model_with_its_own_learning_rate_keeps_it_beside_bert(bert_dir, tmp_path, prepared_tokens):
    params = _bert_params(bert_dir, "model.name=misa", "model.misa.lr=4.0e-4", "train.epochs=1")
    fit(params, load_prepared(prepared_tokens, splits=("train", "valid")), tmp_path, progress=False)
    groups = load_checkpoint(tmp_path / "checkpoint.pt")["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == [4.0e-4, params.model.bert.lr]
