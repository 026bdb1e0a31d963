"""Word alignment of computational sequences, with the semantics of the CMU-MultimodalSDK recipe.

The SDK aligns a dataset in four steps: `align(words, collapse_functions=[mean])`, `impute(words)`,
`align(labels)` and `hard_unify()`. `align` here reproduces that recipe as one function: for every
reference interval (a word, or a labelled segment) it keeps the rows of each sequence that overlap the
interval by more than `EPSILON` seconds, clips them to it, and either averages them (`collapse="mean"`)
or keeps them as they are (`collapse=None`). What the SDK then does to windows without rows is the
`impute` switch: zeros over the reference interval (SDK `impute`), or the window is dropped from every
sequence (SDK `hard_unify`).

The SDK does this with a Python loop over reference intervals and a scan over all rows for each; here
videos are aligned in batches, and each batch and sequence is two `searchsorted` calls a video and a few
vectorised passes over the flat list of (window, row) candidate pairs, with the same numbers: a mean is
the float64 sum of every kept row divided by their count, a segment sum (computed as a sparse 0/1 matrix
times the rows), so a `-inf` stays in its own window, as in the SDK, instead of spreading through a
running sum.

Input and output are {sequence name: {entry key: (intervals (n, 2), features (n, d))}}. Entries keyed
`video[i]` (the output of an earlier alignment) are grouped by the part before the first `[`, as the
SDK does, and their rows concatenated; output entries are keyed `video[i]`, `i` indexing the video's
reference rows sorted by start time. Reference rows not longer than `EPSILON` get no entry. Each output
sequence is a `Segments`: a read-only mapping stored as flat arrays, which the next `align` reads
without touching its entries one by one (a MOSEI word step has half a million of them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Literal, NamedTuple

import numpy as np
from scipy.sparse import csr_array

from mdkat.data.prepared import DataError

EPSILON = 1e-5  # seconds; the SDK's overlap tolerance
# Rows (of all sequences) of the videos aligned together: the batch's temporary arrays stay in cache and
# are reused by the allocator, where one batch for all videos would be fresh memory of hundreds of MiB.
BATCH_ROWS = 1 << 17

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


class _Sequence(NamedTuple):
    """One input sequence, grouped by video: rows sorted by start (stably) within each video.

    Video j holds rows `offsets[j]:offsets[j + 1]` of `starts` and `ends`. Features are not moved: they
    are one array per video (`features[j]`, whose row `order[j][i]` is sorted row i, or row i where
    `order[j]` is None) or one array for all (`features`, row `order[r]` for sorted row r, or r).
    """

    position: dict[str, int]  # video -> j
    offsets: list[int]  # (V + 1,)
    starts: np.ndarray  # (R,)
    ends: np.ndarray  # (R,)
    reach: np.ndarray  # (R,) running maximum of `ends` within each video
    features: list[np.ndarray] | np.ndarray
    order: list[np.ndarray | None] | np.ndarray | None

    def block(self, j: int, a: int, b: int) -> np.ndarray:
        """Features of sorted rows a:b (indices into all rows) of video j."""
        if isinstance(self.features, list):
            order, base = self.order[j], self.offsets[j]
            rows = slice(a - base, b - base) if order is None else order[a - base : b - base]
            return self.features[j][rows]
        return self.features[a:b] if self.order is None else self.features[self.order[a:b]]


def _breaks(down: np.ndarray, offsets: list[int]) -> list[int]:
    """The videos with a step down (`down` (R - 1,): row i + 1 is below row i) inside them."""
    step = np.flatnonzero(down) + 1
    if len(step) == 0:
        return []
    video = np.searchsorted(offsets, step, side="right") - 1
    return np.unique(video[step != np.asarray(offsets)[video]]).tolist()


def _running_max(ends: np.ndarray, offsets: list[int]) -> np.ndarray:
    # Ends are usually sorted (frames, words), and then are their own running maximum. A NaN counts as a
    # step down, so that its video gets the running maximum (NaN from there on), as without the shortcut.
    videos = _breaks(~(ends[1:] >= ends[:-1]), offsets)
    if not videos:
        return ends
    reach = ends.copy()
    for j in videos:
        np.maximum.accumulate(reach[offsets[j] : offsets[j + 1]], out=reach[offsets[j] : offsets[j + 1]])
    return reach


def _flat_sequence(
    intervals: np.ndarray, features: np.ndarray, row_video: np.ndarray, videos: list[str]
) -> _Sequence:
    """Rows of many videos in one array each (`row_video` (R,): their positions in `videos`)."""
    starts = intervals[:, 0]
    # Rows already in (video, start) order (the words of a word step) are neither sorted nor moved.
    same = row_video[1:] == row_video[:-1]  # (R - 1,)
    ordered = not ((row_video[1:] < row_video[:-1]) | (same & (starts[1:] < starts[:-1]))).any()
    order = None if ordered else np.lexsort((starts, row_video))  # stable: ties keep their order
    if order is not None:
        intervals = intervals[order]
    n_rows = np.bincount(row_video, minlength=len(videos))
    offsets = np.concatenate(([0], np.cumsum(n_rows))).tolist()
    starts, ends = np.ascontiguousarray(intervals[:, 0]), np.ascontiguousarray(intervals[:, 1])
    position = {video: j for j, video in enumerate(videos) if n_rows[j]}
    return _Sequence(position, offsets, starts, ends, _running_max(ends, offsets), features, order)


def _sequence(name: str, entries: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> _Sequence:
    """Group entries by video: rows concatenated in key order, then stably sorted by start time."""
    if isinstance(entries, Segments):
        row_video = np.repeat(entries.key_video, np.diff(entries.bounds))  # (R,)
        return _flat_sequence(entries.intervals, entries.features, row_video, entries.videos)
    keys = list(entries)
    of_key = [key.split("[", 1)[0] for key in keys]  # video_of, inlined: this runs once per word
    videos = {video: g for g, video in enumerate(dict.fromkeys(of_key))}  # in order of first appearance
    if len(videos) < len(keys):
        # Many small entries (the output of an earlier alignment): one concatenation and one stable sort
        # by (video, start) for the whole sequence instead of Python work per entry.
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
        return _flat_sequence(iv, ft, np.repeat(group, n_iv), list(videos))
    # One entry per video (a file as read): the features stay where they are.
    ivs, fts = [], []
    for key in keys:
        iv, ft = np.asarray(entries[key][0], dtype=np.float64), np.asarray(entries[key][1])
        _check_entry(name, key, iv, ft)
        ivs.append(iv)
        fts.append(ft)
    offsets = np.cumsum([0] + [len(iv) for iv in ivs]).tolist()
    starts = np.concatenate([iv[:, 0] for iv in ivs]) if ivs else np.zeros(0)  # (R,)
    ends = np.concatenate([iv[:, 1] for iv in ivs]) if ivs else np.zeros(0)  # (R,)
    order: list[np.ndarray | None] = [None] * len(ivs)
    for j in _breaks(starts[1:] < starts[:-1], offsets):
        a, b = offsets[j], offsets[j + 1]
        order[j] = np.argsort(starts[a:b], kind="stable")
        starts[a:b], ends[a:b] = starts[a:b][order[j]], ends[a:b][order[j]]
    return _Sequence(videos, offsets, starts, ends, _running_max(ends, offsets), fts, order)


def _sum_kernel() -> Callable[..., None] | None:
    # scipy's kernel for a CSR matrix times a dense one, called directly: building the sparse matrix
    # object checks and copies its index arrays, which costs more than the product for one video. It is
    # private, so it is checked once here, and the public route is taken where it is missing or differs.
    try:
        from scipy.sparse._sparsetools import csr_matvecs

        out = np.zeros((1, 2))
        indptr, cols = np.array([1, 3], dtype=np.intp), np.array([9, 1, 0], dtype=np.intp)
        csr_matvecs(1, 2, 2, indptr, cols, np.ones(3), np.array([1.0, 2.0, 4.0, 8.0]), out.ravel())
        return csr_matvecs if out.tolist() == [[5.0, 10.0]] else None
    except (ImportError, TypeError, ValueError):
        return None


_CSR_MATVECS = _sum_kernel()


def _segment_sums(
    indptr: np.ndarray, cols: np.ndarray, ones: np.ndarray, x: np.ndarray, out: np.ndarray
) -> None:
    """out[i] += sum of x[cols[indptr[i]:indptr[i + 1]]], row after row, as a CSR product.

    Unlike a running sum, only the listed rows enter a window's sum, so a -inf stays in its window; unlike
    reduceat over the gathered rows, the rows are not copied, and each one is added in one pass over d.
    """
    if _CSR_MATVECS is not None:
        _CSR_MATVECS(len(indptr) - 1, len(x), x.shape[1], indptr, cols, ones, x.ravel(), out.ravel())
        return
    a, b = int(indptr[0]), int(indptr[-1])
    out += csr_array((ones[a:b], cols[a:b], indptr - a), shape=(len(indptr) - 1, len(x))) @ x


class _Aligned(NamedTuple):
    """One sequence aligned to the windows of a batch of videos, window after window."""

    has: np.ndarray  # (m,) windows with kept rows
    counts: np.ndarray  # (m,) kept rows of each window
    starts: np.ndarray  # (r,) output intervals: one per window with rows when collapsed, else per kept row
    ends: np.ndarray  # (r,)
    features: np.ndarray  # (r, d) float64 means, or (r,) indices of the sorted rows to copy (`taken`)
    collapsed: bool
    taken: bool


def _align_batch(
    seq: _Sequence,
    js: list[int],
    w_off: list[int],
    ws: np.ndarray,
    we: np.ndarray,
    collapse: str | None,
    scratch: dict[str, np.ndarray],
) -> _Aligned:
    """`seq` against windows [ws, we) (m,): those of video js[k] (at least one) from w_off[k] on."""
    m = len(ws)
    # Rows from `hi` on start too late. Ends are not monotone (rows overlap), so the lower bound uses the
    # running maximum: every row before `lo` ends at or before the window's start.
    hi = np.empty(m, dtype=np.intp)
    lo = np.empty(m, dtype=np.intp)
    late, early = we + EPSILON, ws - EPSILON  # (m,)
    offsets = seq.offsets
    for k, j in enumerate(js):
        wa, wb, a, b = w_off[k], w_off[k + 1], offsets[j], offsets[j + 1]
        hi[wa:wb] = seq.starts[a:b].searchsorted(late[wa:wb], side="left")
        lo[wa:wb] = seq.reach[a:b].searchsorted(early[wa:wb], side="right")
    base = np.repeat([offsets[j] for j in js], np.diff(w_off))  # (m,) first row of each window's video
    hi += base
    lo += base  # (m,) non-decreasing within each video, as ws is
    counts = hi - lo  # (m,)
    np.maximum(counts, 0, out=counts)
    edges = np.zeros(m + 1, dtype=np.intp)  # (m + 1,) where each window's candidates start
    np.cumsum(counts, out=edges[1:])
    total = int(edges[-1])
    # Candidate pairs, window after window: row lo[j] + i for the i-th candidate of window j.
    row = np.arange(total)
    row += np.repeat(lo - edges[:-1], counts)  # (total,)
    c_s = seq.starts[row]
    np.maximum(c_s, np.repeat(ws, counts), out=c_s)  # (total,) clipped starts
    c_e = seq.ends[row]
    np.minimum(c_e, np.repeat(we, counts), out=c_e)  # (total,) clipped ends
    # The piece test implies the two overlap tests exactly, also in floating point: a positive difference
    # means c_e > c_s, so start < ref_end <= ref_end + EPSILON and end > ref_start >= ref_start - EPSILON.
    keep = c_e - c_s > EPSILON  # (total,)
    kept = np.zeros(total + 1, dtype=np.intp)
    np.cumsum(keep, out=kept[1:])
    kept = kept[edges]  # (m + 1,) where each window's kept rows start
    n_kept = np.diff(kept)  # (m,)
    has = n_kept > 0
    if kept[-1] < total:
        row, c_s, c_e = row[keep], c_s[keep], c_e[keep]
    first = kept[:-1][has]  # (k,)
    if collapse is None or len(first) == len(row):
        # Rows as they are, or one row a window (its mean is itself): copied once, into the output.
        return _Aligned(has, n_kept, c_s, c_e, row, collapse is not None, True)
    # Starts are sorted, so each window's first kept row has the smallest clipped start.
    span_end = np.maximum.reduceat(c_e, first)  # (k,)
    # Each video's windows reach rows block_lo:block_hi of it, which are converted to float64 once.
    w_first = w_off[:-1]
    block_lo = lo[w_first]  # (videos,)
    block_hi = np.maximum.reduceat(hi, w_first)  # (videos,)
    cols = row - np.repeat(block_lo, kept[w_off[1:]] - kept[w_first])  # (kept,) row in its video's block
    if len(scratch.get("ones", ())) < len(row):
        scratch["ones"] = np.ones(2 * len(row))
    d = seq.features[0].shape[1] if isinstance(seq.features, list) else seq.features.shape[1]
    sums = np.zeros((m, d))  # (m, d)
    kept_at = kept.tolist()
    for k, j, a, b in zip(range(len(js)), js, block_lo.tolist(), block_hi.tolist(), strict=True):
        wa, wb = w_off[k], w_off[k + 1]
        if kept_at[wb] == kept_at[wa]:
            continue
        # A buffer that grows as needed: fresh memory for every video costs a page fault per 4 KiB, more
        # than the conversion itself.
        if len(scratch.get("x", ())) < b - a:
            scratch["x"] = np.empty((2 * (b - a), d))
        x = scratch["x"][: b - a]  # (b - a, d)
        np.copyto(x, seq.block(j, a, b))
        # +inf and -inf in one window give NaN, as in the SDK (and no numpy warning: it is not numpy's loop).
        _segment_sums(kept[wa : wb + 1], cols, scratch["ones"], x, sums[wa:wb])
    means = sums if len(first) == m else sums[has]  # (k, d)
    means /= n_kept[has][:, None]
    return _Aligned(has, n_kept, c_s[first], span_end, means, True, False)


class _Part(NamedTuple):
    """Output entries of one batch: keys, rows per key (None: one each), intervals and features."""

    key_video: np.ndarray  # (k,)
    key_index: np.ndarray  # (k,)
    counts: np.ndarray | None  # (k,)
    starts: np.ndarray  # (r,)
    ends: np.ndarray  # (r,)
    features: np.ndarray | None  # (r, d) computed, (r,) sorted rows to copy (`js`), or None for zeros
    js: list[int] | None = None  # the batch's videos in the sequence, when `features` are rows
    splits: list[int] | None = None  # (videos + 1,) where each video's rows start in `features`


def _flatten(parts: list[_Part], seq: _Sequence, width: int, dtype: np.dtype, videos: list[str]) -> Segments:
    """One `Segments` from the parts, in order; every output row is written once, into the flat arrays."""
    n_keys = [len(p.key_video) for p in parts]
    key_video = np.concatenate([np.zeros(0, np.int64)] + [p.key_video for p in parts]).astype(np.int64)
    key_index = np.concatenate([np.zeros(0, np.int64)] + [p.key_index for p in parts]).astype(np.int64)
    counts = [
        np.ones(n, np.int64) if p.counts is None else p.counts for p, n in zip(parts, n_keys, strict=True)
    ]
    bounds = np.zeros(len(key_video) + 1, dtype=np.int64)
    np.cumsum(np.concatenate([np.zeros(0, np.int64), *counts]), out=bounds[1:])
    n = int(bounds[-1])
    intervals = np.empty((n, 2))  # (R, 2)
    features = np.empty((n, width), dtype=dtype)  # (R, d)
    if parts:
        intervals[:, 0] = np.concatenate([p.starts for p in parts])
        intervals[:, 1] = np.concatenate([p.ends for p in parts])
    a = 0
    shared: list[np.ndarray] = []  # rows of the one features array of `seq`, of consecutive parts
    for p in [*parts, None]:
        taken = p is not None and p.js is not None
        if shared and not taken:
            rows = np.concatenate(shared) if len(shared) > 1 else shared[0]
            _copy_rows(
                seq.features, rows if seq.order is None else seq.order[rows], features[a : a + len(rows)]
            )
            a += len(rows)
            shared = []
        if p is None:
            break
        if taken and not isinstance(seq.features, list):
            shared.append(p.features)
        elif taken:
            for k, j in enumerate(p.js):
                rows = p.features[p.splits[k] : p.splits[k + 1]] - seq.offsets[j]
                if len(rows):
                    rows = rows if seq.order[j] is None else seq.order[j][rows]
                    _copy_rows(seq.features[j], rows, features[a + p.splits[k] : a + p.splits[k + 1]])
            a += len(p.features)
        elif p.features is None:
            features[a : a + len(p.starts)] = 0
            a += len(p.starts)
        else:
            features[a : a + len(p.features)] = p.features
            a += len(p.features)
    return Segments(videos, key_video, key_index, bounds, intervals, features)


def _copy_rows(source: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
    if source.dtype == out.dtype:
        np.take(source, rows, axis=0, out=out, mode="clip")  # valid rows; "raise" would buffer `out`
    else:
        out[...] = source[rows]


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
    grouped = {name: _sequence(name, e) for name, e in sequences.items()}
    width, dtype = {}, {}
    for name, seq in grouped.items():
        if isinstance(seq.features, list):
            features = seq.features
        else:
            features = [seq.features] if seq.position else []
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

    ref = grouped[reference]
    videos = [v for v in ref.position if all(v in seq.position for seq in grouped.values())]
    # The windows: reference rows longer than EPSILON of the videos every sequence has, video after video.
    own = np.array([ref.position[v] for v in videos], dtype=np.intp)  # (P,)
    position_of = np.full(len(ref.offsets) - 1, -1, dtype=np.intp)
    position_of[own] = np.arange(len(videos))
    row_position = np.repeat(position_of, np.diff(ref.offsets))  # (R_ref,)
    w_row = np.flatnonzero((ref.ends - ref.starts > EPSILON) & (row_position >= 0))  # (M,)
    w_video = row_position[w_row]  # (M,) non-decreasing
    w_index = w_row - np.asarray(ref.offsets, dtype=np.intp)[own][w_video]  # (M,) i of the key `video[i]`
    ws, we = ref.starts[w_row], ref.ends[w_row]  # (M,)
    w_off = np.concatenate(([0], np.cumsum(np.bincount(w_video, minlength=len(videos))))).tolist()

    # Consecutive videos with windows, in batches of about BATCH_ROWS rows.
    batches: list[list[int]] = []
    size = BATCH_ROWS
    for p, video in enumerate(videos):
        if w_off[p + 1] == w_off[p]:
            continue  # no windows
        n = sum(
            seq.offsets[seq.position[video] + 1] - seq.offsets[seq.position[video]]
            for seq in grouped.values()
        )
        if size + n > BATCH_ROWS:
            batches.append([])
            size = 0
        batches[-1].append(p)
        size += n

    kept: dict[str, list[_Part]] = {name: [] for name in sequences}
    imputed: dict[str, list[_Part]] = {name: [] for name in sequences}
    scratch: dict[str, dict[str, np.ndarray]] = {name: {} for name in sequences}
    for batch in batches:
        wa, wb = w_off[batch[0]], w_off[batch[-1] + 1]
        local = [w_off[p] - wa for p in batch] + [wb - wa]
        b_ws, b_we, b_video, b_index = ws[wa:wb], we[wa:wb], w_video[wa:wb], w_index[wa:wb]
        results = {}
        for name, seq in grouped.items():
            js = [seq.position[videos[p]] for p in batch]
            results[name] = (js, _align_batch(seq, js, local, b_ws, b_we, collapse, scratch[name]))
        wanted = None
        if not impute:
            # A window that lacks rows in any sequence is dropped from all of them (SDK hard_unify).
            wanted = np.logical_and.reduce([r.has for _, r in results.values()])
        for name, (js, r) in results.items():
            chosen = r.has if wanted is None else wanted  # (m,) windows that get rows of their own
            starts, ends, feats = r.starts, r.ends, r.features
            if wanted is not None and not np.array_equal(chosen, r.has):
                sel = chosen[r.has]  # (k,)
                mask = sel if r.collapsed else np.repeat(sel, r.counts[r.has])
                starts, ends, feats = starts[mask], ends[mask], feats[mask]
            splits = None
            if r.taken:
                per_window = chosen if r.collapsed else np.where(chosen, r.counts, 0)
                splits = np.concatenate(([0], np.cumsum(per_window)))[local].tolist()
            counts = None if r.collapsed else r.counts[chosen]
            kept[name].append(
                _Part(
                    b_video[chosen],
                    b_index[chosen],
                    counts,
                    starts,
                    ends,
                    feats,
                    js if r.taken else None,
                    splits,
                )
            )
            if impute and not r.has.all():
                missing = ~r.has
                imputed[name].append(
                    _Part(b_video[missing], b_index[missing], None, b_ws[missing], b_we[missing], None)
                )
    # Imputed entries come after all others, as the SDK's impute adds them.
    return {
        name: _flatten(kept[name] + imputed[name], grouped[name], width[name], dtype[name], videos)
        for name in sequences
    }
