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
    """The `metadata` strings of a `.csd` file (empty when it has none)."""
    path = Path(path)
    with _open(path) as f:
        return _read_metadata(_root(f, path))


def _check_video(path: Path, video: str, intervals: np.ndarray, features: np.ndarray) -> None:
    where = f"{path}: video '{video}'"
    if intervals.ndim != 2 or intervals.shape[1] != 2:
        raise DataError(f"{where}: dataset 'intervals' must have shape (n, 2), got {intervals.shape}")
    if features.ndim != 2:
        raise DataError(f"{where}: dataset 'features' must have shape (n, d), got {features.shape}")
    if features.shape[0] != intervals.shape[0]:
        raise DataError(
            f"{where}: dataset 'features' has {features.shape[0]} rows, 'intervals' has {intervals.shape[0]}"
        )
    backwards = intervals[:, 0] > intervals[:, 1]  # (n,)
    if backwards.any():
        row = int(np.flatnonzero(backwards)[0])
        raise DataError(
            f"{where}: dataset 'intervals' row {row} starts after it ends: {intervals[row].tolist()} "
            f"({int(backwards.sum())} such rows)"
        )


def _missing(path: Path, data: h5py.Group, video: str, name: str) -> DataError:
    # Only reached on the error path: the high-level API says what is wrong, for the message.
    group = data.get(video)
    if not isinstance(group, h5py.Group):
        return DataError(f"{path}: video '{video}': expected a group with 'features' and 'intervals'")
    if name in group:
        return DataError(f"{path}: video '{video}': '{name}' is not a dataset")
    return DataError(f"{path}: video '{video}': dataset '{name}' is missing")


def _read_dataset(
    data: h5py.Group, raw: BinaryIO, video: str, name: str, types: dict[str, tuple[Any, np.dtype]]
) -> np.ndarray:
    # The low-level API: h5py's high-level objects cost several times the read itself for the small
    # per-video datasets of a .csd file, and a file holds thousands of them.
    dataset = h5py.h5d.open(data.id, f"{video}/{name}".encode())
    # Translating an HDF5 type to a numpy dtype costs more than comparing it with the previous video's.
    tid = dataset.get_type()
    known = types.get(name)
    if known is None or tid != known[0]:
        known = types[name] = (tid, tid.dtype)
    out = np.empty(dataset.shape, dtype=known[1])
    # Contiguous numeric data (the SDK's layout) is stored as plain bytes in the dataset's own byte order
    # (which `dataset.dtype` reports); one read of them skips H5Dread's set-up, which costs more than the
    # copy itself here. Chunked, compact, external or unwritten data has no offset and takes H5Dread.
    offset = dataset.get_offset() if out.dtype.kind in "biuf" and out.nbytes else None
    if offset is not None and dataset.get_storage_size() == out.nbytes:
        raw.seek(offset)
        if raw.readinto(out.reshape(-1).view(np.uint8)) == out.nbytes:
            return out
    dataset.read(h5py.h5s.ALL, h5py.h5s.ALL, out)
    return out


def read_csd(path: str | Path) -> Sequence:
    """Read a `.csd` file into {video_id: (intervals (n, 2) float64, features (n, d) as stored)}."""
    path = Path(path)
    out: Sequence = {}
    with _open(path) as f, open(path, "rb", buffering=0) as raw:
        root = _root(f, path)
        data = root.get("data")
        if not isinstance(data, h5py.Group):
            raise DataError(f"{path}: group '{root.name}/data' is missing")
        types: dict[str, tuple[Any, np.dtype]] = {}
        for video in data.keys():
            arrays = []
            for name in ("intervals", "features"):
                try:
                    arrays.append(_read_dataset(data, raw, video, name, types))
                except KeyError:
                    raise _missing(path, data, video, name) from None
            intervals = np.asarray(arrays[0], dtype=np.float64)
            features = arrays[1]
            _check_video(path, video, intervals, features)
            out[video] = (intervals, features)
    return out


def write_csd(
    path: str | Path,
    data: Mapping[str, tuple[np.ndarray, np.ndarray]],
    root_name: str,
    metadata: Mapping[str, str | object] | None = None,
) -> None:
    """Write {video_id: (intervals, features)} as a `.csd` file, atomically (temporary file + rename)."""
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
