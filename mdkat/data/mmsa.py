"""The `mmsa` source: the field's preprocessed CMU-MOSI / CMU-MOSEI pickles into the prepared format.

MMSA (the toolkit behind Self-MM, MMIM, DMD and most recent baselines) distributes each corpus as one
pickle, `aligned_50.pkl` or `unaligned_50.pkl`: a dict `{'train', 'valid', 'test'}`, each split a dict of
numpy arrays. The keys read here are `text` (N, T_t, d_t) BERT features, `text_bert` (N, 3, T_t) token ids /
attention mask / segment ids, `audio` (N, T_a, d_a), `vision` (N, T_v, d_v), `regression_labels` (N,) and
`id` (N,); unaligned files add `audio_lengths` and `vision_lengths`. Everything else (`raw_text`,
`annotations`, `classification_labels`) is ignored. Shapes are read from the file, never assumed: MOSI
aligned has T = 50 for every modality, unaligned MOSI 50 / 375 / 500, and the feature sizes differ between
corpora. `data.seq_len` does not apply here: the file's own step counts are kept.

A pickle is a program, not data: unpickling runs whatever callables the file names. The files come from
third-party mirrors, so they are read with an unpickler that resolves only the handful of globals numpy needs
to rebuild arrays, dtypes and scalars (under both numpy 1.x's `numpy.core` and numpy 2's `numpy._core` module
names) plus a few inert builtins, and refuses any other global before it can be called.

Per-sample lengths come, in order of preference, from the file's `{m}_lengths`, from the BERT attention mask
(text always; audio and vision only when the file is aligned, where every modality follows the token grid),
or from the trailing all-zero rows of the padded features. Which rule applied is recorded in `info`.
"""

from __future__ import annotations

import _compat_pickle
import builtins
import codecs
import pickle
from pathlib import Path
from typing import Any

import numpy as np
from numpy._core.multiarray import _reconstruct, scalar
from numpy._core.numeric import _frombuffer

from mdkat import MODALITIES
from mdkat.config import DataConfig
from mdkat.data.prepared import SPLITS, DataError, SplitArrays, check_labels
from mdkat.io import sha256_file
from mdkat.redact import redact

LABEL_KEY = "regression_labels"
MASK_KEY = "text_bert"
RULE_GIVEN = "{m}_lengths"
RULE_MASK = "text_bert attention mask"
RULE_ZEROS = "trailing zero rows"


def _allowed_globals() -> dict[tuple[str, str], Any]:
    # Resolving through a fixed table means no module is ever imported on the file's say-so, and an old
    # `numpy.core` name maps to the numpy 2 object without touching the deprecated `numpy.core` package.
    table: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # protocol 2 stores bytes (array buffers included) as `_codecs.encode(text, 'latin1')`
        ("_codecs", "encode"): codecs.encode,
    }
    for name in ("set", "frozenset", "bytearray", "bytes", "complex", "slice"):
        table["builtins", name] = getattr(builtins, name)
    for core in ("numpy._core", "numpy.core"):
        for module in ("multiarray", "_multiarray_umath"):
            table[f"{core}.{module}", "_reconstruct"] = _reconstruct
            table[f"{core}.{module}", "scalar"] = scalar
            table[f"{core}.{module}", "ndarray"] = np.ndarray
            table[f"{core}.{module}", "dtype"] = np.dtype
        # protocol 5 pickles of contiguous arrays rebuild them from a raw buffer
        table[f"{core}.numeric", "_frombuffer"] = _frombuffer
    return table


_ALLOWED = _allowed_globals()


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, where: str):
        super().__init__(file)
        self._where = where

    def find_class(self, module: str, name: str) -> Any:
        # Overriding find_class bypasses pickle's own mapping of the Python 2 names that protocol-2 files
        # carry (`__builtin__.set`, `commands.Popen`); apply it here so the lookup and the error message
        # both see the Python 3 name. Mapping is only a rename: the result still has to be in the table.
        written = f"{module}.{name}"
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[module, name]
        else:
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        try:
            return _ALLOWED[module, name]
        except KeyError:
            shown = f"'{module}.{name}'" + (
                f" (written as '{written}')" if written != f"{module}.{name}" else ""
            )
            raise DataError(
                f"{self._where}: refused to load global {shown}: only numpy arrays, dtypes, scalars and "
                "plain containers are allowed in a data pickle (the file may be malicious or not MMSA data)"
            ) from None


def safe_load_pickle(path: str | Path) -> object:
    """Unpickle `path` admitting only numpy arrays, dtypes, scalars and builtin containers."""
    path = Path(path)
    try:
        f = path.open("rb")
    except FileNotFoundError:
        raise DataError(f"{path}: MMSA pickle not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot open: {e}") from None
    with f:
        try:
            return _RestrictedUnpickler(f, str(path)).load()
        # A damaged stream surfaces as whichever error the opcode that hit the damage raises.
        except (
            pickle.UnpicklingError,
            EOFError,
            ValueError,
            TypeError,
            IndexError,
            KeyError,
            AttributeError,
            OverflowError,
        ) as e:
            raise DataError(f"{path}: truncated or corrupt pickle ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------------------------------------------
# conversion


def _trailing_zero_lengths(x: np.ndarray) -> np.ndarray:
    """Per sample, the index of the last time step with any non-zero value plus one (0 if all zero)."""
    n, t, d = x.shape
    out = np.empty(n, dtype=np.int64)
    # In chunks: a full (N, T, d) boolean of MOSEI text would be another ~0.6 GB.
    step = max(1, (1 << 24) // max(1, t * d))
    for start in range(0, n, step):
        nonzero = (x[start : start + step] != 0).any(axis=2)  # (n_chunk, T); NaN and inf count as data
        last_from_end = np.argmax(nonzero[:, ::-1], axis=1)
        out[start : start + step] = np.where(nonzero.any(axis=1), t - last_from_end, 0)
    return out


def _given_lengths(value: Any, where: str, split: str, key: str) -> np.ndarray:
    lengths = np.asarray(value)
    if lengths.ndim != 1 or lengths.dtype.kind not in "iuf":
        raise DataError(
            f"{where}: split '{split}' key '{key}': expected a vector of integers, "
            f"got {lengths.dtype} {lengths.shape}"
        )
    if lengths.dtype.kind == "f" and not (
        np.isfinite(lengths).all() and (lengths == np.round(lengths)).all()
    ):
        raise DataError(f"{where}: split '{split}' key '{key}': lengths must be whole numbers")
    return lengths.astype(np.int64)


def _sample_count(value: Any, where: str, split: str, key: str) -> int:
    """How many samples a per-sample entry holds; a single value (a 0-d array, a number) is refused."""
    try:
        return len(value)
    except TypeError:
        raise DataError(
            f"{where}: split '{split}' key '{key}': expected one entry per sample, got a single "
            f"{type(value).__name__}"
        ) from None


def _mask_lengths(text_bert: np.ndarray, t_text: int, where: str, split: str) -> np.ndarray:
    if text_bert.ndim != 3 or text_bert.shape[1] != 3 or text_bert.shape[2] != t_text:
        raise DataError(
            f"{where}: split '{split}' key '{MASK_KEY}': expected shape (N, 3, {t_text}) (token ids, "
            f"attention mask, segment ids over the text steps), got {text_bert.shape}"
        )
    mask = text_bert[:, 1, :]  # (N, T_text)
    if not np.isin(mask, (0, 1)).all():
        raise DataError(
            f"{where}: split '{split}' key '{MASK_KEY}': row 1 should be the 0/1 attention mask, "
            "found other values"
        )
    return mask.sum(axis=1).astype(np.int64)


def _split_arrays(raw: Any, split: str, where: str) -> tuple[SplitArrays, dict[str, Any]]:
    """One MMSA split as prepared arrays, plus what was learnt about it (rules, clipping counts)."""
    if not isinstance(raw, dict):
        raise DataError(f"{where}: split '{split}' should be a dict of arrays, got {type(raw).__name__}")
    for key in (*MODALITIES, LABEL_KEY):
        if key not in raw:
            raise DataError(f"{where}: split '{split}': missing key '{key}' (keys present: {sorted(raw)})")

    features = {m: np.asarray(raw[m]) for m in MODALITIES}
    for m, x in features.items():
        if x.ndim != 3:
            raise DataError(
                f"{where}: split '{split}' key '{m}': expected rank 3 (N, T, d), got shape {x.shape}"
            )
        if x.dtype.kind not in "biuf":
            raise DataError(f"{where}: split '{split}' key '{m}': expected numbers, got dtype {x.dtype}")
    label = np.asarray(raw[LABEL_KEY])
    if not (label.ndim == 1 or (label.ndim == 2 and label.shape[1] == 1)) or label.dtype.kind not in "biuf":
        raise DataError(
            f"{where}: split '{split}' key '{LABEL_KEY}': expected numbers of shape (N,) or (N, 1), "
            f"got {label.dtype} {label.shape}"
        )

    # Every per-sample array present must agree on N, or samples would be silently paired with others' data.
    optional = [k for k in ("id", MASK_KEY, *(f"{m}_lengths" for m in MODALITIES)) if k in raw]
    counts = {
        k: len(features[k]) if k in features else _sample_count(raw[k], where, split, k)
        for k in (*MODALITIES, LABEL_KEY, *optional)
    }
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{k} {c}" for k, c in counts.items())
        raise DataError(f"{where}: split '{split}': sample counts differ between keys: {listed}")
    n = counts[LABEL_KEY]
    if n == 0:
        raise DataError(f"{where}: split '{split}' is empty (0 samples in '{LABEL_KEY}')")

    steps = {m: features[m].shape[1] for m in MODALITIES}
    aligned = len(set(steps.values())) == 1
    mask_lengths = (
        _mask_lengths(np.asarray(raw[MASK_KEY]), steps["text"], where, split) if MASK_KEY in raw else None
    )

    arrays: SplitArrays = {}
    facts: dict[str, Any] = {"aligned": aligned, "rule": {}, "raised_to_1": {}, "lowered_to_T": {}}
    for m in MODALITIES:
        given_key = RULE_GIVEN.format(m=m)
        if given_key in raw:
            lengths, rule = _given_lengths(raw[given_key], where, split, given_key), given_key
        elif mask_lengths is not None and (m == "text" or aligned):
            lengths, rule = mask_lengths, RULE_MASK
        else:
            lengths, rule = _trailing_zero_lengths(features[m]), RULE_ZEROS
        # An all-zero sample still needs one step for attention to have a key to attend to.
        facts["raised_to_1"][m] = int((lengths < 1).sum())
        facts["lowered_to_T"][m] = int((lengths > steps[m]).sum())
        facts["rule"][m] = rule
        arrays[m] = features[m].astype(np.float32, copy=False)
        arrays[f"{m}_len"] = np.clip(lengths, 1, steps[m]).astype(np.int64)

    arrays["label"] = label.reshape(n).astype(np.float32)
    if MASK_KEY in raw:  # the word pieces themselves, for a fine-tuned BERT (model.text_encoder: bert)
        text_bert = np.asarray(raw[MASK_KEY]).astype(np.int64)  # (N, 3, T_text), checked above
        arrays["text_ids"], arrays["text_mask"], arrays["text_segment"] = (
            np.ascontiguousarray(text_bert[:, i]) for i in range(3)
        )
    if "id" in raw:
        ids = np.asarray(raw["id"])
        if ids.ndim != 1:
            raise DataError(f"{where}: split '{split}' key 'id': expected shape ({n},), got {ids.shape}")
        if ids.dtype.kind == "S":
            ids = np.char.decode(ids, "utf-8")
        elif ids.dtype.kind == "O":
            ids = np.array([v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in ids])
        arrays["id"] = ids.astype(str)
        facts["ids_generated"] = False
    else:
        arrays["id"] = np.array([f"{split}_{i}" for i in range(n)])
        facts["ids_generated"] = True
    check_labels(arrays["label"], arrays["id"], split, where, LABEL_KEY)
    return arrays, facts


def from_mmsa(data: dict, where: str) -> tuple[dict[str, SplitArrays], dict]:
    """Convert a loaded MMSA dict to prepared splits and `info` (`aligned`, where lengths came from)."""
    if not isinstance(data, dict):
        raise DataError(f"{where}: expected a dict of splits at the top level, got {type(data).__name__}")
    splits: dict[str, SplitArrays] = {}
    facts: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        if split not in data:
            raise DataError(f"{where}: missing split '{split}' (top-level keys: {sorted(map(str, data))})")
        splits[split], facts[split] = _split_arrays(data[split], split, where)

    # A file is aligned or not as a whole, and a length rule that changed between splits would give train and
    # test different notions of padding: both must hold for every split alike.
    first = splits[SPLITS[0]]
    for split in SPLITS[1:]:
        for m in MODALITIES:
            if splits[split][m].shape[1:] != first[m].shape[1:]:
                raise DataError(
                    f"{where}: split '{split}' key '{m}': shape (T, d) = {splits[split][m].shape[1:]} "
                    f"differs from {SPLITS[0]}'s {first[m].shape[1:]}"
                )
            if facts[split]["rule"][m] != facts[SPLITS[0]]["rule"][m]:
                raise DataError(
                    f"{where}: split '{split}' key '{m}': lengths come from {facts[split]['rule'][m]!r} "
                    f"but in {SPLITS[0]} from {facts[SPLITS[0]]['rule'][m]!r}; the splits must carry the "
                    "same keys"
                )

    info = {
        "aligned": facts[SPLITS[0]]["aligned"],
        "lengths_from": dict(facts[SPLITS[0]]["rule"]),
        "lengths_raised_to_1": {s: facts[s]["raised_to_1"] for s in SPLITS},
        "lengths_lowered_to_T": {s: facts[s]["lowered_to_T"] for s in SPLITS},
        "ids_generated": [s for s in SPLITS if facts[s]["ids_generated"]],
    }
    return splits, info


# ---------------------------------------------------------------------------------------------------------
# loading


def _resolve(cfg: DataConfig) -> tuple[Path, str, str | None]:
    """The local pickle `cfg` names, verified; returns (path, sha256, url it came from or None)."""
    expected = cfg.sha256.strip().lower() if cfg.sha256 else None
    if cfg.path:
        # A local path wins over an URL: it is how a user points at a copy fetched by other means.
        path = Path(cfg.path)
        if not path.is_file():
            raise DataError(f"{path}: MMSA pickle not found (data.path)")
        actual = sha256_file(path)
        if expected is not None and actual != expected:
            raise DataError(
                f"{path}: SHA-256 mismatch: expected {expected} (data.sha256), got {actual}; the file is "
                "damaged or is not the file the digest belongs to"
            )
        return path, actual, None
    if cfg.url:
        if expected is None:
            raise DataError(
                f"data.url {redact(cfg.url)}: data.sha256 must also be set to the file's published SHA-256 "
                "(the README lists them); an unverified download is never used"
            )
        from mdkat.data.download import download

        # MOSI and MOSEI files share the names aligned_50.pkl / unaligned_50.pkl: one folder per corpus
        # keeps switching corpora from overwriting (and re-downloading) the other's file.
        result = download(
            cfg.url,
            Path(cfg.cache_dir) / "mmsa" / cfg.dataset,
            sha256=expected,
            retries=cfg.download_retries,
            timeout_s=cfg.download_timeout_s,
        )
        return Path(result.path), result.sha256, cfg.url
    raise DataError(
        "data.source is 'mmsa' but neither data.path (a local aligned_50.pkl / unaligned_50.pkl) nor "
        "data.url (with data.sha256) is set: set data.path or data.url"
    )


def load_mmsa(cfg: DataConfig) -> tuple[dict[str, SplitArrays], dict]:
    """Read the MMSA pickle at `cfg.path` or `cfg.url` (checked against `cfg.sha256`) into prepared splits."""
    path, digest, url = _resolve(cfg)
    splits, info = from_mmsa(safe_load_pickle(path), str(path))
    info = {
        "source": "mmsa",
        "dataset": cfg.dataset,
        **info,
        "provenance": {"file": path.name, "sha256": digest, "url": redact(url)},
    }
    return splits, info
