"""The cmu-sdk source end to end on tiny hand-made .csd files, served locally or over loopback HTTP.

Every stream is built so that the aligned values can be written down by hand: audio frames of word w
carry the value w, vision frames 10 w, word vectors 100 + w.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mdkat.data import DataError, load_prepared
from mdkat.data.cmu_sdk import CSD_FILES, MOSI_COLUMNS, standard_folds
from mdkat.data.csd import write_csd
from mdkat.data.prepare import prepare
from tests.conftest import small_data
from tests.loopback import FileServer

# one video per fold, plus one outside the standard folds
TRAIN, VALID, TEST, OUTSIDE = "2iD-tVS8NPw", "WKA5OygbEKI", "tmZoasNr4rU", "not-a-mosi-video"
WORDS = [(0, 1), (1, 2), (2, 3), (3, 4), (5, 6), (6, 7)]  # a pause between 4 s and 5 s
SEGMENTS = [(0, 4), (5, 7)]
LABELS = {TRAIN: [1.5, -0.6], VALID: [2.0, 0.0], TEST: [-3.0, 0.4], OUTSIDE: [1.0, 1.0]}
SPOKEN = ["the", "movie", "sp", "good", "awful", "dull"]  # per word of WORDS; `sp`: the SDK's pause
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "movie", "good", "awful", "dull", "sp"]
ID = {w: i for i, w in enumerate(VOCAB)}
CUT = {n: rel for n, rel in CSD_FILES["mosi"].items() if n != "words"}  # what is read without a tokenizer


def _streams(vision_gap: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    words = np.array(WORDS, dtype=np.float64)
    text = (100 + np.arange(len(WORDS)))[:, None] * np.ones((1, 6))  # (6 words, 6)
    # audio: 0.5 s frames over [0, 7]; a frame in word w has the value w (word index by position)
    a_start = np.arange(0, 7, 0.5)
    a_int = np.stack([a_start, a_start + 0.5], 1)
    word_of = np.searchsorted(words[:, 0], a_start, side="right") - 1
    audio = np.repeat(word_of[:, None].astype(np.float64), 74, axis=1)  # (14, 74)
    # vision: 1/3 s frames, value 10 w; optionally no frames at all during the last word
    v_start = np.arange(0, 21) / 3
    v_int = np.stack([v_start, v_start + 1 / 3], 1)
    vision = np.repeat(
        (10.0 * (np.searchsorted(words[:, 0], v_start, side="right") - 1))[:, None], 47, axis=1
    )
    if vision_gap:
        keep = v_int[:, 1] <= 6.0 + 1e-9
        v_int, vision = v_int[keep], vision[keep]
    return {
        "text": (words, text),
        "audio": (a_int, audio),
        "vision": (v_int, vision),
        "labels": (np.array(SEGMENTS, dtype=np.float64), None),
    }


def _write_mosi(folder: Path, *, neg_inf: bool = False) -> None:
    data = {name: {} for name in CSD_FILES["mosi"]}
    for video in LABELS:
        streams = _streams(vision_gap=(video == TRAIN))
        # the words file: the same intervals as the word vectors, one byte string per word, as the SDK's
        streams["words"] = (streams["text"][0], np.array(SPOKEN, dtype="S")[:, None])
        for name, (intervals, features) in streams.items():
            if name == "labels":
                features = np.array(LABELS[video], dtype=np.float64)[:, None]
            if name == "audio" and neg_inf and video == TEST:
                features = features.copy()
                features[0, :] = -np.inf  # a COVAREP -inf row, as MOSEI has
            data[name][video] = (intervals, features)
    for name, rel in CSD_FILES["mosi"].items():
        write_csd(folder / Path(rel).name, data[name], Path(rel).stem, {"dimension names": name})


def _cfg(**changes):
    return small_data(source="cmu-sdk", dataset="mosi").model_copy(update=changes)


def test_folds_are_the_sdk_standard():
    folds = standard_folds("mosi")
    assert folds[TRAIN] == "train" and folds[VALID] == "valid" and folds[TEST] == "test"
    counts = {s: sum(v == s for v in folds.values()) for s in ("train", "valid", "test")}
    assert counts == {"train": 52, "valid": 10, "test": 31}  # MOSI's 93 videos
    assert len(standard_folds("mosei")) > 3000


def test_local_csd_dir_aligns_splits_and_pads(tmp_path):
    _write_mosi(tmp_path / "csd", neg_inf=True)
    manifest = prepare(_cfg(csd_dir=str(tmp_path / "csd"), seq_len=5), tmp_path / "out")
    data = load_prepared(tmp_path / "out")
    assert manifest["counts"] == {"train": 2, "valid": 2, "test": 2}
    assert manifest["segments_outside_folds"] == 2
    assert manifest["dims"] == {"text": 6, "audio": 5, "vision": 20}  # MOSI's column subsets
    assert manifest["seq_len"] == {"text": 5, "audio": 5, "vision": 5}

    train = data.train
    assert train.id == [f"{TRAIN}[0]", f"{TRAIN}[1]"]
    np.testing.assert_allclose(train.label.numpy(), [1.5, -0.6], rtol=1e-6)
    # segment 0 has 4 words (lengths 4), segment 1 two words
    assert train.text_len.tolist() == [4, 2] and train.audio_len.tolist() == [4, 2]
    np.testing.assert_array_equal(train.text[0, :, 0].numpy(), [100, 101, 102, 103, 0])
    np.testing.assert_array_equal(train.text[1, :2, 0].numpy(), [104, 105])
    # audio: mean of the frames over each word = the word's index (frames in the pause belong to no word)
    np.testing.assert_array_equal(train.audio[0, :4].numpy(), np.repeat([[0], [1], [2], [3]], 5, axis=1))
    np.testing.assert_array_equal(train.audio[1, :2, 0].numpy(), [4, 5])
    # vision: 10 w, and the last word (no vision frames in the train video) imputed as zeros
    np.testing.assert_array_equal(train.vision[1, :2, 0].numpy(), [40, 0])
    assert not train.text[0, 4:].any()  # padding

    # the -inf audio frame makes the first word's mean -inf; it is zeroed and counted after alignment
    assert manifest["nonfinite_replaced"]["test"]["audio"] == 5
    assert data.test.audio[0, 0].eq(0).all() and data.test.audio[0, 1, 0] == 1
    assert manifest["source_files"]["audio"]["sha256"] and manifest["source_files"]["audio"]["url"] is None


def test_truncation_keeps_the_first_words(tmp_path):
    _write_mosi(tmp_path / "csd")
    prepare(_cfg(csd_dir=str(tmp_path / "csd"), seq_len=3), tmp_path / "out")
    train = load_prepared(tmp_path / "out").train
    assert train.text_len.tolist() == [3, 2]
    np.testing.assert_array_equal(train.text[0, :, 0].numpy(), [100, 101, 102])


def test_all_columns_when_subset_off(tmp_path):
    _write_mosi(tmp_path / "csd")
    manifest = prepare(_cfg(csd_dir=str(tmp_path / "csd"), mosi_feature_subset=False), tmp_path / "out")
    assert manifest["dims"] == {"text": 6, "audio": 74, "vision": 47}
    assert len(MOSI_COLUMNS["vision"]) == 20


def test_download_from_server_into_cache(tmp_path):
    _write_mosi(tmp_path / "csd")
    files = {rel: (tmp_path / "csd" / Path(rel).name).read_bytes() for rel in CSD_FILES["mosi"].values()}
    with FileServer(files) as server:
        cfg = _cfg(base_url=server.url, cache_dir=str(tmp_path / "cache"), download_retries=0)
        manifest = prepare(cfg, tmp_path / "out")
        assert len(server.requests) == 4
        prepare(cfg, tmp_path / "out2")  # a second run uses the verified cache
        assert len(server.requests) == 4
    assert manifest["counts"]["train"] == 2
    assert not (tmp_path / "cache" / "mosi" / Path(CSD_FILES["mosi"]["words"]).name).exists()
    for name, rel in CUT.items():
        cached = tmp_path / "cache" / "mosi" / Path(rel).name
        assert cached.read_bytes() == files[rel]
        assert manifest["source_files"][name]["url"] == server.url + rel


def test_unreachable_server_names_the_alternative(tmp_path):
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    cfg = _cfg(base_url=f"http://127.0.0.1:{port}/", cache_dir=str(tmp_path / "cache"), download_retries=0)
    with pytest.raises(DataError, match=r"(?s)127\.0\.0\.1.*CMU server is often down.*data\.source=mmsa"):
        prepare(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_file_in_csd_dir(tmp_path):
    _write_mosi(tmp_path / "csd")
    (tmp_path / "csd" / "CMU_MOSI_COVAREP.csd").unlink()
    with pytest.raises(DataError, match="CMU_MOSI_COVAREP.csd: not found"):
        prepare(_cfg(csd_dir=str(tmp_path / "csd")), tmp_path / "out")


# ---------------------------------------------------------------------------------------------------------
# word pieces for a fine-tuned BERT (data.tokenizer)


@pytest.fixture
def tokenizer_dir(tmp_path):
    from transformers import BertTokenizer

    BertTokenizer(vocab=ID).save_pretrained(tmp_path / "bert")
    return tmp_path / "bert"


@pytest.mark.parametrize("steps", [5, 4])
def test_each_segment_s_words_become_word_pieces_without_the_pauses(tmp_path, tokenizer_dir, steps):
    _write_mosi(tmp_path / "csd")
    cfg = _cfg(csd_dir=str(tmp_path / "csd"), seq_len=steps, tokenizer=str(tokenizer_dir))
    manifest = prepare(cfg, tmp_path / "out")
    train = load_prepared(tmp_path / "out").train
    # segment 0 holds words 0-3 ("the movie sp good"), segment 1 words 4-5 ("awful dull")
    first = ["[CLS]", "the", "movie", "good", "[SEP]"] if steps == 5 else ["[CLS]", "the", "movie", "[SEP]"]
    second = ["[CLS]", "awful", "dull", "[SEP]", "[PAD]"][:steps]
    assert train.text_ids.tolist() == [[ID[w] for w in first], [ID[w] for w in second]]
    assert train.text_mask.tolist() == [[1] * steps, [1, 1, 1, 1, 0][:steps]]
    assert not train.text_segment.any()
    assert manifest["text_tokens"] == steps
    assert train.text_len.tolist() == [min(4, steps), 2]  # the word vectors are cut as before


def test_tokenizer_errors_name_the_key(tmp_path):
    _write_mosi(tmp_path / "csd")
    with pytest.raises(DataError, match="data.tokenizer: .*nowhere: not a folder"):
        prepare(_cfg(csd_dir=str(tmp_path / "csd"), tokenizer=str(tmp_path / "nowhere")), tmp_path / "out")
    with pytest.raises(DataError, match="data.tokenizer is set, but only cmu-sdk data are tokenised"):
        prepare(small_data(tokenizer=str(tmp_path)), tmp_path / "out")
    assert not (tmp_path / "out").exists()
