"""Word alignment: against a literal per-interval implementation on random `.csd` data, and by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mdkat.data.align import align
from mdkat.data.csd import read_csd, write_csd
from mdkat.data.prepared import DataError

EPS = 1e-5


# --- the definition, applied literally: one reference row at a time, one sequence row at a time ---------


def naive_align(sequences, reference, collapse="mean", impute=True):
    groups = {}
    for name, entries in sequences.items():
        rows_of = {}
        for key, (intervals, features) in entries.items():
            video = key.split("[")[0]
            rows = rows_of.setdefault(video, [])
            for r in range(len(intervals)):
                rows.append((float(intervals[r][0]), float(intervals[r][1]), features[r]))
        # Python's sort is stable: rows with equal starts keep their input order.
        groups[name] = {video: sorted(rows, key=lambda row: row[0]) for video, rows in rows_of.items()}
    widths, dtypes = {}, {}
    for name, entries in sequences.items():
        features = next(iter(entries.values()))[1]
        widths[name] = features.shape[1]
        dtypes[name] = features.dtype
    out = {name: {} for name in sequences}
    late = {name: {} for name in sequences}
    for video in groups[reference]:
        if not all(video in groups[name] for name in sequences):
            continue
        for i, (ref_start, ref_end, _) in enumerate(groups[reference][video]):
            if not ref_end - ref_start > EPS:
                continue
            key = f"{video}[{i}]"
            found = {}
            for name in sequences:
                pieces, rows = [], []
                for start, end, features in groups[name][video]:
                    if (
                        start < ref_end + EPS
                        and end > ref_start - EPS
                        and min(end, ref_end) - max(start, ref_start) > EPS
                    ):
                        pieces.append([max(start, ref_start), min(end, ref_end)])
                        rows.append(features)
                found[name] = (pieces, rows)
            if not impute and any(len(pieces) == 0 for pieces, _ in found.values()):
                continue
            for name, (pieces, rows) in found.items():
                if not pieces:
                    zeros = np.zeros((1, widths[name]), dtype=dtypes[name])
                    late[name][key] = (np.array([[ref_start, ref_end]]), zeros)
                elif collapse == "mean":
                    total = np.zeros(widths[name], dtype=np.float64)
                    with np.errstate(invalid="ignore"):  # +inf and -inf in one window give NaN
                        for features in rows:
                            total = total + features.astype(np.float64)
                    mean = (total / len(rows)).astype(dtypes[name])
                    span = [min(p[0] for p in pieces), max(p[1] for p in pieces)]
                    out[name][key] = (np.array([span]), mean[None, :])
                else:
                    out[name][key] = (np.array(pieces), np.array(rows))
    for name in sequences:
        out[name].update(late[name])
    return out


def assert_same(got, want) -> None:
    assert list(got) == list(want)
    for name in want:
        assert list(got[name]) == list(want[name]), name
        for key, (want_iv, want_ft) in want[name].items():
            got_iv, got_ft = got[name][key]
            assert got_iv.shape == want_iv.shape, (name, key)
            assert got_ft.shape == want_ft.shape, (name, key)
            assert got_ft.dtype == want_ft.dtype, (name, key)
            np.testing.assert_allclose(got_iv, want_iv, rtol=1e-6, atol=1e-12, err_msg=f"{name} {key}")
            if want_ft.dtype.kind == "f":
                # assert_allclose also requires NaN and +-inf at the same positions.
                np.testing.assert_allclose(got_ft, want_ft, rtol=1e-6, atol=1e-9, err_msg=f"{name} {key}")
            else:
                np.testing.assert_array_equal(got_ft, want_ft, err_msg=f"{name} {key}")


# --- random MOSEI-like data, written to .csd and read back -----------------------------------------------


def _words(rng: np.random.Generator, duration: float) -> tuple[np.ndarray, np.ndarray]:
    rows, t = [], rng.uniform(0.0, 0.5)
    while t < duration:
        kind = rng.random()
        if kind < 0.1:
            rows.append([t, t])  # a zero-length word: gets no key
        elif kind < 0.15:
            rows.append([t, t + rng.uniform(0.0, 0.8 * EPS)])  # shorter than the tolerance
        elif kind < 0.2 and rows:
            rows.append([rows[-1][0], rows[-1][0] + rng.uniform(0.05, 0.3)])  # same start as the previous
        else:
            length = rng.uniform(0.08, 0.6)
            rows.append([t, t + length])
            t += length
        t += rng.choice([0.0, 0.0, rng.uniform(0.02, 0.5)])  # pauses between some words
    intervals = np.array(rows)
    features = rng.normal(size=(len(rows), 6)).astype(np.float32)
    return intervals, features


def _frames(
    rng: np.random.Generator, duration: float, step: float, d: int, jitter: bool
) -> tuple[np.ndarray, np.ndarray]:
    starts = np.arange(0.0, duration, step)
    ends = starts + step
    if jitter:
        # Frames of varying length: they overlap their neighbours, and ends are not monotone.
        ends = starts + step * rng.uniform(0.2, 3.0, size=len(starts))
        empty = rng.random(len(starts)) < 0.03
        ends[empty] = starts[empty]
    keep = rng.random(len(starts)) > 0.1  # missing frames: gaps in the stream
    keep[rng.integers(0, len(starts)) : rng.integers(0, len(starts))] = False  # and one long gap
    intervals = np.stack([starts, ends], axis=1)[keep]
    features = rng.normal(size=(len(intervals), d)).astype(np.float32)
    return intervals, features


def _random_csd(tmp_path: Path, seed: int) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    rng = np.random.default_rng(seed)
    videos = ["vidD", "vidA", "vidC", "vidB"]  # not sorted: outputs follow the input's order
    seqs = {"words": {}, "audio": {}, "vision": {}, "labels": {}}
    for video in videos:
        duration = rng.uniform(4.0, 8.0)
        seqs["words"][video] = _words(rng, duration)
        iv, ft = _frames(rng, duration, 0.05, 4, jitter=False)
        ft[rng.random(ft.shape) < 0.01] = -np.inf
        if video == "vidB":
            # +inf and -inf in two frames inside one word: that word's mean is NaN.
            for w_start, w_end in seqs["words"][video][0]:
                inside = np.flatnonzero((iv[:, 0] >= w_start) & (iv[:, 1] <= w_end))
                if len(inside) >= 2:
                    ft[inside[0], 0], ft[inside[-1], 0] = np.inf, -np.inf
                    break
            # Entries keyed `video[i]`, in shuffled key order: grouped back and sorted by start.
            parts = np.array_split(np.arange(len(iv)), 3)
            for j in (2, 0, 1):
                seqs["audio"][f"{video}[{j}]"] = (iv[parts[j]], ft[parts[j]])
        else:
            seqs["audio"][video] = (iv, ft)
        if video != "vidC":  # vidC has no vision: it disappears from every output
            seqs["vision"][video] = _frames(rng, duration, 1 / 7, 3, jitter=True)
        n_seg = int(rng.integers(2, 5))
        seg_starts = rng.uniform(0.0, duration, size=n_seg)
        seg = np.stack([seg_starts, seg_starts + rng.uniform(0.0, 2.5, size=n_seg)], axis=1)
        seg[0, 1] = seg[0, 0]  # a zero-length segment
        seqs["labels"][video] = (seg, rng.normal(size=(n_seg, 7)).astype(np.float32))
    seqs["audio"]["vidE"] = _frames(rng, 2.0, 0.05, 4, jitter=False)  # only in one sequence: ignored
    back = {}
    for name, data in seqs.items():
        write_csd(tmp_path / f"{name}.csd", data, name, {"root name": name})
        back[name] = read_csd(tmp_path / f"{name}.csd")
    return back


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_matches_the_definition_on_random_data(tmp_path: Path, seed: int) -> None:
    seqs = _random_csd(tmp_path, seed)
    modalities = {k: seqs[k] for k in ("words", "audio", "vision")}
    for impute in (True, False):
        got = align(modalities, "words", collapse="mean", impute=impute)
        want = naive_align(modalities, "words", collapse="mean", impute=impute)
        assert_same(got, want)
        assert set(video.split("[")[0] for video in got["words"]) == {"vidA", "vidB", "vidD"}
    # The canonical two steps: words (imputed) to the label segments, rows kept, empty segments dropped.
    words = align(modalities, "words")
    got = align({**words, "labels": seqs["labels"]}, "labels", collapse=None, impute=False)
    want = naive_align({**words, "labels": seqs["labels"]}, "labels", collapse=None, impute=False)
    assert_same(got, want)
    assert got["labels"], "the random data should leave some segments"


def test_random_data_has_the_hard_cases(tmp_path: Path) -> None:
    # Guards the test above: the data does contain what it is meant to exercise.
    seqs = _random_csd(tmp_path, 0)
    words = align({k: seqs[k] for k in ("words", "audio", "vision")}, "words")
    audio = np.concatenate([ft for _, ft in words["audio"].values()])
    assert np.isneginf(audio).any() and np.isnan(audio).any()
    assert any(not ft.any() for _, ft in words["vision"].values())  # imputed windows
    ref_iv = seqs["words"]["vidA"][0]
    n_short = int((ref_iv[:, 1] - ref_iv[:, 0] <= EPS).sum())
    assert n_short > 0
    assert sum(k.startswith("vidA[") for k in words["words"]) == len(ref_iv) - n_short


# --- small cases computed by hand ------------------------------------------------------------------------


def _hand_case() -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    # Two words that touch at 1.0; audio frame a1 spans both, a3 starts exactly where w1 ends.
    words = (np.array([[0.0, 1.0], [1.0, 2.0]]), np.array([[1.0], [3.0]], dtype=np.float32))
    audio = (
        np.array([[0.0, 0.6], [0.6, 1.4], [1.4, 1.7], [2.0, 2.5], [2.5, 3.0]]),
        np.array([[1, 10], [2, 20], [4, -np.inf], [8, 80], [16, 160]], dtype=np.float32),
    )
    vision = (np.array([[0.1, 0.3], [0.5, 0.6]]), np.array([[5.0], [7.0]], dtype=np.float32))
    return {
        "words": {"a": words, "b": words},
        "audio": {"a": audio, "b": audio},
        "vision": {"a": vision, "b": vision},
    }


def _check(entry, intervals, features) -> None:
    np.testing.assert_allclose(entry[0], intervals, rtol=1e-12)
    np.testing.assert_array_equal(entry[1], np.array(features, dtype=entry[1].dtype))


def test_hand_mean_with_imputation() -> None:
    out = align(_hand_case(), "words")
    assert list(out) == ["words", "audio", "vision"]
    assert list(out["words"]) == ["a[0]", "a[1]", "b[0]", "b[1]"]
    assert list(out["audio"]) == ["a[0]", "a[1]", "b[0]", "b[1]"]
    # vision has nothing in [1, 2]: both imputed entries come after every other key.
    assert list(out["vision"]) == ["a[0]", "b[0]", "a[1]", "b[1]"]
    # A touching neighbour overlaps by 0 seconds: each word keeps only itself.
    _check(out["words"]["a[0]"], [[0.0, 1.0]], [[1.0]])
    _check(out["words"]["a[1]"], [[1.0, 2.0]], [[3.0]])
    # w0: a0 and a1 (clipped to [0.6, 1.0]); the spanning frame counts fully in both words.
    _check(out["audio"]["a[0]"], [[0.0, 1.0]], [[1.5, 15.0]])
    # w1: a1 and a2; a3 starts at 2.0 and is not kept; the span ends at 1.7, not at the word's 2.0.
    _check(out["audio"]["a[1]"], [[1.0, 1.7]], [[3.0, -np.inf]])
    _check(out["vision"]["a[0]"], [[0.1, 0.6]], [[6.0]])
    _check(out["vision"]["b[1]"], [[1.0, 2.0]], [[0.0]])
    assert out["audio"]["a[0]"][1].dtype == np.float32


def test_hand_without_imputation_drops_the_word_everywhere() -> None:
    out = align(_hand_case(), "words", impute=False)
    for name in ("words", "audio", "vision"):
        assert list(out[name]) == ["a[0]", "b[0]"]
    _check(out["audio"]["b[0]"], [[0.0, 1.0]], [[1.5, 15.0]])


def test_hand_words_to_label_segments() -> None:
    words = align(_hand_case(), "words")
    # Label rows out of order: sorted by start they are [0.5, 1.5], [1.2, 1.2], [1.6, 1.9], [5, 6].
    segments = np.array([[5.0, 6.0], [0.5, 1.5], [1.2, 1.2], [1.6, 1.9]])
    labels = {"a": (segments, np.arange(28.0).reshape(4, 7))}
    out = align({**words, "labels": labels}, "labels", collapse=None, impute=False)
    # a[1] is zero-length (no key); a[3] has no words (dropped everywhere); video b has no labels.
    for name in ("words", "audio", "vision", "labels"):
        assert list(out[name]) == ["a[0]", "a[2]"]
    _check(out["labels"]["a[0]"], [[0.5, 1.5]], [np.arange(7.0, 14.0)])
    _check(out["words"]["a[0]"], [[0.5, 1.0], [1.0, 1.5]], [[1.0], [3.0]])
    _check(out["audio"]["a[0]"], [[0.5, 1.0], [1.0, 1.5]], [[1.5, 15.0], [3.0, -np.inf]])
    # vision's a[1] was imputed over the whole word [1, 2]: it is a row like any other now.
    _check(out["vision"]["a[0]"], [[0.5, 0.6], [1.0, 1.5]], [[6.0], [0.0]])
    _check(out["words"]["a[2]"], [[1.6, 1.9]], [[3.0]])
    _check(out["audio"]["a[2]"], [[1.6, 1.7]], [[3.0, -np.inf]])
    _check(out["vision"]["a[2]"], [[1.6, 1.9]], [[0.0]])


def test_hand_overlap_tolerance_and_inf_mix() -> None:
    words = {"v": (np.array([[1.0, 2.0]]), np.zeros((1, 1)))}
    frames = {
        "v": (
            # overlaps by 0.5e-5 (not kept), by 2e-5 (kept), fully inside (kept), overlaps the end by 3e-5
            np.array([[0.0, 1.0 + 0.5e-5], [0.5, 1.0 + 2e-5], [1.2, 1.3], [2.0 - 3e-5, 3.0]]),
            np.array([[100.0, 1.0], [2.0, np.inf], [4.0, -np.inf], [6.0, 1.0]]),
        )
    }
    out = align({"words": words, "frames": frames}, "words")
    _check(out["frames"]["v[0]"], [[1.0, 2.0]], [[4.0, np.nan]])


def test_integer_features_are_averaged_as_float64() -> None:
    words = {"v": (np.array([[0.0, 1.0], [2.0, 3.0]]), np.zeros((2, 1), dtype=np.float32))}
    counts = {"v": (np.array([[0.0, 0.5], [0.5, 1.0]]), np.array([[1], [2]], dtype=np.int64))}
    out = align({"words": words, "counts": counts}, "words")
    _check(out["counts"]["v[0]"], [[0.0, 1.0]], [[1.5]])
    assert out["counts"]["v[0]"][1].dtype == np.float64
    assert out["counts"]["v[1]"][1].dtype == np.float64


def test_word_bytes_are_kept_with_collapse_none_and_refused_by_mean() -> None:
    words = {"v": (np.array([[0.0, 0.4], [0.4, 1.0]]), np.array([[b"sp"], [b"hi"]]))}
    labels = {"v": (np.array([[0.2, 0.8]]), np.ones((1, 7)))}
    out = align({"words": words, "labels": labels}, "labels", collapse=None, impute=False)
    _check(out["words"]["v[0]"], [[0.2, 0.4], [0.4, 0.8]], [[b"sp"], [b"hi"]])
    with pytest.raises(DataError, match="'words'.*numeric"):
        align({"words": words, "labels": labels}, "labels")


def test_grouping_keeps_first_appearance_order_and_ties_stable() -> None:
    # Entries keyed `video[i]`, videos interleaved and not in name order; two rows start at 1.0.
    ref = {
        "zeta[1]": (np.array([[1.0, 2.0]]), np.array([[1.0]])),
        "alpha[0]": (np.array([[0.0, 1.0]]), np.array([[2.0]])),
        "zeta[0]": (np.array([[0.0, 1.0]]), np.array([[3.0]])),
    }
    frames = {
        "alpha": (np.array([[0.0, 2.0]]), np.array([[10.0]])),
        "zeta[0]": (np.array([[1.0, 1.5], [0.0, 1.0]]), np.array([[20.0], [30.0]])),
        "zeta[1]": (np.array([[1.0, 1.2]]), np.array([[40.0]])),
    }
    out = align({"ref": ref, "frames": frames}, "ref", collapse=None, impute=False)
    assert list(out["ref"]) == ["zeta[0]", "zeta[1]", "alpha[0]"]
    # zeta's reference rows in key order are [1, 2], [0, 1]; sorted by start: [0, 1] is row 0.
    _check(out["ref"]["zeta[0]"], [[0.0, 1.0]], [[3.0]])
    _check(out["ref"]["zeta[1]"], [[1.0, 2.0]], [[1.0]])
    # The two frames starting at 1.0 keep their input order (zeta[0]'s row, then zeta[1]'s).
    _check(out["frames"]["zeta[1]"], [[1.0, 1.5], [1.0, 1.2]], [[20.0], [40.0]])
    _check(out["frames"]["zeta[0]"], [[0.0, 1.0]], [[30.0]])
    _check(out["frames"]["alpha[0]"], [[0.0, 1.0]], [[10.0]])


def test_bad_arguments() -> None:
    seqs = _hand_case()
    with pytest.raises(DataError, match="'labels'"):
        align(seqs, "labels")
    bad = {**seqs, "audio": {"a": (np.zeros((3, 3)), np.zeros((3, 2)))}}
    with pytest.raises(DataError, match="'audio' entry 'a'.*\\(n, 2\\)"):
        align(bad, "words")
    bad = {**seqs, "audio": {"a": (np.zeros((3, 2)), np.zeros((4, 2)))}}
    with pytest.raises(DataError, match="'audio' entry 'a'"):
        align(bad, "words")
    with pytest.raises(ValueError, match="collapse"):
        align(seqs, "words", collapse="median")


def test_outputs_are_read_only_mappings_over_flat_arrays() -> None:
    out = align(_hand_case(), "words")
    vision = out["vision"]
    assert len(vision) == 4 and "a[0]" in vision and "c[0]" not in vision
    assert dict(vision).keys() == {"a[0]", "b[0]", "a[1]", "b[1]"}
    with pytest.raises(KeyError):
        vision["a[7]"]
    # every entry is a view of the flat arrays, in key order
    rows = np.concatenate([ft for _, ft in vision.values()])
    np.testing.assert_array_equal(rows, vision.features)
    assert "4 entries of 2 videos" in repr(vision)
    with pytest.raises(DataError, match="'audio': videos differ in feature width"):
        bad = {
            **_hand_case(),
            "audio": {"a": _hand_case()["audio"]["a"], "b": (np.zeros((1, 2)), np.zeros((1, 3)))},
        }
        align(bad, "words")


# --- routes that change the work, never the result ------------------------------------------------------


@pytest.mark.parametrize("batch_rows", [1, 7, 600, 1 << 17])  # one video a batch ... all in one
@pytest.mark.parametrize("kernel", ["scipy's private kernel", "the public sparse product"])
def test_batches_of_any_size_and_either_sparse_route_give_the_definition(
    tmp_path: Path, monkeypatch, batch_rows: int, kernel: str
) -> None:
    """Videos are aligned in batches of about BATCH_ROWS rows (one video alone, a few, all four here) and
    summed by scipy's CSR kernel, or its public product where the kernel is missing: the same result."""
    import mdkat.data.align as module

    monkeypatch.setattr(module, "BATCH_ROWS", batch_rows)
    if kernel != "scipy's private kernel":
        monkeypatch.setattr(module, "_CSR_MATVECS", None)
    for seed in (0, 3):
        folder = tmp_path / str(seed)
        folder.mkdir()
        seqs = _random_csd(folder, seed)
        modalities = {k: seqs[k] for k in ("words", "audio", "vision")}
        # rows out of time order inside every video given as one entry: they are sorted by an index
        rng = np.random.default_rng(seed)
        modalities["vision"] = {k: _shuffled(rng, iv, ft) for k, (iv, ft) in modalities["vision"].items()}
        for impute in (True, False):
            want = naive_align(modalities, "words", collapse="mean", impute=impute)
            assert_same(align(modalities, "words", collapse="mean", impute=impute), want)
        words = align(modalities, "words")  # with collapse=None: rows are copied, batch after batch
        pair = {**words, "labels": seqs["labels"]}
        assert_same(
            align(pair, "labels", collapse=None, impute=False),
            naive_align(pair, "labels", collapse=None, impute=False),
        )


def _shuffled(rng, intervals, features):
    order = rng.permutation(len(intervals))
    return intervals[order], features[order]


def test_a_video_without_windows_after_many_windows_is_left_out() -> None:
    """Video b's words are all shorter than the tolerance: it has no window, whatever comes before it
    (here 300 windows: counts beyond the integers Python keeps one object for)."""
    rng = np.random.default_rng(5)
    starts = np.arange(300) * 0.1
    words = {"a": (np.stack([starts, starts + 0.1], 1), rng.normal(size=(300, 2)))}
    words["b"] = (np.array([[0.0, 0.0], [1.0, 1.0 + EPS / 2]]), rng.normal(size=(2, 2)))
    # two rows over every window: means are taken (one row a window would be copied as it is)
    audio = {v: (np.array([[0.0, 40.0], [0.0, 40.0]]), rng.normal(size=(2, 3))) for v in ("a", "b")}
    got = align({"words": words, "audio": audio}, "words")
    assert_same(got, naive_align({"words": words, "audio": audio}, "words"))
    assert {k.split("[")[0] for k in got["audio"]} == {"a"} and len(got["audio"]) == 300


def test_rows_out_of_order_in_a_later_video_that_runs_past_the_last_word() -> None:
    """The second video's frames, given shuffled, go on after its last word: the rows read for its words
    are a slice of its sorted order that ends before the video does."""
    rng = np.random.default_rng(6)
    words = {v: (np.array([[0.0, 1.0], [1.0, 2.0], [2.0, 3.0]]), rng.normal(size=(3, 2))) for v in "ab"}
    starts = np.arange(0.0, 6.0, 0.5)
    frames = {v: _shuffled(rng, np.stack([starts, starts + 0.5], 1), rng.normal(size=(12, 2))) for v in "ab"}
    sequences = {"words": words, "audio": frames}
    assert_same(align(sequences, "words"), naive_align(sequences, "words"))


def test_a_sequence_without_entries_leaves_no_video_in_any_output() -> None:
    out = align({**_hand_case(), "audio": {}}, "words")
    assert set(out) == set(_hand_case()) and all(len(s) == 0 for s in out.values())


def _many_entries(intervals_a, features_a, intervals_b, features_b):
    """A video given as two entries `v[0]`, `v[1]` (the grouped path that concatenates them)."""
    return {**_hand_case(), "audio": {"a[0]": (intervals_a, features_a), "a[1]": (intervals_b, features_b)}}


@pytest.mark.parametrize(
    ("sequences", "message"),
    [
        ({**_hand_case(), "audio": {"a": (np.zeros((3, 2)), np.zeros((3, 2, 1)))}}, r"entry 'a'.*\(3, d\)"),
        (
            _many_entries(np.zeros((2, 3)), np.zeros((2, 2)), np.zeros((1, 3)), np.zeros((1, 2))),
            r"entry 'a\[0\]': intervals must have shape \(n, 2\), got \(2, 3\)",
        ),
        (
            _many_entries(np.zeros((2, 2)), np.zeros(2), np.zeros((1, 2)), np.zeros(1)),
            r"entry 'a\[0\]': features must have shape \(2, d\)",
        ),
        (  # 3 + 2 rows of intervals, 2 + 3 of features: the totals agree, the entries do not
            _many_entries(np.zeros((3, 2)), np.zeros((2, 4)), np.zeros((2, 2)), np.zeros((3, 4))),
            r"entry 'a\[0\]': features must have shape \(3, d\) to match the intervals, got \(2, 4\)",
        ),
    ],
    ids=["rank-3 features", "3-column intervals", "1-d features", "rows per entry disagree"],
)
def test_entries_of_the_wrong_shape_are_named_on_either_path(sequences, message) -> None:
    with pytest.raises(DataError, match=f"sequence 'audio' {message}"):
        align(sequences, "words")
