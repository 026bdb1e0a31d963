"""The `mmsa` source against small MMSA-shaped pickles written here, and hostile or damaged pickles."""

from __future__ import annotations

import builtins
import hashlib
import os
import pickle
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest

from mdkat.config import load_params
from mdkat.data.mmsa import from_mmsa, load_mmsa, safe_load_pickle
from mdkat.data.prepared import DataError, read_manifest, read_split, write_prepared

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"train": 7, "valid": 3, "test": 4}
DIMS = {"text": 8, "audio": 3, "vision": 4}


def _features(rng: np.random.Generator, n: int, t: int, d: int) -> np.ndarray:
    # Non-zero at every step, padding included, so that a trailing-zero rule would give T, never the truth.
    return (rng.uniform(0.5, 1.5, (n, t, d)) * rng.choice([-1, 1], (n, t, d))).astype(np.float32)


def _text_bert(rng: np.random.Generator, n: int, t: int) -> np.ndarray:
    lengths = rng.integers(1, t + 1, n)
    mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.int64)  # (N, T)
    tokens = rng.integers(100, 30000, (n, t)) * mask
    return np.stack([tokens, mask, np.zeros_like(mask)], axis=1)  # (N, 3, T)


def make_mmsa(steps: dict[str, int], seed: int = 0, lengths_keys: bool = False) -> dict:
    """A fake MMSA dict; `lengths_keys` adds `audio_lengths` / `vision_lengths` as unaligned files have."""
    rng = np.random.default_rng(seed)
    data = {}
    for split, n in SIZES.items():
        part = {m: _features(rng, n, steps[m], DIMS[m]) for m in DIMS}
        part["text_bert"] = _text_bert(rng, n, steps["text"])
        part["regression_labels"] = np.round(rng.uniform(-3, 3, n) * 3) / 3
        part["id"] = np.array([f"vid{split}{i}$_${i % 3}" for i in range(n)], dtype=object)
        part["raw_text"] = np.array([f"words of clip {i}" for i in range(n)], dtype=object)
        part["classification_labels"] = np.sign(part["regression_labels"]) + 1
        if lengths_keys:
            part["audio_lengths"] = [int(v) for v in rng.integers(1, steps["audio"] + 1, n)]
            part["vision_lengths"] = rng.integers(1, steps["vision"] + 1, n)
        data[split] = part
    return data


ALIGNED = {"text": 6, "audio": 6, "vision": 6}
UNALIGNED = {"text": 6, "audio": 9, "vision": 11}


def _write(path: Path, data: object, protocol: int = pickle.HIGHEST_PROTOCOL) -> Path:
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    return path


def _mmsa_cfg(**changes):
    return load_params(ROOT / "params.yaml").data.model_copy(update={"source": "mmsa", **changes})


# ---------------------------------------------------------------------------------------------------------
# conversion


def test_aligned_lengths_follow_the_attention_mask_and_values_round_trip(tmp_path):
    data = make_mmsa(ALIGNED)
    splits, info = from_mmsa(safe_load_pickle(_write(tmp_path / "aligned_50.pkl", data)), "aligned_50.pkl")
    assert info["aligned"] is True
    assert info["lengths_from"] == {m: "text_bert attention mask" for m in DIMS}
    for split, n in SIZES.items():
        raw, out = data[split], splits[split]
        mask_sum = np.count_nonzero(raw["text_bert"][:, 1, :], axis=1)
        for m in DIMS:
            assert out[m].dtype == np.float32 and out[m].shape == (n, 6, DIMS[m])
            np.testing.assert_array_equal(out[m], raw[m])
            assert out[f"{m}_len"].dtype == np.int64
            np.testing.assert_array_equal(out[f"{m}_len"], mask_sum)
        assert out["label"].dtype == np.float32 and out["label"].shape == (n,)
        np.testing.assert_array_equal(out["label"], raw["regression_labels"].astype(np.float32))
        assert out["id"].dtype.kind == "U"
        assert out["id"].tolist() == [f"vid{split}{i}$_${i % 3}" for i in range(n)]


def test_unaligned_lengths_from_length_keys_and_text_from_mask(tmp_path):
    data = make_mmsa(UNALIGNED, seed=1, lengths_keys=True)
    data["train"]["audio_lengths"][0] = 400  # longer than T_a = 9: clipped, and counted
    splits, info = from_mmsa(
        safe_load_pickle(_write(tmp_path / "unaligned_50.pkl", data)), "unaligned_50.pkl"
    )
    assert info["aligned"] is False
    assert info["lengths_from"] == {
        "text": "text_bert attention mask",
        "audio": "audio_lengths",
        "vision": "vision_lengths",
    }
    assert info["lengths_lowered_to_T"]["train"]["audio"] == 1
    for split, n in SIZES.items():
        out = splits[split]
        assert [out[m].shape for m in DIMS] == [(n, 6, 8), (n, 9, 3), (n, 11, 4)]
        expected_audio = np.array(data[split]["audio_lengths"])
        if split == "train":
            expected_audio[0] = 9
        np.testing.assert_array_equal(out["audio_len"], expected_audio)
        np.testing.assert_array_equal(out["vision_len"], data[split]["vision_lengths"])
        np.testing.assert_array_equal(out["text_len"], data[split]["text_bert"][:, 1].sum(axis=1))


def test_without_mask_or_lengths_the_trailing_zero_rows_give_the_length():
    data = make_mmsa(ALIGNED, seed=2)
    for part in data.values():
        del part["text_bert"]
    text = np.zeros((7, 6, 8), np.float32)
    text[0, :3] = 1.0
    text[0, 1] = 0.0  # a silent step inside the utterance must not end it: length 3
    text[1, 4, 7] = -2.0  # one non-zero value in one feature is enough: length 5
    # sample 2 stays all zero: length 0, raised to 1 and counted
    text[3:] = 1.0  # full: length 6
    audio = data["train"]["audio"].copy()
    audio[:, 2:] = 0.0
    audio[0, 4, 0] = -np.inf  # MOSEI's COVAREP has -inf: a value, not padding
    data["train"]["text"], data["train"]["audio"] = text, audio
    splits, info = from_mmsa(data, "mosi.pkl")
    assert info["lengths_from"] == {m: "trailing zero rows" for m in DIMS}
    np.testing.assert_array_equal(splits["train"]["text_len"], [3, 5, 1, 6, 6, 6, 6])
    np.testing.assert_array_equal(splits["train"]["audio_len"], [5, 2, 2, 2, 2, 2, 2])
    np.testing.assert_array_equal(splits["train"]["vision_len"], np.full(7, 6))
    assert info["lengths_raised_to_1"]["train"] == {"text": 1, "audio": 0, "vision": 0}
    assert info["lengths_raised_to_1"]["valid"] == {"text": 0, "audio": 0, "vision": 0}


def test_column_labels_are_flattened_and_types_converted():
    data = make_mmsa(UNALIGNED, seed=3, lengths_keys=True)
    labels = np.array([[-3.0], [-1.2], [0.0], [0.4], [1.0 / 3.0], [2.8], [3.0]])  # (N, 1) float64
    data["train"]["regression_labels"] = labels
    data["train"]["audio"] = data["train"]["audio"].astype(np.float64)
    data["train"]["vision_lengths"] = data["train"]["vision_lengths"].astype(np.float64)
    del data["valid"]["id"]
    splits, info = from_mmsa(data, "x.pkl")
    train = splits["train"]
    assert train["label"].shape == (7,) and train["label"].dtype == np.float32
    np.testing.assert_array_equal(train["label"], np.float32([-3.0, -1.2, 0.0, 0.4, 1.0 / 3.0, 2.8, 3.0]))
    assert train["audio"].dtype == np.float32 and train["vision_len"].dtype == np.int64
    assert splits["valid"]["id"].tolist() == ["valid_0", "valid_1", "valid_2"]
    assert info["ids_generated"] == ["valid"]


def test_converted_splits_pass_the_prepared_writer(tmp_path):
    data = make_mmsa(UNALIGNED, seed=4, lengths_keys=True)
    data["test"]["audio"][1, 0, 0] = -np.inf
    path = _write(tmp_path / "unaligned_50.pkl", data)
    splits, info = load_mmsa(_mmsa_cfg(path=str(path)))
    manifest = write_prepared(tmp_path / "prepared", splits, info)
    assert manifest["nonfinite_replaced"]["test"]["audio"] == 1
    assert manifest["seq_len"] == UNALIGNED and manifest["dims"] == DIMS
    back = read_split(tmp_path / "prepared", "valid", read_manifest(tmp_path / "prepared"))
    np.testing.assert_array_equal(back["vision_len"], data["valid"]["vision_lengths"])


# ---------------------------------------------------------------------------------------------------------
# the restricted unpickler


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_pickles_of_every_common_protocol_load(tmp_path, protocol):
    data = make_mmsa(ALIGNED, seed=5)
    # values beyond arrays that real files hold: numpy scalars, a set, an empty bytes, a strided view
    data["train"]["annotations"] = [
        np.float64(1.5),
        np.int64(2),
        np.str_("Positive"),
        {1, 2},
        b"",
        bytearray(b"x"),
    ]
    data["valid"]["audio"] = np.ascontiguousarray(data["valid"]["audio"])[:, :, ::-1]
    loaded = safe_load_pickle(_write(tmp_path / "a.pkl", data, protocol))
    assert loaded["train"]["annotations"] == [1.5, 2, "Positive", {1, 2}, b"", bytearray(b"x")]
    for split in SIZES:
        for key in ("text", "audio", "vision", "text_bert", "regression_labels", "id"):
            np.testing.assert_array_equal(loaded[split][key], data[split][key])
            assert loaded[split][key].dtype == data[split][key].dtype


def test_a_numpy_1_pickle_loads_without_warnings(tmp_path):
    data = make_mmsa(ALIGNED, seed=6)
    data["train"]["annotations"] = [np.float32(0.5)]
    blob = pickle.dumps(data, protocol=2)
    old = blob.replace(b"numpy._core", b"numpy.core")
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in old and b"numpy._core" not in old
    (tmp_path / "old.pkl").write_bytes(old)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = safe_load_pickle(tmp_path / "old.pkl")
    np.testing.assert_array_equal(loaded["test"]["vision"], data["test"]["vision"])
    assert loaded["train"]["annotations"] == [np.float32(0.5)]


class _Payload:
    """Pickles as a call of `func(*args)`: what a hostile file would contain."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("protocol", [2, 5])
@pytest.mark.parametrize("kind", ["system", "eval", "popen"])
def test_a_pickle_that_calls_code_is_refused_before_it_runs(tmp_path, kind, protocol):
    marker = tmp_path / "pwned"
    func, args, name = {
        "system": (os.system, (f"touch {marker}",), f"{os.system.__module__}.system"),
        "eval": (builtins.eval, (f"open({str(marker)!r}, 'w').close()",), "builtins.eval"),
        "popen": (subprocess.Popen, (["touch", str(marker)],), "subprocess.Popen"),
    }[kind]
    data = make_mmsa(ALIGNED, seed=7)
    data["valid"]["annotations"] = _Payload(func, args)
    path = _write(tmp_path / "aligned_50.pkl", data, protocol)
    with pytest.raises(DataError) as e:
        safe_load_pickle(path)
    assert str(path) in str(e.value) and name in str(e.value)
    assert not marker.exists()


# The allow-list, written out here rather than read from the module: extending it is a decision about a
# security boundary, and this test makes it a visible one.
NUMPY_CORE = [
    f"{core}.{m}" for core in ("numpy._core", "numpy.core") for m in ("multiarray", "_multiarray_umath")
]
EXPECTED_ALLOWED = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
    *(("builtins", n) for n in ("set", "frozenset", "bytearray", "bytes", "complex", "slice")),
    *((m, n) for m in NUMPY_CORE for n in ("_reconstruct", "scalar", "ndarray", "dtype")),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy.core.numeric", "_frombuffer"),
}


def test_the_unpickler_allows_exactly_the_listed_globals():
    from mdkat.data.mmsa import _ALLOWED

    assert set(_ALLOWED) == EXPECTED_ALLOWED


def _call_pickle(module: str, name: str, arg: str, protocol: int) -> bytes:
    """A pickle that calls module.name(arg): GLOBAL (protocol 0) or STACK_GLOBAL (protocol 4) + REDUCE."""
    if protocol == 0:
        return f"c{module}\n{name}\n(V{arg}\ntR.".encode()

    def text(value: str) -> bytes:
        raw = value.encode()
        return b"\x8c" + bytes([len(raw)]) + raw  # SHORT_BINUNICODE

    return b"\x80\x04" + text(module) + text(name) + b"\x93" + text(arg) + b"\x85R."  # TUPLE1, REDUCE


# every way a pickle can name something that runs code or reaches a module: each must be refused by name
ROUTES = [
    ("builtins", "getattr"),
    ("builtins", "__import__"),
    ("builtins", "exec"),
    ("builtins", "eval"),
    ("builtins", "compile"),
    ("builtins", "open"),
    ("builtins", "breakpoint"),
    ("importlib", "import_module"),
    ("os", "system"),
    ("posix", "system"),
    ("subprocess", "check_output"),
    ("pickle", "loads"),
    ("numpy", "load"),
    ("numpy.testing._private.utils", "runstring"),
    ("__builtin__", "eval"),  # a Python 2 name, mapped to builtins.eval before the lookup
    ("__builtin__", "getattr"),
]


@pytest.mark.parametrize("protocol", [0, 4])
@pytest.mark.parametrize(("module", "name"), ROUTES)
def test_every_route_to_code_is_refused_by_name_before_it_runs(tmp_path, module, name, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "hostile.pkl"
    path.write_bytes(_call_pickle(module, name, f"open({str(marker)!r}, 'w').close()", protocol))
    with pytest.raises(DataError, match="refused to load global") as e:
        safe_load_pickle(path)
    shown = "builtins" if module == "__builtin__" else module
    assert f"'{shown}.{name}'" in str(e.value)
    assert not marker.exists()


def test_an_allowed_callable_cannot_carry_a_refused_one(tmp_path):
    # REDUCE on an allowed class (set) whose argument is a call of a refused global: refused while the
    # argument is built, before set() or the payload runs
    payload = _Payload(set, (_Payload(builtins.getattr, ("abc", "upper")),))
    path = _write(tmp_path / "aligned_50.pkl", {"train": {"annotations": payload}}, 2)
    with pytest.raises(DataError, match="'builtins.getattr'"):
        safe_load_pickle(path)


def test_an_object_array_with_a_payload_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    hostile = np.array([_Payload(os.system, (f"touch {marker}",))], dtype=object)
    path = _write(tmp_path / "aligned_50.pkl", {"train": {"annotations": hostile}}, 2)
    with pytest.raises(DataError, match="refused to load global"):
        safe_load_pickle(path)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 5])
def test_a_truncated_pickle_is_a_data_error(tmp_path, protocol):
    blob = pickle.dumps(make_mmsa(ALIGNED, seed=8), protocol=protocol)
    path = tmp_path / "cut.pkl"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="truncated or corrupt pickle") as e:
        safe_load_pickle(path)
    assert str(path) in str(e.value)
    path.write_bytes(b"")
    with pytest.raises(DataError, match="truncated or corrupt pickle"):
        safe_load_pickle(path)


def test_a_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="not found") as e:
        safe_load_pickle(tmp_path / "nope.pkl")
    assert str(tmp_path / "nope.pkl") in str(e.value)


# ---------------------------------------------------------------------------------------------------------
# structural errors


def _drop_valid_audio(d):
    del d["valid"]["audio"]


def _rank_2_test_vision(d):
    d["test"]["vision"] = d["test"]["vision"][:, :, 0]


def _short_train_labels(d):
    d["train"]["regression_labels"] = d["train"]["regression_labels"][:-1]


def _short_test_lengths(d):
    d["test"]["audio_lengths"] = d["test"]["audio_lengths"][:2]


def _empty_valid(d):
    d["valid"] = {k: v[:0] for k, v in d["valid"].items()}


def _drop_test(d):
    del d["test"]


def _two_label_columns(d):
    d["train"]["regression_labels"] = np.stack([d["train"]["regression_labels"]] * 2, axis=1)


def _other_audio_steps_in_valid(d):
    d["valid"]["audio"] = d["valid"]["audio"][:, :5]


def _text_bert_without_mask_row(d):
    d["train"]["text_bert"] = d["train"]["text_bert"][:, :2]


def _labels_off_the_scale(d):
    d["test"]["regression_labels"][[1, 2]] = [4.2, -3.01]


def _nan_label(d):
    d["valid"]["regression_labels"][0] = np.nan


def _lengths_only_in_train(d):
    del d["valid"]["vision_lengths"]


@pytest.mark.parametrize(
    "corrupt, expected",
    [
        (_drop_valid_audio, ["'valid'", "'audio'"]),
        (_rank_2_test_vision, ["'test'", "'vision'", "rank 3", "(4, 11)"]),
        (_short_train_labels, ["'train'", "regression_labels 6", "text 7"]),
        (_short_test_lengths, ["'test'", "audio_lengths 2", "vision 4"]),
        (_empty_valid, ["'valid'", "empty"]),
        (_drop_test, ["split 'test'"]),
        (_two_label_columns, ["'train'", "'regression_labels'", "(7, 2)"]),
        (_other_audio_steps_in_valid, ["'valid'", "'audio'", "(5, 3)"]),
        (_text_bert_without_mask_row, ["'train'", "'text_bert'", "(7, 2, 6)"]),
        (_lengths_only_in_train, ["'valid'", "'vision'", "vision_lengths"]),
        (_labels_off_the_scale, ["'test'", "'regression_labels'", "2 labels outside [-3, 3]", "4.2"]),
        (_nan_label, ["'valid'", "'regression_labels'", "non-finite", "1 such samples"]),
    ],
)
def test_malformed_files_are_data_errors_naming_split_and_key(corrupt, expected):
    data = make_mmsa(UNALIGNED, seed=9, lengths_keys=True)
    corrupt(data)
    with pytest.raises(DataError) as e:
        from_mmsa(data, "unaligned_50.pkl")
    message = str(e.value)
    assert message.startswith("unaligned_50.pkl: ")
    for part in expected:
        assert part in message


def test_a_top_level_that_is_not_a_dict_is_a_data_error():
    with pytest.raises(DataError, match="dict of splits"):
        from_mmsa([1, 2, 3], "x.pkl")


# ---------------------------------------------------------------------------------------------------------
# resolving the file


def test_load_by_path_checks_the_digest_and_records_provenance(tmp_path):
    path = _write(tmp_path / "aligned_50.pkl", make_mmsa(ALIGNED, seed=10))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    splits, info = load_mmsa(_mmsa_cfg(path=str(path), sha256=digest.upper(), dataset="mosei"))
    assert info["source"] == "mmsa" and info["dataset"] == "mosei" and info["aligned"] is True
    assert info["provenance"] == {"file": "aligned_50.pkl", "sha256": digest, "url": None}
    assert sorted(splits) == ["test", "train", "valid"]
    # without a digest to check, the file's own digest is still recorded
    _, info = load_mmsa(_mmsa_cfg(path=str(path)))
    assert info["provenance"]["sha256"] == digest


def test_load_by_path_with_a_wrong_digest_is_refused(tmp_path):
    path = _write(tmp_path / "aligned_50.pkl", make_mmsa(ALIGNED, seed=11))
    for wrong in ("0" * 64, "f" * 64):  # below and above the true digest
        with pytest.raises(DataError, match="SHA-256 mismatch") as e:
            load_mmsa(_mmsa_cfg(path=str(path), sha256=wrong))
        message = str(e.value)
        assert str(path) in message and wrong in message
        assert hashlib.sha256(path.read_bytes()).hexdigest() in message


def test_load_needs_a_digest_for_an_url_and_some_source_at_all(tmp_path):
    with pytest.raises(DataError, match="data.sha256 must also be set"):
        load_mmsa(_mmsa_cfg(url="http://127.0.0.1:9/aligned_50.pkl", sha256=None))
    with pytest.raises(DataError, match="set data.path or data.url"):
        load_mmsa(_mmsa_cfg(path=None, url=None))
    with pytest.raises(DataError, match="not found") as e:
        load_mmsa(_mmsa_cfg(path=str(tmp_path / "absent.pkl")))
    assert str(tmp_path / "absent.pkl") in str(e.value)


def test_prepare_downloads_by_url_and_verifies_the_published_digest(tmp_path):
    from mdkat.data import load_prepared
    from mdkat.data.download import DownloadError
    from mdkat.data.prepare import prepare
    from tests.loopback import FileServer

    payload = pickle.dumps(make_mmsa(UNALIGNED, seed=12, lengths_keys=True))
    digest = hashlib.sha256(payload).hexdigest()
    with FileServer({"mosi/unaligned_50.pkl": payload}) as server:
        url = server.url + "mosi/unaligned_50.pkl"
        cfg = _mmsa_cfg(url=url, sha256=digest, cache_dir=str(tmp_path / "cache"), download_retries=0)
        manifest = prepare(cfg, tmp_path / "out")
        assert manifest["provenance"] == {"file": "unaligned_50.pkl", "sha256": digest, "url": url}
        assert manifest["seq_len"] == UNALIGNED and manifest["aligned"] is False
        assert len(load_prepared(tmp_path / "out").train) == SIZES["train"]

        # a digest that does not belong to the file: refused, nothing kept, no output written
        wrong = cfg.model_copy(update={"sha256": "0" * 64, "cache_dir": str(tmp_path / "c2")})
        with pytest.raises(DownloadError, match="0{64}"):
            prepare(wrong, tmp_path / "o2")
    assert not (tmp_path / "o2").exists()
    assert not [p for p in (tmp_path / "c2").rglob("*") if p.is_file()]


# ---------------------------------------------------------------------------------------------------------
# what mutation testing found unchecked (reports/mutation)


def test_a_python_2_name_is_shown_as_written_and_a_python_3_name_alone(tmp_path):
    for module, name, shown in (
        ("__builtin__", "eval", "'builtins.eval' (written as '__builtin__.eval')"),
        ("urllib2", "urlopen", "'urllib.request.urlopen' (written as 'urllib2.urlopen')"),  # sorts after
        ("builtins", "eval", "'builtins.eval'"),
    ):
        path = tmp_path / f"{module}.pkl"
        path.write_bytes(_call_pickle(module, name, "1", 0))
        with pytest.raises(DataError) as e:
            safe_load_pickle(path)
        assert f"{shown}: only numpy arrays" in str(e.value)


def test_trailing_zero_lengths_over_many_chunks_equal_a_sample_by_sample_count():
    from mdkat.data.mmsa import _trailing_zero_lengths

    # T x d = 2^24: one sample per chunk, so every chunk boundary is crossed
    x = np.zeros((4, 4096, 4096), dtype=np.uint8)
    x[0, 4] = 1
    x[2, -1, -1] = 1
    x[3, :7, 0] = 1
    naive = [max((t + 1 for t in range(4096) if x[i, t].any()), default=0) for i in (0, 1, 2, 3)]
    assert naive == [5, 0, 4096, 7]
    np.testing.assert_array_equal(_trailing_zero_lengths(x), naive)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (np.array([3.0, 5.0]), [3, 5]),  # whole floats are lengths
        (np.array([2.5, 5.0]), "lengths must be whole numbers"),
        (np.array([2.6, 5.0]), "lengths must be whole numbers"),  # rounds up
        (np.array([np.nan, 5.0]), "lengths must be whole numbers"),
        (np.array([[3, 5]]), "expected a vector of integers"),
        (np.array(3), "expected a vector of integers"),
        (np.array(["3", "5"]), "expected a vector of integers"),
    ],
    ids=["whole-floats", "fraction", "fraction-rounding-up", "nan", "2-d", "0-d", "strings"],
)
def test_given_lengths_are_whole_numbers_in_a_vector(value, expected):
    from mdkat.data.mmsa import _given_lengths

    if isinstance(expected, str):
        with pytest.raises(DataError, match=f"split 's' key 'k': {expected}"):
            _given_lengths(value, "f.pkl", "s", "k")
    else:
        out = _given_lengths(value, "f.pkl", "s", "k")
        assert out.dtype == np.int64 and out.tolist() == expected


@pytest.mark.parametrize(
    "shape",
    [(7, 3, 7), (7, 3, 5), (7, 4, 6), (7, 3, 6, 1), (7, 18), (7, 3)],
    ids=["T+1", "T-1", "4-rows", "4-d", "2-d", "2-d-of-3"],
)
def test_a_text_bert_of_another_shape_is_refused(shape):
    data = make_mmsa(ALIGNED, seed=3)
    data["train"]["text_bert"] = np.ones(shape, dtype=np.int64)
    with pytest.raises(DataError, match=r"'text_bert': expected shape \(N, 3, 6\)"):
        from_mmsa(data, "x.pkl")


def test_long_texts_take_their_lengths_from_the_mask():
    steps = {"text": 300, "audio": 300, "vision": 300}  # beyond the small integers Python caches
    data = make_mmsa(steps, seed=4)
    splits, info = from_mmsa(data, "x.pkl")
    np.testing.assert_array_equal(splits["train"]["text_len"], data["train"]["text_bert"][:, 1].sum(axis=1))


@pytest.mark.parametrize(
    "shape", [(7, 1, 1), (7, 2), (7, 0), ()], ids=["3-d", "two-columns", "no-column", "0-d"]
)
def test_labels_that_are_not_one_per_sample_are_refused(shape):
    data = make_mmsa(ALIGNED, seed=5)
    data["train"]["regression_labels"] = np.zeros(shape)
    with pytest.raises(DataError, match="'regression_labels': expected numbers of shape"):
        from_mmsa(data, "x.pkl")


def test_unaligned_audio_and_vision_without_length_keys_ignore_the_text_mask():
    data = make_mmsa(UNALIGNED, seed=6)
    for part in data.values():
        part["audio"][:, 4:] = 0.0  # trailing zeros: audio length 4
        part["vision"][:, 10:] = 0.0  # vision length 10
    splits, info = from_mmsa(data, "x.pkl")
    assert info["lengths_from"] == {
        "text": "text_bert attention mask",
        "audio": "trailing zero rows",
        "vision": "trailing zero rows",
    }
    assert (
        splits["valid"]["audio_len"].tolist() == [4] * 3
        and splits["valid"]["vision_len"].tolist() == [10] * 3
    )


def test_lengths_of_one_are_kept_and_only_zeros_are_raised_and_counted():
    data = make_mmsa(ALIGNED, seed=7)
    for part in data.values():
        del part["text_bert"]
        part["text"][:] = 0.0
        part["text"][:, 0] = 1.0  # every sample one step long
    data["train"]["text"][2] = 0.0  # one sample with none
    splits, info = from_mmsa(data, "x.pkl")
    assert splits["train"]["text_len"].tolist() == [1] * 7
    assert info["lengths_raised_to_1"]["train"]["text"] == 1
    assert info["lengths_raised_to_1"]["valid"]["text"] == 0


@pytest.mark.parametrize(
    ("ids", "expected"),
    [
        (np.array(["a", "b"]), ["a", "b"]),
        (np.array([b"a", b"\xc3\xa9"]), ["a", "é"]),
        (np.array([b"\xc3\xa9", 3], dtype=object), ["é", "3"]),  # numpy's own cast reads bytes as ASCII
    ],
    ids=["str", "bytes", "object"],
)
def test_ids_of_every_stored_kind_become_strings(ids, expected):
    data = make_mmsa(ALIGNED, seed=8)
    data = {
        s: {k: (v[:2] if hasattr(v, "__len__") and len(v) else v) for k, v in p.items()}
        for s, p in data.items()
    }
    for part in data.values():
        part["id"] = ids[: len(expected)]
    splits, _ = from_mmsa(data, "x.pkl")
    assert splits["test"]["id"].tolist() == expected


def test_features_of_rank_4_are_refused():
    data = make_mmsa(ALIGNED, seed=8)
    data["valid"]["text"] = data["valid"]["text"][..., None]
    with pytest.raises(DataError, match="split 'valid' key 'text': expected rank 3"):
        from_mmsa(data, "x.pkl")


def test_ids_that_are_not_a_vector_are_refused():
    data = make_mmsa(ALIGNED, seed=8)
    data["valid"]["id"] = np.array([["a"], ["b"], ["c"]])
    with pytest.raises(DataError, match=r"split 'valid' key 'id': expected shape \(3,\), got \(3, 1\)"):
        from_mmsa(data, "x.pkl")


@pytest.mark.parametrize("key", ["id", "audio_lengths", "text_bert"])
def test_a_single_value_where_one_per_sample_is_expected_is_refused_by_key(key):
    data = make_mmsa(UNALIGNED, seed=8, lengths_keys=True)
    data["test"][key] = np.array(7)  # a 0-d array has no len()
    with pytest.raises(
        DataError, match=f"split 'test' key '{key}': expected one entry per sample, got a single ndarray"
    ):
        from_mmsa(data, "x.pkl")


def test_splits_that_disagree_with_train_are_named_with_train_values():
    data = make_mmsa(UNALIGNED, seed=9, lengths_keys=True)
    data["valid"]["audio"] = np.concatenate([data["valid"]["audio"]] * 2, axis=1)  # more steps than train
    with pytest.raises(DataError, match=r"split 'valid' key 'audio': shape \(T, d\) = \(18, 3\) differs"):
        from_mmsa(data, "x.pkl")
    data = make_mmsa(UNALIGNED, seed=9, lengths_keys=True)
    for split in ("train", "valid"):  # the test split's rule sorts after train's
        del data[split]["vision_lengths"]
    with pytest.raises(DataError, match="split 'test' key 'vision': lengths come from 'vision_lengths'"):
        from_mmsa(data, "x.pkl")
    data = make_mmsa(UNALIGNED, seed=9, lengths_keys=True)
    data["test"]["audio"] = data["test"]["audio"][:, :5]
    with pytest.raises(
        DataError, match=r"split 'test' key 'audio': shape \(T, d\) = \(5, 3\) differs from train's \(9, 3\)"
    ):
        from_mmsa(data, "x.pkl")
    data = make_mmsa(UNALIGNED, seed=9, lengths_keys=True)
    del data["test"]["vision_lengths"]
    with pytest.raises(
        DataError,
        match="split 'test' key 'vision': lengths come from 'trailing zero rows' but in train from "
        "'vision_lengths'",
    ):
        from_mmsa(data, "x.pkl")


def test_a_path_that_cannot_be_opened_is_a_data_error_naming_it(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path}: cannot open: "):
        safe_load_pickle(tmp_path)  # a folder: open() fails with an OSError that is not FileNotFoundError
