"""Word alignment of computational sequences, with the semantics of the CMU-MultimodalSDK recipe.

The SDK aligns a dataset in four steps: `align(words, collapse_functions=[mean])`, `impute(words)`,
`align(labels)` and `hard_unify()`. `align` here reproduces that recipe as one function: for every
reference interval (a word, or a labelled segment) it keeps the rows of each sequence that overlap the
interval by more than `EPSILON` seconds, clips them to it, and either averages them (`collapse="mean"`)
or keeps them as they are (`collapse=None`). What the SDK then does to windows without rows is the
`impute` switch: zeros over the reference interval (SDK `impute`), or the window is dropped from every
sequence (SDK `hard_unify`).

The SDK does this with a Python loop over reference intervals and a scan over all rows for each; here
each video and sequence is one sort, two `searchsorted` calls and a few segment reductions over the
flat list of (window, row) candidate pairs, with the same numbers (the means are float64 sums of every
kept row, so a `-inf` stays in its own window, as in the SDK, instead of spreading through a running sum).

Input and output are {sequence name: {entry key: (intervals (n, 2), features (n, d))}}. Entries keyed
`video[i]` (the output of an earlier alignment) are grouped by the part before the first `[`, as the
SDK does, and their rows concatenated; output entries are keyed `video[i]`, `i` indexing the video's
reference rows sorted by start time. Reference rows not longer than `EPSILON` get no entry. Each output
sequence is a `Segments`: a read-only mapping stored as flat arrays, which the next `align` reads
without touching its entries one by one (a MOSEI word step has half a million of them).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Literal

import numpy as np

from mdkat.data.prepared import DataError

EPSILON = 1e-5  # seconds; the SDK's overlap tolerance

Entries = dict[str, tuple[np.ndarray, np.ndarray]]


def video_of(key: str) -> str:
    """The video id of an entry key: `video[i]` and `video` both give `video` (the SDK's rule)."""
    return key.split("[", 1)[0]


def _check_entry(name: str, key: str, intervals: np.ndarray, features: np.ndarray) -> None:
    if intervals.ndim != 2 or intervals.shape[1] != 2:
        raise DataError(
            f"sequence '{name}' entry '{key}': intervals must have shape (n, 2), got {intervals.shape}"
        )
    if features.ndim != 2 or features.shape[0] != intervals.shape[0]:
        raise DataError(
            f"sequence '{name}' entry '{key}': features must have shape ({intervals.shape[0]}, d) to match "
            f"the intervals, got {features.shape}"
        )


def _check_all(name: str, entries: Mapping[str, tuple], keys: list[str]) -> None:
    # Only reached when the fast path failed: find the entry to name in the message.
    for key in keys:
        _check_entry(name, key, np.asarray(entries[key][0], np.float64), np.asarray(entries[key][1]))
    raise DataError(f"sequence '{name}': entries have different feature widths or dtypes")


def _sorted_by_start(intervals: np.ndarray, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    starts = intervals[:, 0]
    if len(starts) > 1 and (starts[1:] < starts[:-1]).any():
        order = np.argsort(starts, kind="stable")
        return intervals[order], features[order]
    return intervals, features


def _group(name: str, entries: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> Entries:
    """Group entries by video: rows concatenated in key order, then stably sorted by start time."""
    keys = list(entries)
    of_key = [key.split("[", 1)[0] for key in keys]  # video_of, inlined: this runs once per word
    videos = {video: g for g, video in enumerate(dict.fromkeys(of_key))}  # in order of first appearance
    if len(videos) == len(keys):
        # One entry per video (a file as read): no concatenation, no copy of the features.
        grouped: Entries = {}
        for video, key in zip(videos, keys, strict=True):
            iv, ft = np.asarray(entries[key][0], dtype=np.float64), np.asarray(entries[key][1])
            _check_entry(name, key, iv, ft)
            grouped[video] = _sorted_by_start(iv, ft)
        return grouped
    # Many small entries (the output of an earlier alignment): one concatenation and one stable sort by
    # (video, start) for the whole sequence instead of Python work per entry.
    pairs = list(entries.values())
    ivs, fts = [p[0] for p in pairs], [p[1] for p in pairs]
    try:
        iv = np.asarray(np.concatenate(ivs), dtype=np.float64)  # (n, 2)
        ft = np.concatenate(fts)  # (n, d)
        n_iv = np.fromiter(map(len, ivs), np.int64, len(ivs))  # rows per entry
        ok = iv.ndim == 2 and iv.shape[1] == 2 and ft.ndim == 2
        ok = ok and np.array_equal(n_iv, np.fromiter(map(len, fts), np.int64, len(fts)))
    except (ValueError, TypeError):
        ok = False
    if not ok:
        _check_all(name, entries, keys)
    group = np.fromiter(map(videos.__getitem__, of_key), np.int64, len(of_key))  # (entries,)
    row_group = np.repeat(group, n_iv)  # (n,)
    order = np.lexsort((iv[:, 0], row_group))  # stable: ties keep key order, then row order
    iv, ft = iv[order], ft[order]
    bounds = np.concatenate(([0], np.cumsum(np.bincount(row_group, minlength=len(videos))))).tolist()
    return {video: (iv[a:b], ft[a:b]) for video, a, b in zip(videos, bounds[:-1], bounds[1:], strict=True)}


def _kept_pairs(
    windows: np.ndarray, intervals: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(window, row) pairs whose rows overlap their window by more than EPSILON, with the clipped pieces.

    `intervals` must be sorted by start. Returns window indices (non-decreasing), row indices, clipped
    starts and clipped ends, one entry per kept pair.
    """
    ws, we = windows[:, 0], windows[:, 1]  # (m,)
    starts, ends = intervals[:, 0], intervals[:, 1]  # (n,)
    # Rows from `hi` on start too late. Ends are not monotone (rows overlap), so the lower bound uses the
    # running maximum: every row before `lo` ends at or before the window's start.
    hi = np.searchsorted(starts, we + EPSILON, side="left")  # (m,)
    reach = np.maximum.accumulate(ends) if len(ends) else ends  # (n,)
    lo = np.searchsorted(reach, ws - EPSILON, side="right")  # (m,)
    counts = np.maximum(hi - lo, 0)  # (m,)
    total = int(counts.sum())
    win = np.repeat(np.arange(len(windows)), counts)  # (total,)
    first = np.cumsum(counts) - counts  # (m,) offset of each window's candidates
    row = np.arange(total) + np.repeat(lo - first, counts)  # (total,)
    c_s = np.maximum(starts[row], ws[win])  # (total,)
    c_e = np.minimum(ends[row], we[win])  # (total,)
    # The piece test implies the two overlap tests exactly, also in floating point: a positive difference
    # means c_e > c_s, so start < ref_end <= ref_end + EPSILON and end > ref_start >= ref_start - EPSILON.
    keep = c_e - c_s > EPSILON  # (total,)
    return win[keep], row[keep], c_s[keep], c_e[keep]


def _mean(features: np.ndarray, row: np.ndarray, seg: np.ndarray, n_rows: np.ndarray) -> np.ndarray:
    """Unweighted mean of each segment's rows, summed in float64, returned in the floating input dtype."""
    out_dtype = features.dtype if features.dtype.kind == "f" else np.dtype(np.float64)
    # A window with one row is that row (the float64 round trip is exact); reduceat has a per-segment,
    # per-column cost, which for word vectors (one row per word, 300 columns) would dominate.
    fewest, most = int(n_rows.min()), int(n_rows.max())
    if most == 1:
        return features[row].astype(out_dtype, copy=False)  # (k, d)
    means = np.empty((len(seg), features.shape[1]), dtype=out_dtype)  # (k, d)
    multi = None
    if fewest == 1:
        single = n_rows == 1  # (k,)
        means[single] = features[row[seg[single]]]
        multi = ~single
        row = row[np.repeat(multi, n_rows)]
        n_rows = n_rows[multi]
        seg = np.cumsum(n_rows) - n_rows
    # +inf and -inf in one window give NaN, as in the SDK; sanitizing is a later step.
    with np.errstate(invalid="ignore"):
        sums = np.add.reduceat(features[row].astype(np.float64, copy=False), seg, axis=0)  # (k_multi, d)
    sums /= n_rows[:, None]
    if multi is None:
        means[...] = sums
    else:
        means[multi] = sums
    return means


def _align_one(
    windows: np.ndarray, intervals: np.ndarray, features: np.ndarray, collapse: str | None
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]:
    """One sequence of one video against the windows.

    Returns `has` (m,) (window has kept rows), `bounds` (k + 1,) (where the rows of the k non-empty
    windows start in the outputs, then their count; None when collapsed: one row per non-empty window),
    output intervals and output features.
    """
    win, row, c_s, c_e = _kept_pairs(windows, intervals)
    has = np.zeros(len(windows), dtype=bool)
    n = len(win)
    if n == 0:
        dtype = np.float64 if collapse == "mean" and features.dtype.kind != "f" else features.dtype
        return has, None, np.empty((0, 2)), np.empty((0, features.shape[1]), dtype=dtype)
    # `win` is non-decreasing, so each non-empty window is one segment; reduceat only sees non-empty ones.
    bounds = np.empty(n + 1, dtype=bool)
    bounds[0] = bounds[n] = True
    np.not_equal(win[1:], win[:-1], out=bounds[1:n])
    bounds = np.flatnonzero(bounds)  # (k + 1,) segment starts, then n
    seg = bounds[:-1]  # (k,)
    has[win[seg]] = True
    if collapse is None:
        iv = np.empty((n, 2))
        iv[:, 0], iv[:, 1] = c_s, c_e
        return has, bounds, iv, features[row]
    iv = np.empty((len(seg), 2))
    iv[:, 0] = np.minimum.reduceat(c_s, seg)
    iv[:, 1] = np.maximum.reduceat(c_e, seg)
    return has, None, iv, _mean(features, row, seg, bounds[1:] - seg)


class Segments(Mapping[str, tuple[np.ndarray, np.ndarray]]):
    """One sequence's aligned entries, stored flat: a read-only mapping `video[i]` -> (intervals, features).

    Entry j holds rows `bounds[j]:bounds[j + 1]` of `intervals` (R, 2) and `features` (R, d). Keys are
    made only when asked for, so the tens of thousands of word entries between the two alignment steps
    cost no Python work per entry; `align` reads a `Segments` input straight from its arrays.
    """

    def __init__(
        self,
        videos: list[str],
        key_video: np.ndarray,
        key_index: np.ndarray,
        bounds: np.ndarray,
        intervals: np.ndarray,
        features: np.ndarray,
    ) -> None:
        self.videos = videos  # video ids, in order of first appearance
        self.key_video = key_video  # (K,) position in `videos` of each entry's video
        self.key_index = key_index  # (K,) the i of `video[i]`
        self.bounds = bounds  # (K + 1,) row offsets
        self.intervals = intervals  # (R, 2)
        self.features = features  # (R, d)
        self._keys: list[str] | None = None
        self._position: dict[str, int] | None = None

    def keys_list(self) -> list[str]:
        """The entry keys, in order."""
        if self._keys is None:
            names = self.videos
            self._keys = [
                f"{names[v]}[{i}]"
                for v, i in zip(self.key_video.tolist(), self.key_index.tolist(), strict=True)
            ]
        return self._keys

    def __getitem__(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        if self._position is None:
            self._position = {k: j for j, k in enumerate(self.keys_list())}
        j = self._position[key]
        a, b = int(self.bounds[j]), int(self.bounds[j + 1])
        return self.intervals[a:b], self.features[a:b]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys_list())

    def __len__(self) -> int:
        return len(self.key_video)

    def __repr__(self) -> str:
        return (
            f"Segments({len(self)} entries of {len(self.videos)} videos, features "
            f"{self.features.shape} {self.features.dtype})"
        )


def _grouped_segments(segments: Segments) -> Entries:
    """A `Segments` input grouped by video and sorted by start, from its arrays alone."""
    counts = np.diff(segments.bounds)  # (K,)
    row_video = np.repeat(segments.key_video, counts)  # (R,)
    order = np.lexsort((segments.intervals[:, 0], row_video))  # stable: ties keep entry order
    iv, ft = segments.intervals[order], segments.features[order]
    edges = np.concatenate(([0], np.cumsum(np.bincount(row_video, minlength=len(segments.videos))))).tolist()
    return {
        video: (iv[a:b], ft[a:b])
        for video, a, b in zip(segments.videos, edges[:-1], edges[1:], strict=True)
        if b > a
    }


def _flatten(chunks: list[tuple], width: int, dtype: np.dtype, videos: list[str]) -> Segments:
    """One `Segments` from chunks (video position, key indices, rows per key ...)."""
    if not chunks:
        return Segments(
            videos,
            np.zeros(0, np.int64),
            np.zeros(0, np.int64),
            np.zeros(1, np.int64),
            np.zeros((0, 2)),
            np.zeros((0, width), dtype),
        )
    key_video = np.concatenate([np.full(len(c[1]), c[0], dtype=np.int64) for c in chunks])
    counts = np.concatenate([c[2] for c in chunks])
    bounds = np.concatenate(([0], np.cumsum(counts)))
    intervals = np.concatenate([c[3] for c in chunks])
    features = np.concatenate([c[4] for c in chunks]).astype(dtype, copy=False)
    return Segments(videos, key_video, np.concatenate([c[1] for c in chunks]), bounds, intervals, features)


def align(
    sequences: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]],
    reference: str,
    collapse: Literal["mean"] | None = "mean",
    impute: bool = True,
) -> dict[str, Segments]:
    """Align every sequence to the intervals of `reference` (SDK `align` + `impute` or `hard_unify`)."""
    if reference not in sequences:
        raise DataError(f"reference sequence '{reference}' is not among the sequences {list(sequences)}")
    if collapse not in ("mean", None):
        raise ValueError(f"collapse must be 'mean' or None, got {collapse!r}")
    grouped = {
        name: _grouped_segments(e) if isinstance(e, Segments) else _group(name, e)
        for name, e in sequences.items()
    }
    width, dtype = {}, {}
    for name, videos in grouped.items():
        features = [ft for _, ft in videos.values()]
        if collapse == "mean":
            kinds = {ft.dtype for ft in features if ft.dtype.kind not in "fiub"}
            if kinds:
                raise DataError(
                    f"sequence '{name}': collapse='mean' needs numeric features, got {kinds.pop()}; "
                    "align it with collapse=None, or leave it out"
                )
        widths = sorted({ft.shape[1] for ft in features})
        if len(widths) > 1:
            raise DataError(f"sequence '{name}': videos differ in feature width {widths}")
        first = features[0] if features else np.zeros((0, 0), np.float64)
        width[name] = first.shape[1]
        mean_float = collapse == "mean" and first.dtype.kind != "f"
        dtype[name] = np.dtype(np.float64) if mean_float else first.dtype

    videos = [v for v in grouped[reference] if all(v in g for g in grouped.values())]
    kept: dict[str, list[tuple]] = {name: [] for name in sequences}
    imputed: dict[str, list[tuple]] = {name: [] for name in sequences}
    for position, video in enumerate(videos):
        ref_iv = grouped[reference][video][0]
        index = np.flatnonzero(ref_iv[:, 1] - ref_iv[:, 0] > EPSILON)  # (m,) reference rows that get a key
        if len(index) == 0:
            continue
        windows = ref_iv[index]  # (m, 2)
        results = {name: _align_one(windows, *grouped[name][video], collapse) for name in sequences}
        wanted = np.ones(len(index), dtype=bool)
        if not impute:
            # A window that lacks rows in any sequence is dropped from all of them (SDK hard_unify).
            for has, *_ in results.values():
                wanted &= has
        for name, (has, bounds, iv, ft) in results.items():
            chosen = has & wanted  # (m,) windows that get rows of their own
            if bounds is None:  # one row per non-empty window
                rows = chosen[has]
                counts = np.ones(int(rows.sum()), dtype=np.int64)
            else:
                rows = np.repeat(chosen[has], np.diff(bounds))
                counts = np.diff(bounds)[chosen[has]]
            if not rows.all():
                iv, ft = iv[rows], ft[rows]
            kept[name].append((position, index[chosen], counts, iv, ft))
            if impute and not has.all():
                missing = ~has
                zeros = np.zeros((int(missing.sum()), width[name]), dtype=dtype[name])
                imputed[name].append(
                    (position, index[missing], np.ones(len(zeros), dtype=np.int64), windows[missing], zeros)
                )
    # Imputed entries come after all others, as the SDK's impute adds them.
    return {
        name: _flatten(kept[name] + imputed[name], width[name], dtype[name], videos) for name in sequences
    }
