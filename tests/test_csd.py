"""Reading and writing `.csd` computational sequences: round trips and a clear error for each bad file."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from mdkat.data.csd import read_csd, read_csd_metadata, write_csd
from mdkat.data.prepared import DataError


def _float_data() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    audio = rng.normal(size=(5, 3)).astype(np.float32)
    audio[2, 1] = -np.inf
    return {
        "vid_b": (np.array([[0.0, 0.01], [0.01, 0.02], [0.02, 0.03], [0.05, 0.06], [0.06, 0.07]]), audio),
        "vid_a": (np.array([[1.0, 2.5]]), np.array([[0.5, -1.0, 2.0]], dtype=np.float32)),
        "vid_empty": (np.zeros((0, 2)), np.zeros((0, 3), dtype=np.float32)),
    }


def test_round_trip_float_features(tmp_path: Path) -> None:
    path = tmp_path / "audio.csd"
    data = _float_data()
    write_csd(path, data, "COVAREP", {"root name": "COVAREP"})
    back = read_csd(path)
    # Videos come back in the order they were written, not sorted by name.
    assert list(back) == ["vid_b", "vid_a", "vid_empty"]
    for video, (intervals, features) in data.items():
        got_iv, got_ft = back[video]
        assert got_iv.dtype == np.float64 and got_iv.shape == intervals.shape
        assert got_ft.dtype == np.float32 and got_ft.shape == features.shape
        np.testing.assert_array_equal(got_iv, intervals)
        np.testing.assert_array_equal(got_ft, features)
    assert back["vid_b"][1][2, 1] == -np.inf


def test_round_trip_word_bytes_with_pauses(tmp_path: Path) -> None:
    path = tmp_path / "words.csd"
    words = np.array([[b"sp"], [b"hello"], [b"sp"], [b"world"]])
    intervals = np.array([[0.0, 0.3], [0.3, 0.7], [0.7, 0.9], [0.9, 1.4]])
    write_csd(path, {"v1": (intervals, words)}, "words", {})
    got_iv, got_ft = read_csd(path)["v1"]
    assert got_ft.dtype.kind == "S"
    assert got_ft[:, 0].tolist() == [b"sp", b"hello", b"sp", b"world"]
    np.testing.assert_array_equal(got_iv, intervals)


def test_layout_is_the_sdk_one(tmp_path: Path) -> None:
    path = tmp_path / "x.csd"
    write_csd(path, {"v1": (np.array([[0.0, 1.0]]), np.ones((1, 2)))}, "My Root", {"k": "v"})
    with h5py.File(path, "r") as f:
        assert list(f) == ["My Root"]
        assert sorted(f["My Root"]) == ["data", "metadata"]
        assert f["My Root/data/v1/features"].shape == (1, 2)
        assert f["My Root/data/v1/intervals"].shape == (1, 2)
        assert f["My Root/metadata/k"][0] == b"v"  # the SDK reads metadata as element [0]


def test_metadata_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "m.csd"
    meta = {"root name": "labels", "alignment compatible": True, "dimension names": ["sentiment", "happy"]}
    write_csd(path, {"v": (np.array([[0.0, 1.0]]), np.zeros((1, 2)))}, "labels", meta)
    got = read_csd_metadata(path)
    assert got == {
        "root name": "labels",
        "alignment compatible": "true",
        "dimension names": '["sentiment", "happy"]',
    }
    assert json.loads(got["dimension names"]) == ["sentiment", "happy"]


def test_metadata_stored_as_sdk_vlen_array(tmp_path: Path) -> None:
    # The SDK writes each metadata entry as a (1,) array of variable-length strings.
    path = tmp_path / "sdk.csd"
    with h5py.File(path, "w") as f:
        f.create_group("root/data")
        f.create_dataset("root/metadata/md5", data=["abc"], dtype=h5py.string_dtype())
    assert read_csd_metadata(path) == {"md5": "abc"}
    assert read_csd(path) == {}


def test_interrupted_write_leaves_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "a.csd"
    write_csd(path, {"v": (np.array([[0.0, 1.0]]), np.ones((1, 1)))}, "a", {})
    before = path.read_bytes()
    bad = {"v": (np.array([[0.0, 1.0]]), np.ones((1, 1))), "w": (np.array([[2.0, 1.0]]), np.ones((1, 1)))}
    with pytest.raises(DataError, match="'w'"):
        write_csd(path, bad, "a", {})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.csd"]


def test_every_storage_layout_reads_as_h5py_reads_it(tmp_path: Path) -> None:
    # Contiguous numeric data is read from its file offset; everything else goes through HDF5.
    path = tmp_path / "layouts.csd"
    iv = np.array([[0.0, 0.5], [0.5, 1.0], [1.0, 1.5]])
    features = np.arange(12.0).reshape(3, 4)
    with h5py.File(path, "w") as f:
        data = f.create_group("seq/data")
        cases = {
            "contiguous": {"data": features.astype(np.float32)},
            "big_endian": {"data": features.astype(">f8")},
            "chunked_gzip": {"data": features, "chunks": (1, 4), "compression": "gzip"},
            "integers": {"data": features.astype(np.int16)},
            "fixed_bytes": {"data": np.array([[b"sp"], [b"hello"], [b"x"]])},
            "vlen_str": {"data": [["a"], ["bcd"], ["sp"]], "dtype": h5py.string_dtype()},
        }
        for video, kwargs in cases.items():
            data.create_dataset(f"{video}/features", **kwargs)
            data.create_dataset(
                f"{video}/intervals", data=iv.astype(">f8" if video == "big_endian" else "<f8")
            )
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_layout(h5py.h5d.COMPACT)
        space = h5py.h5s.create_simple((3, 4))
        h5py.h5d.create(data.id, b"compact_features", h5py.h5t.NATIVE_DOUBLE, space, dcpl=dcpl).write(
            h5py.h5s.ALL, h5py.h5s.ALL, features
        )
        data.create_group("compact")
        data.move("compact_features", "compact/features")
        data.create_dataset("compact/intervals", data=iv)
        data.create_dataset("unwritten/features", shape=(3, 4), dtype=np.float64)
        data.create_dataset("unwritten/intervals", data=iv)
    got = read_csd(path)
    with h5py.File(path, "r") as f:
        for video in f["seq/data"]:
            want = f[f"seq/data/{video}/features"][()]
            assert got[video][1].dtype == want.dtype, video
            np.testing.assert_array_equal(got[video][1], want, err_msg=video)
            np.testing.assert_array_equal(got[video][0], iv, err_msg=video)
            assert got[video][0].dtype == np.float64
    np.testing.assert_array_equal(got["big_endian"][1], features)
    np.testing.assert_array_equal(got["compact"][1], features)
    assert got["vlen_str"][1][:, 0].tolist() == [b"a", b"bcd", b"sp"]
    np.testing.assert_array_equal(got["unwritten"][1], np.zeros((3, 4)))
    # A user block shifts every offset in the file.
    with h5py.File(tmp_path / "userblock.csd", "w", userblock_size=1024) as f:
        f.create_dataset("seq/data/v/features", data=features.astype(np.float32))
        f.create_dataset("seq/data/v/intervals", data=iv)
    np.testing.assert_array_equal(read_csd(tmp_path / "userblock.csd")["v"][1], features)


# --- bad input: every error names the file, and the video and dataset where there is one ---------------


def _h5(path: Path, build) -> Path:
    with h5py.File(path, "w") as f:
        build(f)
    return path


def _video(f: h5py.File, intervals=None, features=None, root: str = "r", video: str = "vid7") -> None:
    g = f.require_group(f"{root}/data/{video}")
    if intervals is not None:
        g.create_dataset("intervals", data=np.asarray(intervals, dtype=np.float64))
    if features is not None:
        g.create_dataset("features", data=np.asarray(features, dtype=np.float32))


def _raises(path: Path, *parts: str) -> str:
    with pytest.raises(DataError) as info:
        read_csd(path)
    message = str(info.value)
    assert str(path) in message
    for part in parts:
        assert part in message
    return message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.csd"
    assert "not found" in _raises(path)
    with pytest.raises(DataError, match="nope.csd"):
        read_csd_metadata(path)


def test_not_hdf5(tmp_path: Path) -> None:
    path = tmp_path / "text.csd"
    path.write_text("this is not HDF5\n")
    assert "not an HDF5 file" in _raises(path)


def test_no_top_level_group(tmp_path: Path) -> None:
    path = _h5(tmp_path / "empty.csd", lambda f: None)
    assert "found 0" in _raises(path)


def test_top_level_dataset(tmp_path: Path) -> None:
    path = _h5(tmp_path / "ds.csd", lambda f: f.create_dataset("root", data=np.zeros(3)))
    assert "not a group" in _raises(path, "'root'")


def test_two_top_level_groups(tmp_path: Path) -> None:
    path = _h5(tmp_path / "two.csd", lambda f: (f.create_group("a/data"), f.create_group("b/data")))
    assert "found 2" in _raises(path, "'a'", "'b'")


def test_no_data_group(tmp_path: Path) -> None:
    path = _h5(tmp_path / "nodata.csd", lambda f: f.create_group("root/metadata"))
    assert "missing" in _raises(path, "/root/data")


def test_video_that_is_not_a_group(tmp_path: Path) -> None:
    path = _h5(tmp_path / "flat.csd", lambda f: f.create_dataset("r/data/vid7", data=np.zeros((2, 2))))
    assert "expected a group" in _raises(path, "'vid7'")


def test_features_that_are_a_group(tmp_path: Path) -> None:
    def build(f: h5py.File) -> None:
        _video(f, intervals=[[0, 1]])
        f.create_group("r/data/vid7/features")

    path = _h5(tmp_path / "grp.csd", build)
    assert "not a dataset" in _raises(path, "'vid7'", "'features'")


def test_video_without_features(tmp_path: Path) -> None:
    path = _h5(tmp_path / "nofeat.csd", lambda f: _video(f, intervals=[[0, 1]]))
    assert "missing" in _raises(path, "'vid7'", "'features'")


def test_video_without_intervals(tmp_path: Path) -> None:
    path = _h5(tmp_path / "noiv.csd", lambda f: _video(f, features=[[1.0]]))
    assert "missing" in _raises(path, "'vid7'", "'intervals'")


@pytest.mark.parametrize("intervals", [[[0.0, 1.0, 2.0]], [0.0, 1.0]])
def test_intervals_not_n_by_2(tmp_path: Path, intervals) -> None:
    n = np.asarray(intervals).shape[0]
    path = _h5(tmp_path / "shape.csd", lambda f: _video(f, intervals=intervals, features=np.zeros((n, 2))))
    assert "(n, 2)" in _raises(path, "'vid7'", "'intervals'")


@pytest.mark.parametrize(
    ("last", "why"),
    [
        ([3, 2.5], "starts after it ends"),
        ([-1.0, 2.5], "is negative"),
        ([np.nan, 2.5], "is not finite"),
        ([2.0, np.inf], "is not finite"),
    ],
    ids=["reversed", "negative", "nan", "inf"],
)
def test_an_interval_that_is_no_time_span_is_refused(tmp_path: Path, last, why) -> None:
    path = _h5(tmp_path / "back.csd", lambda f: _video(f, [[0, 1], [1, 2], last], np.zeros((3, 2))))
    message = _raises(path, "'vid7'", "'intervals'", why)
    assert "row 2" in message and "1 invalid rows" in message


def test_row_count_mismatch(tmp_path: Path) -> None:
    path = _h5(tmp_path / "rows.csd", lambda f: _video(f, [[0, 1], [1, 2]], np.zeros((3, 2))))
    message = _raises(path, "'vid7'", "'features'", "'intervals'")
    assert "3 rows" in message and "has 2" in message


# -------------------------------------------------------------------------------------------------------
# what mutation testing found unchecked (reports/mutation)


@pytest.mark.parametrize("intervals", [[[[0.0, 1.0], [1.0, 2.0]]], [[0.0], [1.0]]], ids=["3-d", "(n, 1)"])
def test_intervals_of_another_rank_or_width_are_refused(tmp_path: Path, intervals) -> None:
    n = np.asarray(intervals).shape[0]
    path = _h5(tmp_path / "rank.csd", lambda f: _video(f, intervals=intervals, features=np.zeros((n, 2))))
    assert "(n, 2)" in _raises(path, "'vid7'", "'intervals'")


@pytest.mark.parametrize("features", [np.zeros(2), np.zeros((2, 3, 1))], ids=["1-d", "3-d"])
def test_features_that_are_not_a_matrix_are_refused(tmp_path: Path, features) -> None:
    path = _h5(tmp_path / "feat.csd", lambda f: _video(f, [[0, 1], [1, 2]], features))
    assert "(n, d)" in _raises(path, "'vid7'", "'features'")


def test_fewer_feature_rows_than_intervals_are_refused_with_both_counts(tmp_path: Path) -> None:
    path = _h5(tmp_path / "few.csd", lambda f: _video(f, [[0, 1], [1, 2], [2, 3]], np.zeros((1, 4))))
    assert "has 1 rows, 'intervals' has 3" in _raises(path, "'vid7'")


def test_long_videos_and_zero_length_intervals_read_back(tmp_path: Path) -> None:
    # 300 rows: row counts beyond the small integers Python caches compare by value, not identity
    starts = np.arange(300) * 0.5
    intervals = np.stack([starts, starts + 0.5], axis=1)
    intervals[7, 1] = intervals[7, 0]  # a word of zero length: a valid span
    features = np.arange(600, dtype=np.float32).reshape(300, 2)
    write_csd(tmp_path / "long.csd", {"v": (intervals, features)}, "r")
    read = read_csd(tmp_path / "long.csd")["v"]
    np.testing.assert_array_equal(read[0], intervals)
    np.testing.assert_array_equal(read[1], features)


@pytest.mark.parametrize(
    ("rows", "why", "first"),
    [
        ([[0, 1], [-1.0, -2.0]], "is negative", 1),  # negative and reversed at once: still invalid
        ([[0, 1], [0.5, 0.0]], "starts after it ends", 1),  # reversed, ending at 0: not negative
        ([[0, 1], [3, 2], [np.nan, 1]], "starts after it ends", 1),  # the first of two is named
    ],
    ids=["negative-and-reversed", "reversed-to-zero", "first-of-two"],
)
def test_the_first_invalid_row_and_its_reason_are_named(tmp_path: Path, rows, why, first) -> None:
    path = _h5(tmp_path / "bad.csd", lambda f: _video(f, rows, np.zeros((len(rows), 2))))
    bad = sum(1 for a, b in rows[1:] if not (0 <= a <= b))
    message = _raises(path, "'vid7'", why)
    assert f"row {first} " in message and f"({bad} invalid rows" in message


def test_an_invalid_row_in_a_later_video_names_that_video_and_its_own_row(tmp_path: Path) -> None:
    def build(f: h5py.File) -> None:
        _video(f, [[0, 1], [1, 2]], np.zeros((2, 2)), video="a")
        _video(f, [[0, 1], [1, 2]], np.zeros((2, 2)), video="b")
        _video(f, [[0, 1], [1, 2], [5, 4]], np.zeros((3, 2)), video="c")  # the first invalid row of the file
        _video(f, [[0, 1], [-1, 2]], np.zeros((2, 2)), video="d")

    message = _raises(
        _h5(tmp_path / "later.csd", build), "'c'", "row 2 starts after it ends", "(1 invalid rows"
    )
    assert not any(f"'{v}'" in message for v in "abd")


def test_metadata_that_is_not_text_reads_as_text_and_keeps_its_order(tmp_path: Path) -> None:
    path = _h5(
        tmp_path / "meta.csd",
        lambda f: (_video(f, [[0, 1]], [[1.0]]), f["r"].create_dataset("metadata/n", data=5)),
    )
    assert read_csd_metadata(path) == {"n": "5"}
    write_csd(
        tmp_path / "order.csd", {"v": (np.array([[0.0, 1.0]]), np.ones((1, 1)))}, "r", {"z": "1", "a": "2"}
    )
    assert list(read_csd_metadata(tmp_path / "order.csd")) == ["z", "a"]
