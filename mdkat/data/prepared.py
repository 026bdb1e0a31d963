"""The prepared format: the one contract between `prepare` and every later stage.

`<dir>/{train,valid,test}.npz` hold `text`, `audio`, `vision` (float32, N x T_m x d_m), `text_len`,
`audio_len`, `vision_len` (int64), `label` (float32) and `id` (str), and, where the source has BERT word
pieces, `text_ids`, `text_mask`, `text_segment` (int64, N x L; optional, so that data prepared before
they existed stay valid); `<dir>/manifest.json` describes them and records the SHA-256 of every file, so
that a reader notices a changed or truncated split.

A split in memory is a plain dict with exactly those keys (`SplitArrays`): the file format itself.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from mdkat import MODALITIES
from mdkat.config import ADDED_UNSET
from mdkat.errors import MdkatError
from mdkat.io import atomic_dir, atomic_open, json_text, sha256_file, write_json

SPLITS = ("train", "valid", "test")
LABEL_BOUND = 3.0  # CMU-MOSI/MOSEI sentiment: the mean of annotators' scores in [-3, 3]
LENGTH_KEYS = tuple(f"{m}_len" for m in MODALITIES)
FIELDS = (*MODALITIES, *LENGTH_KEYS, "label", "id")
TOKEN_FIELDS = ("text_ids", "text_mask", "text_segment")  # all three or none
FORMAT_VERSION = 1

SplitArrays = dict[str, np.ndarray]


class DataError(MdkatError):
    """Input data that does not have the expected structure or content."""


def sanitize(arrays: SplitArrays) -> dict[str, int]:
    """Replace NaN and +-inf in the features by 0, in place; return how many values each modality had."""
    counts = {}
    for m in MODALITIES:
        x = arrays[m]
        bad = ~np.isfinite(x)
        counts[m] = int(bad.sum())
        if counts[m]:
            x[bad] = 0.0
    return counts


def check_labels(label: np.ndarray, ids: np.ndarray, split: str, where: str, key: str = "label") -> None:
    """Labels are finite and on the sentiment scale; an error names the file, split, key, a sample and
    the count."""
    if not np.isfinite(label).all():
        bad = np.flatnonzero(~np.isfinite(label))
        raise DataError(
            f"{where}: split '{split}' key '{key}': non-finite label for id '{ids[bad[0]]}' "
            f"({len(bad)} such samples)"
        )
    outside = np.flatnonzero(np.abs(label) > LABEL_BOUND)
    if len(outside):
        first = int(outside[0])
        raise DataError(
            f"{where}: split '{split}' key '{key}': {len(outside)} labels outside [-{LABEL_BOUND:g}, "
            f"{LABEL_BOUND:g}], the sentiment scale, e.g. {float(label[first]):g} "
            f"for id '{ids[first]}'"
        )


def validate_split(arrays: SplitArrays, split: str, where: str) -> None:
    """Check keys, dtypes, ranks, sample counts and lengths of one split; errors name `where` and the key."""
    missing = [k for k in FIELDS if k not in arrays]
    if missing:
        raise DataError(f"{where}: split '{split}': missing key '{missing[0]}'")
    n = len(arrays["label"])
    if n == 0:
        raise DataError(f"{where}: split '{split}' is empty")
    for m in MODALITIES:
        x = arrays[m]
        if x.ndim != 3:
            raise DataError(
                f"{where}: split '{split}' key '{m}': expected rank 3 (N, T, d), got shape {x.shape}"
            )
        if x.dtype != np.float32:
            raise DataError(f"{where}: split '{split}' key '{m}': expected float32, got {x.dtype}")
        length = arrays[f"{m}_len"]
        if length.shape != (n,) or length.dtype != np.int64:
            raise DataError(
                f"{where}: split '{split}' key '{m}_len': expected int64 of shape ({n},), "
                f"got {length.dtype} {length.shape}"
            )
        if len(length) and (length.min() < 1 or length.max() > x.shape[1]):
            raise DataError(
                f"{where}: split '{split}' key '{m}_len': lengths must lie in [1, {x.shape[1]}], "
                f"got [{length.min()}, {length.max()}]"
            )
    for key in (*MODALITIES, "id"):
        if len(arrays[key]) != n:
            raise DataError(
                f"{where}: split '{split}': key '{key}' has {len(arrays[key])} samples, 'label' has {n}"
            )
    label = arrays["label"]
    if label.shape != (n,) or label.dtype != np.float32:
        raise DataError(
            f"{where}: split '{split}' key 'label': expected float32 of shape ({n},), got {label.shape}"
        )
    check_labels(label, arrays["id"], split, where)
    if arrays["id"].dtype.kind != "U":
        raise DataError(f"{where}: split '{split}' key 'id': expected strings, got {arrays['id'].dtype}")
    _validate_tokens(arrays, split, where, n)


def _validate_tokens(arrays: SplitArrays, split: str, where: str, n: int) -> None:
    present = [k for k in TOKEN_FIELDS if k in arrays]
    if not present:
        return
    if len(present) < len(TOKEN_FIELDS):
        missing = [k for k in TOKEN_FIELDS if k not in arrays]
        raise DataError(f"{where}: split '{split}': has {present} but not {missing} (all three or none)")
    shape = arrays["text_ids"].shape
    for key in TOKEN_FIELDS:
        x = arrays[key]
        if x.dtype != np.int64 or x.ndim != 2 or x.shape != shape or len(x) != n:
            raise DataError(
                f"{where}: split '{split}' key '{key}': expected int64 of shape ({n}, L), the same for "
                f"text_ids, text_mask and text_segment; got {x.dtype} {x.shape} (text_ids: {shape})"
            )
    mask = arrays["text_mask"]
    if not np.isin(mask, (0, 1)).all():
        raise DataError(f"{where}: split '{split}' key 'text_mask': expected 0/1 values")
    if (np.diff(mask, axis=1) > 0).any():
        raise DataError(f"{where}: split '{split}' key 'text_mask': word pieces must precede the padding")
    if (mask.sum(1) < 1).any():
        raise DataError(f"{where}: split '{split}' key 'text_mask': a sample without any word piece")
    if (arrays["text_ids"] < 0).any():
        raise DataError(f"{where}: split '{split}' key 'text_ids': negative token ids")


def _write_npz(path: Path, arrays: SplitArrays) -> None:
    # np.savez stamps the current time into the zip; fixed metadata makes same data give the same bytes.
    with atomic_open(path) as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key in (*FIELDS, *(k for k in TOKEN_FIELDS if k in arrays)):
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.ascontiguousarray(arrays[key]), allow_pickle=False)


def _label_stats(label: np.ndarray) -> dict[str, float]:
    return {
        "mean": float(label.mean()),
        "std": float(label.std()),
        "min": float(label.min()),
        "max": float(label.max()),
        "fraction_zero": float((label == 0).mean()),
        "fraction_positive": float((label > 0).mean()),
    }


def write_prepared(out: str | Path, splits: dict[str, SplitArrays], info: dict[str, Any]) -> dict[str, Any]:
    """Sanitize, validate and write the three splits and the manifest into `out` as one atomic swap.

    `info` carries what only the source knows: `source`, `dataset`, `aligned`, provenance, oracle metrics.
    Returns the manifest.
    """
    missing_info = [k for k in ("source", "dataset", "aligned") if k not in info]
    if missing_info:  # pragma: no cover - a bug in a source, not a user error
        raise ValueError(f"write_prepared: info lacks {missing_info}")
    if sorted(splits) != sorted(SPLITS):
        raise DataError(f"{out}: expected splits {list(SPLITS)}, got {sorted(splits)}")
    for split, arrays in splits.items():
        validate_split(arrays, split, str(out))
    replaced = {split: sanitize(arrays) for split, arrays in splits.items()}
    first = splits["train"]
    dims = {m: int(first[m].shape[2]) for m in MODALITIES}
    seq_len = {m: int(first[m].shape[1]) for m in MODALITIES}
    for split, arrays in splits.items():
        for m in MODALITIES:
            if arrays[m].shape[1:] != (seq_len[m], dims[m]):
                raise DataError(
                    f"{out}: split '{split}' key '{m}': shape (T, d) = {arrays[m].shape[1:]} differs from "
                    f"train's {(seq_len[m], dims[m])}"
                )
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        **info,
        "dims": dims,
        "seq_len": seq_len,
        "counts": {s: len(splits[s]["label"]) for s in SPLITS},
        # word pieces per sample, only where the source has BERT's token ids (model.text_encoder: bert):
        # data without them keep the manifest they always had
        "label_stats": {s: _label_stats(splits[s]["label"]) for s in SPLITS},
        "nonfinite_replaced": replaced,
        "files": {},
    }
    if "text_ids" in first:
        manifest["text_tokens"] = int(first["text_ids"].shape[1])
    with atomic_dir(out) as tmp:
        for split in SPLITS:
            _write_npz(tmp / f"{split}.npz", splits[split])
            manifest["files"][f"{split}.npz"] = sha256_file(tmp / f"{split}.npz")
        write_json(tmp / "manifest.json", manifest)
    return manifest


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of a prepared directory, with a clear error when it is missing or unreadable."""
    path = Path(directory) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: not found; run the prepare stage first") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON: {e}") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{path}: format_version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    return manifest


def read_split(directory: str | Path, split: str, manifest: dict[str, Any]) -> SplitArrays:
    """Load one split's arrays after checking the file against the manifest's SHA-256."""
    path = Path(directory) / f"{split}.npz"
    expected = manifest.get("files", {}).get(path.name)
    if expected is None:
        raise DataError(f"{Path(directory) / 'manifest.json'}: no checksum for '{path.name}'")
    if not path.exists():
        raise DataError(f"{path}: missing (the manifest lists it)")
    actual = sha256_file(path)
    if actual != expected:
        raise DataError(
            f"{path}: SHA-256 {actual} does not match the manifest's {expected}; the file was changed or "
            "truncated after prepare wrote it: run prepare again"
        )
    with np.load(path, allow_pickle=False) as npz:
        arrays = {key: npz[key] for key in npz.files}
    validate_split(arrays, split, str(path))
    return arrays


def manifest_digest(directory: str | Path) -> str:
    """SHA-256 of `directory/manifest.json`, with the recorded parameters of `ADDED_UNSET` left out when
    unset: data prepared before such a key existed and after it keep one identity (`mdkat.fingerprint`)."""
    path = Path(directory) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read the manifest ({e})") from None
    recorded = manifest.get("params", {})
    unset = [key for key in ADDED_UNSET if key in recorded and recorded[key] is None]
    if not unset:
        return sha256_file(path)
    trimmed = {**manifest, "params": {k: v for k, v in recorded.items() if k not in unset}}
    return hashlib.sha256(json_text(trimmed).encode()).hexdigest()
