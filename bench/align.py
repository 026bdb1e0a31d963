"""Benchmark: read MOSEI-like `.csd` files and word-align them as the `cmu-sdk` source does.

Writes four computational sequences for `--videos` synthetic 60 s videos into a temporary folder (not
timed): words at about 160 a minute with pauses, as 300-d word vectors; COVAREP-like audio at 100 Hz,
74-d float32 with a few `-inf`; FACET-like vision at 30 Hz, 35-d, with missing frames; labels with a few
7-column segments per video. Then times reading all four files, `align(words)` and
`align(labels, collapse=None, impute=False)`, and prints JSON (`--json`) or a readable line.
For scale it also times the words step done the SDK's way (a Python loop over words, each scanning all
rows) on a few videos. The target is 3 ms a video, reading included.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mdkat.data.align import EPSILON, align
from mdkat.data.csd import read_csd, write_csd

DURATION = 60.0  # seconds per video
WORDS_PER_MINUTE = 160
Entries = dict[str, tuple[np.ndarray, np.ndarray]]


def _words(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    n = int(WORDS_PER_MINUTE * DURATION / 60)
    lengths = rng.uniform(0.12, 0.4, size=n)  # (n,)
    # Most words follow each other directly; some are separated by a pause, and some of those pauses are
    # explicit 'sp' rows (zero vectors in the word-vector file), the others just a gap.
    gaps = np.where(rng.random(n) < 0.2, rng.uniform(0.1, 0.8, size=n), 0.0)  # (n,)
    scale = min(1.0, (DURATION - 0.5) / (lengths + gaps).sum())  # fit the words into the video
    lengths, gaps = lengths * scale, gaps * scale
    starts = 0.2 + np.concatenate(([0.0], np.cumsum(lengths + gaps)[:-1]))
    ends = starts + lengths
    explicit = (gaps > 0) & (rng.random(n) < 0.5)  # (n,)
    sp = np.stack([ends[explicit], ends[explicit] + gaps[explicit]], axis=1)
    intervals = np.concatenate([np.stack([starts, ends], axis=1), sp])
    features = np.concatenate(
        [rng.normal(size=(n, 300)).astype(np.float32), np.zeros((len(sp), 300), dtype=np.float32)]
    )
    order = np.argsort(intervals[:, 0], kind="stable")
    return intervals[order], features[order]


def _frames(rng: np.random.Generator, rate: float, d: int, missing: float) -> tuple[np.ndarray, np.ndarray]:
    starts = np.arange(int(DURATION * rate)) / rate
    keep = rng.random(len(starts)) >= missing
    if missing:
        gap = int(rng.integers(0, len(starts) - int(2 * rate)))
        keep[gap : gap + int(2 * rate * rng.random())] = False  # one longer stretch without a face
    starts = starts[keep]
    intervals = np.stack([starts, starts + 1 / rate], axis=1)
    return intervals, rng.normal(size=(len(starts), d)).astype(np.float32)


def _labels(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    n = int(rng.integers(3, 7))
    cuts = np.sort(rng.uniform(0.0, DURATION, size=2 * n)).reshape(n, 2)  # (n, 2) disjoint segments
    return cuts, rng.uniform(-3, 3, size=(n, 7)).astype(np.float32)


def write_dataset(folder: Path, videos: int, seed: int) -> dict[str, Path]:
    """Write the four `.csd` files for `videos` synthetic videos; return their paths by sequence name."""
    rng = np.random.default_rng(seed)
    data: dict[str, Entries] = {"words": {}, "audio": {}, "vision": {}, "labels": {}}
    for k in range(videos):
        video = f"vid{k:05d}"
        data["words"][video] = _words(rng)
        iv, ft = _frames(rng, 100.0, 74, missing=0.0)
        ft[rng.random(len(ft)) < 0.002, 0] = -np.inf  # COVAREP's occasional -inf rows
        data["audio"][video] = (iv, ft)
        data["vision"][video] = _frames(rng, 30.0, 35, missing=0.05)
        data["labels"][video] = _labels(rng)
    paths = {}
    for name, entries in data.items():
        paths[name] = folder / f"{name}.csd"
        write_csd(paths[name], entries, name, {"root name": name})
    return paths


def run_once(paths: dict[str, Path]) -> dict[str, float | int]:
    """Read the files and align them once; return timings and counts."""
    t0 = time.perf_counter()
    seqs = {name: read_csd(path) for name, path in paths.items()}
    t1 = time.perf_counter()
    labels = seqs.pop("labels")
    words = align(seqs, "words")
    t2 = time.perf_counter()
    segments = align({**words, "labels": labels}, "labels", collapse=None, impute=False)
    t3 = time.perf_counter()
    return {
        "read": t1 - t0,
        "align_words": t2 - t1,
        "align_labels": t3 - t2,
        "total": t3 - t0,
        "rows": sum(len(iv) for entries in (*seqs.values(), labels) for iv, _ in entries.values()),
        "words": len(words["words"]),
        "segments": len(segments["labels"]),
    }


def per_interval_words(paths: dict[str, Path], videos: int) -> float:
    """Seconds a video for the words step the SDK's way: a loop over words, each scanning every row."""
    seqs = {name: read_csd(paths[name]) for name in ("words", "audio", "vision")}
    chosen = list(seqs["words"])[:videos]
    t0 = time.perf_counter()
    out: dict[str, Entries] = {name: {} for name in seqs}
    for video in chosen:
        for i, (start, end) in enumerate(seqs["words"][video][0]):
            if not end - start > EPSILON:
                continue
            for name, entries in seqs.items():
                iv, ft = entries[video]
                c_s, c_e = np.maximum(iv[:, 0], start), np.minimum(iv[:, 1], end)
                keep = (iv[:, 0] < end + EPSILON) & (iv[:, 1] > start - EPSILON) & (c_e - c_s > EPSILON)
                if keep.any():
                    span = np.array([[c_s[keep].min(), c_e[keep].max()]])
                    mean = ft[keep].astype(np.float64).mean(axis=0, keepdims=True)
                    out[name][f"{video}[{i}]"] = (span, mean)
                else:
                    out[name][f"{video}[{i}]"] = (np.array([[start, end]]), np.zeros((1, ft.shape[1])))
    return (time.perf_counter() - t0) / max(len(chosen), 1)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs; the median is reported")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument(
        "--baseline-videos", type=int, default=5, help="videos for the per-interval loop, for scale (0: skip)"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mdkat-bench-align-") as tmp:
        paths = write_dataset(Path(tmp), args.videos, args.seed)
        size = sum(p.stat().st_size for p in paths.values())
        runs = [run_once(paths) for _ in range(args.repeat)]
        baseline = per_interval_words(paths, args.baseline_videos) if args.baseline_videos > 0 else None
    seconds = statistics.median(r["total"] for r in runs)
    result = {
        "videos": args.videos,
        "seconds": seconds,
        "seconds_per_video": seconds / args.videos,
        "seconds_min": min(r["total"] for r in runs),
        "repeats": args.repeat,
        "read_seconds": statistics.median(r["read"] for r in runs),
        "align_words_seconds": statistics.median(r["align_words"] for r in runs),
        "align_labels_seconds": statistics.median(r["align_labels"] for r in runs),
        "input_rows": runs[0]["rows"],
        "rows_per_second": runs[0]["rows"] / seconds,
        "file_megabytes": size / 1e6,
        "aligned_words": runs[0]["words"],
        "segments": runs[0]["segments"],
    }
    if baseline is not None:
        words_per_video = result["align_words_seconds"] / args.videos
        result["per_interval_loop_words_seconds_per_video"] = baseline
        result["align_words_speedup"] = baseline / words_per_video
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        line = (
            f"{args.videos} videos: {seconds:.3f} s ({1e3 * result['seconds_per_video']:.2f} ms a video; "
            f"read {result['read_seconds']:.3f} s, align words {result['align_words_seconds']:.3f} s, "
            f"align labels {result['align_labels_seconds']:.3f} s), {result['rows_per_second']:.3g} rows/s"
        )
        if baseline is not None:
            line += (
                f"; words step {result['align_words_speedup']:.0f}x faster than a per-interval loop "
                f"({1e3 * baseline:.0f} ms a video)"
            )
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
