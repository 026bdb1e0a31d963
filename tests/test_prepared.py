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


# -------------------------------------------------------------------------------------------------------
# what mutation testing found unchecked (reports/mutation): each part of every check, alone


PINNED_SPLIT_SHA256 = "23efb07de61b6628fec0cf7f55fe1fa3dc013a1c387b91a02231bb65d79dd9b8"


def _split(n: int = 24, tokens: bool = False) -> dict[str, np.ndarray]:
    """A valid split of `n` samples (text 6 steps x 24 features), with word pieces when `tokens`."""
    arrays = {k: v.copy() for k, v in generate(small_data()).splits["train"].items()}
    arrays = {k: np.concatenate([v] * (-(-n // len(v))))[:n] for k, v in arrays.items()}
    if tokens:
        ids = np.array([[101, 7, 0, 0], [101, 0, 5, 102], [3, 0, 0, 0]] * n)[:n]  # id 0 is a valid piece
        mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]] * n)[:n]  # one piece alone is enough
        arrays.update(text_ids=ids.astype(np.int64), text_mask=mask.astype(np.int64))
        arrays["text_segment"] = np.zeros_like(arrays["text_ids"])
    return arrays


def _with(arrays: dict[str, np.ndarray], **changes) -> dict[str, np.ndarray]:
    return {**arrays, **changes}


def test_valid_splits_of_every_size_and_edge_pass():
    from mdkat.data.prepared import validate_split

    for n in (1, 2, 300):  # one sample; more than the small integers Python caches
        validate_split(_split(n, tokens=True), "train", "here")
    edge = _split(3)
    t = edge["text"].shape[1]
    edge["text_len"] = np.array([1, t, 2], dtype=np.int64)  # a length of 1 and the full length
    validate_split(edge, "train", "here")


def _broken():
    s, t = _split(), _split(tokens=True)
    n, steps = len(s["label"]), s["text"].shape[1]
    return [
        (_with(s, **{k: s[k][:0] for k in s}), "split 'train' is empty"),
        (_with(s, audio=s["audio"][..., None]), "key 'audio': expected rank 3"),
        (_with(s, audio=s["audio"].astype(np.float64)), "key 'audio': expected float32, got float64"),
        (_with(s, audio=s["audio"].astype(np.float16)), "key 'audio': expected float32, got float16"),
        (_with(s, text_len=s["text_len"][:-1]), f"key 'text_len': expected int64 of shape \\({n},\\)"),
        (_with(s, text_len=np.concatenate([s["text_len"], [1]])), "key 'text_len': expected int64"),
        (_with(s, text_len=s["text_len"].astype(np.int32)), "key 'text_len': expected int64"),
        (
            _with(s, text_len=np.full(n, steps + 1)),
            f"lengths must lie in \\[1, {steps}\\], got \\[{steps + 1}",
        ),
        (_with(s, id=s["id"][:-1]), f"key 'id' has {n - 1} samples, 'label' has {n}"),
        (_with(s, id=np.concatenate([s["id"], ["x"]])), f"key 'id' has {n + 1} samples"),
        (_with(s, label=s["label"][:, None]), "key 'label': expected float32 of shape"),
        (_with(s, label=s["label"].astype(np.float64)), "key 'label': expected float32"),
        (_with(s, label=s["label"].astype(np.float16)), "key 'label': expected float32"),
        (_with(s, id=s["id"].astype(bytes)), "key 'id': expected strings"),
        (_with(s, id=np.arange(n)), "key 'id': expected strings"),
        (_with(s, text_ids=t["text_ids"]), "has \\['text_ids'\\] but not \\['text_mask', 'text_segment'\\]"),
        (_with(t, text_mask=t["text_mask"].astype(np.int32)), "key 'text_mask': expected int64"),
        (_with(t, text_segment=np.zeros((n, 5), np.int64)), "key 'text_segment': expected int64"),
        (
            _with(t, **{k: t[k][..., None] for k in ("text_ids", "text_mask", "text_segment")}),
            "expected int64",
        ),
        (_with(t, **{k: t[k][:-1] for k in ("text_ids", "text_mask", "text_segment")}), "expected int64"),
        (_with(t, text_mask=np.where(t["text_mask"] == 1, 2, 0)), "key 'text_mask': expected 0/1 values"),
        (_with(t, text_mask=-t["text_mask"]), "key 'text_mask': expected 0/1 values"),
        (_with(t, text_mask=np.tile([1, 0, 1, 0], (n, 1))), "word pieces must precede the padding"),
        (_with(t, text_mask=np.tile([1, 1, 1, 1], (n, 1)) * (np.arange(n) > 0)[:, None]), "without any word"),
        (_with(t, text_ids=t["text_ids"] - 102), "key 'text_ids': negative token ids"),
        (_with(t, text_ids=np.where(t["text_ids"] == 0, -1, t["text_ids"])), "negative token ids"),  # -1 too
        # numbers of another kind: numpy orders dtypes by safe casting, so these are neither < nor > int64
        (_with(s, text_len=s["text_len"].astype(np.float64)), "'text_len': expected int64 .*, got float64"),
        (_with(s, text_len=s["text_len"].astype(np.uint64)), "'text_len': expected int64 .*, got uint64"),
        (_with(t, text_ids=t["text_ids"].astype(np.float64)), "key 'text_ids': expected int64"),
        (_with(t, text_mask=t["text_mask"].astype(np.uint64)), "key 'text_mask': expected int64"),
        # the three agree with each other but not with the split
        (
            _with(
                t, **{k: np.concatenate([t[k], t[k][:1]]) for k in ("text_ids", "text_mask", "text_segment")}
            ),
            f"key 'text_ids': expected int64 of shape \\({n}, L\\).*got int64 \\({n + 1}, 4\\)",
        ),
        (
            _with(t, **{k: t[k][:, 0] for k in ("text_ids", "text_mask", "text_segment")}),
            f"key 'text_ids': expected int64 of shape \\({n}, L\\).*got int64 \\({n},\\)",
        ),
        (
            _with(t, text_mask=t["text_mask"][:, :-1]),
            f"key 'text_mask': .*got int64 \\({n}, 3\\) \\(text_ids",
        ),
        # the first of several problems is named, in the order of the keys and the samples
        ({k: v for k, v in s.items() if k not in ("text", "vision")}, "missing key 'text'"),
        (
            _with(s, label=np.where(np.isin(np.arange(n), [3, 7]), np.nan, s["label"]).astype(np.float32)),
            f"non-finite label for id '{s['id'][3]}' \\(2 such samples\\)",
        ),
    ]


@pytest.mark.parametrize("case", range(len(_broken())))
def test_each_broken_part_of_a_split_is_named(case):
    from mdkat.data.prepared import validate_split

    arrays, message = _broken()[case]
    with pytest.raises(DataError, match=message):
        validate_split(arrays, "train", "here")


def test_the_manifest_records_hand_counted_label_fractions_and_the_format(tmp_path):
    splits = generate(small_data()).splits
    splits["train"]["label"][:] = 0.5
    splits["train"]["label"][:4] = [0.0, 0.0, -1.0, 2.0]  # 24 labels: 2 zero, 21 positive
    manifest = write_prepared(tmp_path / "p", splits, {"source": "x", "dataset": "y", "aligned": True})
    stats = manifest["label_stats"]["train"]
    assert stats["fraction_zero"] == 2 / 24 and stats["fraction_positive"] == 21 / 24
    assert manifest["format_version"] == 1  # data prepared by earlier versions stay readable
    assert "text_tokens" not in manifest
    # word pieces: their count per sample is recorded
    for arrays in splits.values():
        pieces = _split(len(arrays["label"]), tokens=True)
        arrays.update({k: v for k, v in pieces.items() if k.startswith("text_") and k != "text_len"})
    manifest = write_prepared(tmp_path / "q", splits, {"source": "x", "dataset": "y", "aligned": True})
    assert manifest["text_tokens"] == 4


def test_splits_whose_steps_or_features_differ_from_train_are_refused(tmp_path):
    splits = generate(small_data()).splits
    splits["test"]["vision"] = np.concatenate([splits["test"]["vision"]] * 2, axis=2)
    with pytest.raises(
        DataError, match="split 'test' key 'vision': shape \\(T, d\\) = \\(.*\\) differs from train"
    ):
        write_prepared(tmp_path / "p", splits, {"source": "x", "dataset": "y", "aligned": True})


@pytest.mark.parametrize("change", ["shorter", "longer", "narrower"])
def test_a_split_whose_steps_or_features_are_fewer_or_more_than_trains_is_named_with_both(tmp_path, change):
    splits = generate(small_data()).splits
    audio = splits["valid"]["audio"]  # (N, T, d)
    n, t, d = audio.shape
    splits["valid"]["audio"] = {
        "shorter": audio[:, : t - 1],
        "longer": np.concatenate([audio, audio[:, :1]], axis=1),
        "narrower": audio[..., : d - 1],
    }[change]
    splits["valid"]["audio_len"] = np.minimum(splits["valid"]["audio_len"], t - 1)
    got = splits["valid"]["audio"].shape[1:]
    with pytest.raises(
        DataError,
        match=f"split 'valid' key 'audio': shape \\(T, d\\) = \\({got[0]}, {got[1]}\\) differs from train's "
        f"\\({t}, {d}\\)",
    ):
        write_prepared(tmp_path / "p", splits, {"source": "x", "dataset": "y", "aligned": True})
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize(
    "names", [("train", "valid"), ("train", "valid", "test", "extra"), ("train", "valid", "test", "zzz")]
)
def test_splits_other_than_train_valid_test_are_refused(tmp_path, names):
    made = generate(small_data()).splits
    splits = {name: made[name if name in made else "test"] for name in names}
    with pytest.raises(DataError, match=r"expected splits \['train', 'valid', 'test'\], got"):
        write_prepared(tmp_path / "p", splits, {"source": "x", "dataset": "y", "aligned": True})
    assert not (tmp_path / "p").exists()


def test_the_bytes_of_a_prepared_split_are_pinned_so_that_recorded_data_identities_stay_valid(tmp_path):
    """dvc.lock, the manifest's SHA-256 and every report unit's fingerprint name prepared data by the bytes
    of its files: a writer that stamps another date or other zip records into the same arrays makes all of
    them stale. A deliberate change of the format moves FORMAT_VERSION and this digest together."""
    import hashlib
    import zipfile

    arrays = _split(3, tokens=True)
    arrays["id"] = np.array(["a", "b", "c"])
    for key, value in arrays.items():
        if value.dtype.kind == "f":
            arrays[key] = (np.arange(value.size, dtype=np.float32).reshape(value.shape) % 7) / 4
    write_prepared(
        tmp_path / "p",
        {s: arrays for s in ("train", "valid", "test")},
        {"source": "x", "dataset": "y", "aligned": True},
    )
    path = tmp_path / "p" / "train.npz"
    with zipfile.ZipFile(path) as zf:  # what any zip tool shows: the zip epoch, no clock of this machine
        assert {i.date_time for i in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    assert hashlib.sha256(path.read_bytes()).hexdigest() == PINNED_SPLIT_SHA256


@pytest.mark.parametrize("version", [0, 2, "1"])
def test_a_manifest_of_another_format_version_is_refused(prepared, tmp_path, version):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "format_version": version}))
    with pytest.raises(DataError, match=f"format_version {version!r}, expected 1"):
        load_prepared(copy)


def test_unreadable_manifests_and_unlisted_files_are_data_errors(prepared, tmp_path):
    import shutil

    from mdkat.data.prepared import manifest_digest, read_split

    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    with pytest.raises(DataError, match="manifest.json: no checksum for 'valid.npz'"):
        read_split(copy, "valid", {**manifest, "files": {}})
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="manifest.json: not valid JSON"):
        load_prepared(copy)
    with pytest.raises(DataError, match="manifest.json: cannot read the manifest"):
        manifest_digest(copy)


def test_a_split_file_with_pickled_objects_is_refused(prepared, tmp_path):
    import hashlib
    import shutil

    from mdkat.data.prepared import read_split

    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    with np.load(copy / "valid.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["id"] = arrays["id"].astype(object)  # loading it would run the unpickler
    np.savez(copy / "valid.npz", **arrays)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["valid.npz"] = hashlib.sha256((copy / "valid.npz").read_bytes()).hexdigest()
    with pytest.raises(ValueError, match="allow_pickle"):
        read_split(copy, "valid", manifest)
