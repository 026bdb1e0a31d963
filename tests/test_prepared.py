"""The prepared format: round trip into Batch, integrity checks, atomic output."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mdkat import MODALITIES
from mdkat.data import Batch, DataError, load_prepared
from mdkat.data.prepare import prepare
from mdkat.data.prepared import write_prepared
from mdkat.data.synthetic import generate
from tests.conftest import small_data


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "data"
    prepare(small_data(), out)
    return out


def test_round_trip_into_batches(prepared):
    expected = generate(small_data()).splits
    data = load_prepared(prepared)
    assert data.manifest["counts"] == {"train": 24, "valid": 8, "test": 10}
    assert data.manifest["dims"] == {"text": 768, "audio": 5, "vision": 20}
    assert data.manifest["nonfinite_replaced"]["train"] == {"text": 0, "audio": 0, "vision": 0}
    assert len(data.manifest_sha256) == 64
    for split in ("train", "valid", "test"):
        batch = getattr(data, split)
        assert isinstance(batch, Batch) and len(batch) == len(expected[split]["label"])
        for m in MODALITIES:
            np.testing.assert_array_equal(batch.features(m).numpy(), expected[split][m])
            assert batch.lengths(m).dtype == torch.int64
        assert batch.id == expected[split]["id"].tolist()


def test_only_requested_splits_are_read(prepared):
    data = load_prepared(prepared, splits=("train", "valid"))
    assert data.test is None and len(data.train) == 24


def test_batch_select_and_to(prepared):
    train = load_prepared(prepared).train
    index = torch.tensor([3, 0, 5])
    sub = train.select(index)
    assert sub.id == [train.id[3], train.id[0], train.id[5]]
    torch.testing.assert_close(sub.audio[1], train.audio[0])
    torch.testing.assert_close(sub.label, train.label[index])
    moved = sub.to("cpu")
    assert moved.text.device.type == "cpu" and moved.id == sub.id


def test_changed_file_is_detected(prepared, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    raw = bytearray((copy / "valid.npz").read_bytes())
    raw[-100] ^= 0xFF
    (copy / "valid.npz").write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"valid\.npz: SHA-256 .* does not match the manifest"):
        load_prepared(copy)


def test_truncated_file_is_detected(prepared, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    raw = (copy / "train.npz").read_bytes()
    (copy / "train.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=r"train\.npz: SHA-256"):
        load_prepared(copy)


def test_missing_manifest_or_split(tmp_path, prepared):
    with pytest.raises(DataError, match="manifest.json: not found; run the prepare stage"):
        load_prepared(tmp_path)
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    (copy / "test.npz").unlink()
    with pytest.raises(DataError, match=r"test\.npz: missing"):
        load_prepared(copy)


def test_nonfinite_values_are_zeroed_and_counted(tmp_path):
    splits = generate(small_data()).splits
    splits["train"]["audio"][0, 0, :2] = [np.nan, -np.inf]
    splits["test"]["vision"][1, 2, 3] = np.inf
    manifest = write_prepared(tmp_path / "p", splits, {"source": "x", "dataset": "y", "aligned": True})
    assert manifest["nonfinite_replaced"]["train"] == {"text": 0, "audio": 2, "vision": 0}
    assert manifest["nonfinite_replaced"]["test"] == {"text": 0, "audio": 0, "vision": 1}
    data = load_prepared(tmp_path / "p")
    assert torch.isfinite(data.train.audio).all() and data.train.audio[0, 0, :2].eq(0).all()
    assert json.loads((tmp_path / "p" / "manifest.json").read_text())["source"] == "x"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s["valid"].pop("audio"), "split 'valid': missing key 'audio'"),
        (
            lambda s: s["train"].update(text=s["train"]["text"][:, :, 0]),
            "split 'train' key 'text': expected rank 3",
        ),
        (
            lambda s: s["test"].update(vision=s["test"]["vision"][:-1]),
            "split 'test': key 'vision' has 9 samples",
        ),
        (
            lambda s: s["train"]["audio_len"].__setitem__(0, 0),
            "split 'train' key 'audio_len': lengths must lie",
        ),
        (
            lambda s: s["train"]["label"].__setitem__(2, np.nan),
            "non-finite label for id 'synthetic_train_00002'",
        ),
        (
            lambda s: s["valid"]["label"].__setitem__([3, 5], [3.5, -4.0]),
            r"split 'valid' key 'label': 2 labels outside \[-3, 3\].* 3.5 for id 'synthetic_valid_00003'",
        ),
    ],
)
def test_invalid_splits_leave_no_output(tmp_path, mutate, message):
    splits = generate(small_data()).splits
    mutate(splits)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=message):
        write_prepared(out, splits, {"source": "x", "dataset": "y", "aligned": True})
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_failure_keeps_previous_output(tmp_path, prepared):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(prepared, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    splits = generate(small_data()).splits
    splits["valid"].pop("label")
    with pytest.raises(DataError):
        write_prepared(out, splits, {"source": "x", "dataset": "y", "aligned": True})
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_key_added_later_and_left_unset_keeps_the_data_identity_of_manifests_written_before_it(tmp_path):
    import hashlib

    from mdkat.data.prepared import manifest_digest
    from mdkat.io import write_json

    folder = tmp_path / "prepared"
    prepare(small_data(), folder)
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    assert manifest["params"]["data.tokenizer"] is None
    # the same data prepared before the key existed: the manifest without it
    older = {**manifest, "params": {k: v for k, v in manifest["params"].items() if k != "data.tokenizer"}}
    write_json(tmp_path / "older.json", older)
    older_sha = hashlib.sha256((tmp_path / "older.json").read_bytes()).hexdigest()
    assert manifest_digest(folder) == older_sha
    assert load_prepared(folder).manifest_sha256 == older_sha
    assert manifest_digest(folder) != hashlib.sha256(path.read_bytes()).hexdigest()
    # set, the key is part of the identity: the digest is the file's own
    write_json(path, {**manifest, "params": {**manifest["params"], "data.tokenizer": "models/bert"}})
    assert manifest_digest(folder) == hashlib.sha256(path.read_bytes()).hexdigest() != older_sha
    # any other recorded value still changes it
    write_json(path, {**manifest, "params": {**manifest["params"], "data.seed": 99}})
    assert manifest_digest(folder) != older_sha
