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
reference rows sorted by start time. Reference rows not longer than `EPSILON` get no entry.
"""

from __future__ import annotations

from collections.abc import Mapping
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


def align(
    sequences: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]],
    reference: str,
    collapse: Literal["mean"] | None = "mean",
    impute: bool = True,
) -> dict[str, Entries]:
    """Align every sequence to the intervals of `reference` (SDK `align` + `impute` or `hard_unify`)."""
    if reference not in sequences:
        raise DataError(f"reference sequence '{reference}' is not among the sequences {list(sequences)}")
    if collapse not in ("mean", None):
        raise ValueError(f"collapse must be 'mean' or None, got {collapse!r}")
    grouped = {name: _group(name, entries) for name, entries in sequences.items()}
    if collapse == "mean":
        for name, videos in grouped.items():
            kinds = {ft.dtype for _, ft in videos.values() if ft.dtype.kind not in "fiub"}
            if kinds:
                raise DataError(
                    f"sequence '{name}': collapse='mean' needs numeric features, got {kinds.pop()}; "
                    "align it with collapse=None, or leave it out"
                )
    videos = [v for v in grouped[reference] if all(v in g for g in grouped.values())]
    out: dict[str, Entries] = {name: {} for name in sequences}
    imputed: dict[str, Entries] = {name: {} for name in sequences}
    for video in videos:
        ref_iv = grouped[reference][video][0]
        index = np.flatnonzero(ref_iv[:, 1] - ref_iv[:, 0] > EPSILON)  # (m,) reference rows that get a key
        if len(index) == 0:
            continue
        windows = ref_iv[index]  # (m, 2)
        keys = [f"{video}[{i}]" for i in index.tolist()]
        results = {name: _align_one(windows, *grouped[name][video], collapse) for name in sequences}
        wanted = np.ones(len(index), dtype=bool)
        if not impute:
            # A window that lacks rows in any sequence is dropped from all of them (SDK hard_unify).
            for has, *_ in results.values():
                wanted &= has
        for name, (has, bounds, iv, ft) in results.items():
            chosen = np.flatnonzero(has & wanted)  # windows that get an entry
            position = (np.cumsum(has) - 1)[chosen]  # where their rows sit in the outputs
            chosen_keys = [keys[j] for j in chosen.tolist()]
            if bounds is None:
                if len(position) != len(iv):
                    iv, ft = iv[position], ft[position]
                # Iterating a (k, 1, d) array yields the (1, d) entries as views, without Python slicing.
                pairs = zip(iv[:, None], ft[:, None], strict=True)
            else:
                first, last = bounds[position].tolist(), bounds[position + 1].tolist()
                pairs = ((iv[a:b], ft[a:b]) for a, b in zip(first, last, strict=True))
            out[name].update(zip(chosen_keys, pairs, strict=True))
            if impute:
                missing = np.flatnonzero(~has)
                if len(missing):
                    zeros = np.zeros((1, ft.shape[1]), dtype=ft.dtype)
                    for j in missing.tolist():
                        imputed[name][keys[j]] = (windows[j : j + 1].copy(), zeros.copy())
    for name in sequences:
        out[name].update(imputed[name])
    return out
