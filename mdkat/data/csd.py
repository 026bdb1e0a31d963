"""Reading and writing CMU-MultimodalSDK computational sequences (`.csd` files).

A `.csd` file is HDF5 with one top-level group named after the sequence (the SDK's "root name"):
`<root>/data/<video_id>/features` (n, d) and `<root>/data/<video_id>/intervals` (n, 2, seconds), plus
`<root>/metadata/<key>` strings. Word sequences store bytes (`b'sp'` marks a pause). This module reads
the layout the SDK writes (one bulk read per dataset) and writes the same layout, so files made here
open in the SDK and the other way round. Structural problems become a `DataError` naming the file, the
video and the dataset, where the SDK would fail later with an unrelated exception.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import h5py
import numpy as np

from mdkat.data.prepared import DataError
from mdkat.io import atomic_path

Sequence = dict[str, tuple[np.ndarray, np.ndarray]]


def _open(path: Path) -> h5py.File:
    if not path.is_file():
        raise DataError(f"{path}: not found")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise DataError(f"{path}: not an HDF5 file (a .csd computational sequence is HDF5): {e}") from None


def _root(f: h5py.File, path: Path) -> h5py.Group:
    names = list(f.keys())
    if len(names) != 1:
        raise DataError(
            f"{path}: a .csd file has exactly one top-level group (the sequence's root name), found "
            f"{len(names)}: {names[:5]}"
        )
    root = f[names[0]]
    if not isinstance(root, h5py.Group):
        raise DataError(f"{path}: top-level entry '{names[0]}' is not a group")
    return root


def _to_str(value: Any) -> str:
    # The SDK stores metadata as a (1,) array of variable-length strings; h5py hands those back as bytes.
    if isinstance(value, np.ndarray):
        value = value.reshape(-1)[0] if value.size == 1 else value.tolist()
    if isinstance(value, bytes | np.bytes_):
        return bytes(value).decode("utf-8", errors="replace")
    return value if isinstance(value, str) else str(value)


def _read_metadata(root: h5py.Group) -> dict[str, str]:
    group = root.get("metadata")
    if not isinstance(group, h5py.Group):
        return {}
    return {key: _to_str(ds[()]) for key, ds in group.items() if isinstance(ds, h5py.Dataset)}


def read_csd_metadata(path: str | Path) -> dict[str, str]:
    """The `metadata` strings of a `.csd` file (empty when it has none).

    The pipeline reads features only; this is for people inspecting a file, and for the tests that check
    `write_csd`'s output."""
    path = Path(path)
    with _open(path) as f:
        return _read_metadata(_root(f, path))


def _check_shapes(path: Path, video: str, intervals: tuple[int, ...], features: tuple[int, ...]) -> None:
    where = f"{path}: video '{video}'"
    if len(intervals) != 2 or intervals[1] != 2:
        raise DataError(f"{where}: dataset 'intervals' must have shape (n, 2), got {intervals}")
    if len(features) != 2:
        raise DataError(f"{where}: dataset 'features' must have shape (n, d), got {features}")
    if features[0] != intervals[0]:
        raise DataError(f"{where}: dataset 'features' has {features[0]} rows, 'intervals' has {intervals[0]}")


def _invalid(intervals: np.ndarray) -> np.ndarray:
    """(n,) rows that are not a time span: NaN or infinite, negative, or starting after they end."""
    with np.errstate(invalid="ignore"):
        return (
            ~np.isfinite(intervals).all(axis=1)
            | (intervals < 0).any(axis=1)
            | (intervals[:, 0] > intervals[:, 1])
        )


def _check_order(path: Path, video: str, intervals: np.ndarray) -> None:
    bad = _invalid(intervals)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        start, end = intervals[row].tolist()
        why = (
            "is not finite"
            if not np.isfinite(intervals[row]).all()
            else "is negative"
            if min(start, end) < 0
            else "starts after it ends"
        )
        raise DataError(
            f"{path}: video '{video}': dataset 'intervals' row {row} {why}: [{start}, {end}] "
            f"({int(bad.sum())} invalid rows in this video; expected 0 <= start <= end, in seconds)"
        )


def _check_video(path: Path, video: str, intervals: np.ndarray, features: np.ndarray) -> None:
    _check_shapes(path, video, intervals.shape, features.shape)
    _check_order(path, video, intervals)


def _missing(path: Path, data: h5py.Group, video: str, name: str) -> DataError:
    # Only reached on the error path: the high-level API says what is wrong, for the message.
    group = data.get(video)
    if not isinstance(group, h5py.Group):
        return DataError(f"{path}: video '{video}': expected a group with 'features' and 'intervals'")
    if name in group:
        return DataError(f"{path}: video '{video}': '{name}' is not a dataset")
    return DataError(f"{path}: video '{video}': dataset '{name}' is missing")


# What `_locate` finds of a dataset: shape, numpy dtype, and either the file offset of its bytes or the
# open dataset to read through HDF5.
Located = tuple[tuple[int, ...], np.dtype, int | None, Any]


def _locate(data: h5py.Group, video: str, name: str, types: dict[str, tuple[Any, np.dtype]]) -> Located:
    # The low-level API: h5py's high-level objects cost several times the read itself for the small
    # per-video datasets of a .csd file, and a file holds thousands of them.
    dataset = h5py.h5d.open(data.id, f"{video}/{name}".encode())
    # Translating an HDF5 type to a numpy dtype costs more than comparing it with the previous video's.
    tid = dataset.get_type()
    known = types.get(name)
    if known is None or tid != known[0]:
        known = types[name] = (tid, tid.dtype)
    shape, dtype = dataset.shape, known[1]
    # Contiguous numeric data (the SDK's layout) is stored as plain bytes in the dataset's own byte order
    # (which `dtype` gives); one read of them skips H5Dread's set-up, which costs more than the copy itself
    # here. Chunked, compact, external or unwritten data has no offset or another size and takes H5Dread.
    if dtype.kind in "biuf":
        nbytes = dtype.itemsize * math.prod(shape)
        offset = dataset.get_offset() if nbytes else None
        if offset is not None and dataset.get_storage_size() == nbytes:
            return shape, dtype, offset, None
    return shape, dtype, None, dataset


def _read(raw: BinaryIO, data: h5py.Group, video: str, name: str, located: Located, out: np.ndarray) -> None:
    """Read one dataset into `out` (C-contiguous, as H5Dread needs), from its offset where it has one."""
    _, _, offset, dataset = located
    if offset is not None:
        raw.seek(offset)
        if raw.readinto(out.reshape(-1).view(np.uint8)) == out.nbytes:
            return
        dataset = h5py.h5d.open(data.id, f"{video}/{name}".encode())
    dataset.read(h5py.h5s.ALL, h5py.h5s.ALL, out)


def read_csd(path: str | Path) -> Sequence:
    """Read a `.csd` file into {video_id: (intervals (n, 2) float64, features (n, d) as stored)}.

    The intervals of all videos are views of one array (one per stored dtype), read and checked at once.
    """
    path = Path(path)
    with _open(path) as f, open(path, "rb", buffering=0) as raw:
        root = _root(f, path)
        data = root.get("data")
        if not isinstance(data, h5py.Group):
            raise DataError(f"{path}: group '{root.name}/data' is missing")
        types: dict[str, tuple[Any, np.dtype]] = {}
        videos = list(data.keys())
        # Every dataset is located and checked first, so that the intervals can be read into one array.
        found: list[tuple[Located, Located]] = []
        for video in videos:
            try:
                name = "intervals"
                intervals = _locate(data, video, name, types)
                name = "features"
                features = _locate(data, video, name, types)
            except KeyError:
                raise _missing(path, data, video, name) from None
            _check_shapes(path, video, intervals[0], features[0])
            found.append((intervals, features))
        by_dtype: dict[np.dtype, list[int]] = {}
        for i, (intervals, _) in enumerate(found):
            by_dtype.setdefault(intervals[1], []).append(i)
        views: list[np.ndarray] = [np.empty((0, 2))] * len(videos)
        for dtype, which in by_dtype.items():
            rows = np.cumsum([0] + [found[i][0][0][0] for i in which]).tolist()
            block = np.empty((rows[-1], 2), dtype=dtype)  # (sum of n, 2)
            for i, a, b in zip(which, rows[:-1], rows[1:], strict=True):
                _read(raw, data, videos[i], "intervals", found[i][0], block[a:b])
            block = block.astype(np.float64, copy=False)
            backwards = np.flatnonzero(_invalid(block))
            if len(backwards):
                k = int(np.searchsorted(rows, backwards[0], side="right")) - 1
                _check_order(path, videos[which[k]], block[rows[k] : rows[k + 1]])
            for i, a, b in zip(which, rows[:-1], rows[1:], strict=True):
                views[i] = block[a:b]
        # The features stay one array per video: one array for a whole file would be fresh memory for
        # every file read, where separate arrays of a few MiB reuse what the process freed before.
        out: Sequence = {}
        for video, intervals, (_, features) in zip(videos, views, found, strict=True):
            array = np.empty(features[0], dtype=features[1])  # (n, d)
            _read(raw, data, video, "features", features, array)
            out[video] = (intervals, array)
    return out


def write_csd(
    path: str | Path,
    data: Mapping[str, tuple[np.ndarray, np.ndarray]],
    root_name: str,
    metadata: Mapping[str, str | object] | None = None,
) -> None:
    """Write {video_id: (intervals, features)} as a `.csd` file, atomically (temporary file + rename).

    The pipeline never writes `.csd` files: this makes the SDK-format fixtures of the tests and the
    benchmark's synthetic videos, in the layout the CMU server publishes."""
    path = Path(path)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        root = f.create_group(root_name)
        # Creation order is tracked so that reading back gives the videos in the order written.
        group = root.create_group("data", track_order=True)
        for video, (intervals, features) in data.items():
            intervals = np.asarray(intervals, dtype=np.float64)
            features = np.asarray(features)
            _check_video(path, video, intervals, features)
            g = group.create_group(video)
            g.create_dataset("features", data=features)
            g.create_dataset("intervals", data=intervals)
        meta = root.create_group("metadata", track_order=True)
        for key, value in (metadata or {}).items():
            text = value if isinstance(value, str) else json.dumps(value)
            # A (1,) array, as the SDK writes it: its reader takes element [0].
            meta.create_dataset(key, data=[text], dtype=h5py.string_dtype("utf-8"))
