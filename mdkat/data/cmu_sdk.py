"""The `cmu-sdk` source: raw CMU-MultimodalSDK computational sequences, word-aligned by us.

The SDK's recipe, reproduced with our vectorised `align`: average audio and vision frames over each word
(`align(words, collapse_functions=[mean])`), give words without frames zeros (`impute`), cut the word
stream into the labelled segments (`align(labels)` + `hard_unify`), split by the SDK's standard folds,
and keep the first `data.seq_len` words of each segment (zero padding after). Text features are the
SDK's 300-d word vectors. NaN/inf (MOSEI's COVAREP has -inf rows, which the mean spreads) are zeroed
afterwards by `write_prepared`, as MMSA's loader does.

The CMU server is often down: every download failure says so and names the `mmsa` alternative. The
files come from `data.csd_dir` when given (no network), else from `data.base_url` into `data.cache_dir`.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import numpy as np
from tqdm import tqdm

from mdkat import MODALITIES
from mdkat.config import DataConfig
from mdkat.data.align import align, video_of
from mdkat.data.csd import read_csd
from mdkat.data.prepared import SPLITS, DataError, SplitArrays, check_labels
from mdkat.io import sha256_file
from mdkat.redact import redact

# relative to data.base_url (http://immortal.multicomp.cs.cmu.edu/)
CSD_FILES = {
    "mosi": {
        "text": "CMU-MOSI/language/CMU_MOSI_TimestampedWordVectors.csd",
        "audio": "CMU-MOSI/acoustic/CMU_MOSI_COVAREP.csd",
        "vision": "CMU-MOSI/visual/CMU_MOSI_Visual_Facet_41.csd",
        "labels": "CMU-MOSI/labels/CMU_MOSI_Opinion_Labels.csd",
        "words": "CMU-MOSI/language/CMU_MOSI_TimestampedWords.csd",  # read only with data.tokenizer
    },
    "mosei": {
        "text": "CMU-MOSEI/language/CMU_MOSEI_TimestampedWordVectors.csd",
        "audio": "CMU-MOSEI/acoustic/CMU_MOSEI_COVAREP.csd",
        "vision": "CMU-MOSEI/visual/CMU_MOSEI_VisualFacet42.csd",
        "labels": "CMU-MOSEI/labels/CMU_MOSEI_Labels.csd",
        "words": "CMU-MOSEI/language/CMU_MOSEI_TimestampedWords.csd",
    },
}
# MOSI's customary feature subsets (5-d audio, 20-d vision), as in the MMSA pickles
MOSI_COLUMNS = {
    "audio": [1, 3, 6, 25, 60],
    "vision": [0, 2, 5, 10, 11, 12, 14, 17, 20, 21, 22, 24, 25, 29, 30, 31, 32, 36, 37, 40],
}
WORD_INDEX = "word_index"  # the alignment's name for the words' positions
PAUSE = "sp"  # the SDK's word for a pause
SERVER_HINT = (
    "The CMU server is often down. Alternatively use the field's preprocessed pickles: "
    "-S data.source=mmsa -S data.path=PATH/TO/aligned_50.pkl (or data.url=... with data.sha256=<published "
    "SHA-256>), or put the .csd files in a folder and set -S data.csd_dir=FOLDER."
)


def standard_folds(dataset: str) -> dict[str, str]:
    """video id -> split ('train', 'valid', 'test') of the SDK's standard folds."""
    folds = json.loads(resources.files("mdkat.data").joinpath("folds", f"{dataset}.json").read_text())[
        "folds"
    ]
    return {video: split for split in SPLITS for video in folds[split]}


def _needed(cfg: DataConfig) -> dict[str, str]:
    """The .csd files this configuration reads: the words only when they are tokenised."""
    return {n: rel for n, rel in CSD_FILES[cfg.dataset].items() if n != "words" or cfg.tokenizer is not None}


def _locate(cfg: DataConfig) -> dict[str, dict[str, Any]]:
    """name -> {"path", "sha256", "url"} of the needed .csd files, local or downloaded."""
    files = {}
    if cfg.csd_dir is not None:
        for name, rel in _needed(cfg).items():
            path = Path(cfg.csd_dir) / Path(rel).name
            if not path.is_file():
                raise DataError(
                    f"{path}: not found (data.csd_dir must hold the {cfg.dataset} file {Path(rel).name})"
                )
            files[name] = {"path": path, "sha256": sha256_file(path), "url": None}
        return files

    from mdkat.data.download import DownloadError, download

    for name, rel in _needed(cfg).items():
        url = urljoin(cfg.base_url if cfg.base_url.endswith("/") else cfg.base_url + "/", rel)
        try:
            got = download(
                url,
                Path(cfg.cache_dir) / cfg.dataset,
                retries=cfg.download_retries,
                timeout_s=cfg.download_timeout_s,
            )
        except DownloadError as e:
            raise DataError(f"{e}\n{SERVER_HINT}") from None
        files[name] = {"path": got.path, "sha256": got.sha256, "url": redact(url)}
    return files


def _pad(rows: list[np.ndarray], steps: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Stack variable-length (n_i, d) sequences into (N, steps, d), keeping each one's first `steps` rows."""
    out = np.zeros((len(rows), steps, dim), dtype=np.float32)  # (N, T, d)
    lengths = np.array([min(len(r), steps) for r in rows], dtype=np.int64)
    for i, (r, n) in enumerate(zip(rows, lengths, strict=True)):
        out[i, :n] = r[:n]
    return out, lengths


def load_cmu_sdk(cfg: DataConfig) -> tuple[dict[str, SplitArrays], dict[str, Any]]:
    """Read (or download), word-align and split the CMU SDK files of `cfg.dataset`."""
    if cfg.seq_len < 1:
        raise DataError(f"data.seq_len: expected a positive integer, got {cfg.seq_len}")
    files = _locate(cfg)
    sequences = {}
    for name in tqdm([*MODALITIES, "labels"], desc=f"reading {cfg.dataset} .csd", unit="file"):
        sequences[name] = read_csd(files[name]["path"])
    if cfg.dataset == "mosi" and cfg.mosi_feature_subset:
        for m, columns in MOSI_COLUMNS.items():
            sequences[m] = {
                video: (intervals, _columns(features, columns, files[m]["path"]))
                for video, (intervals, features) in sequences[m].items()
            }

    words = align({m: sequences[m] for m in MODALITIES}, "text")
    cut = {**words, "labels": sequences["labels"]}
    if cfg.tokenizer is not None:
        # each word's position in its video, cut into segments exactly as the word vectors are
        spoken = read_csd(files["words"]["path"])
        cut[WORD_INDEX] = {
            video: (intervals, np.arange(len(intervals), dtype=np.float64)[:, None])
            for video, (intervals, _) in spoken.items()
        }
    segments = align(cut, "labels", collapse=None, impute=False)

    tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer is not None else None
    fold_of = standard_folds(cfg.dataset)
    keys = {s: [] for s in SPLITS}
    outside = 0
    for key in segments["labels"]:
        split = fold_of.get(video_of(key))
        if split is None:
            outside += 1
        else:
            keys[split].append(key)

    splits = {}
    for split in SPLITS:
        if not keys[split]:
            raise DataError(f"{files['labels']['path']}: no labelled segment of the standard '{split}' fold")
        arrays: SplitArrays = {}
        for m in MODALITIES:
            dim = next(iter(segments[m].values()))[1].shape[1]
            rows = [segments[m][k][1] for k in keys[split]]
            arrays[m], arrays[f"{m}_len"] = _pad(rows, cfg.seq_len, dim)
        # the sentiment score is the first label column (MOSEI adds six emotions after it)
        arrays["label"] = np.array([segments["labels"][k][1][0, 0] for k in keys[split]], dtype=np.float32)
        arrays["id"] = np.array(keys[split])
        if cfg.tokenizer is not None:
            texts = [segment_text(spoken, k, segments[WORD_INDEX][k][1]) for k in keys[split]]
            arrays.update(word_pieces(tokenizer, texts, cfg.seq_len))
        check_labels(arrays["label"], arrays["id"], split, str(files["labels"]["path"]), "sentiment")
        splits[split] = arrays

    info = {
        "source": "cmu-sdk",
        "dataset": cfg.dataset,
        "aligned": True,
        "source_files": {name: {**f, "path": str(f["path"])} for name, f in files.items()},
        "segments_outside_folds": outside,
        "mosi_feature_subset": cfg.dataset == "mosi" and cfg.mosi_feature_subset,
    }
    return splits, info


def load_tokenizer(folder: str):
    """The tokenizer of a local BERT checkpoint folder (`data.tokenizer`); never a download."""
    from transformers import AutoTokenizer  # slow to import: only data that are tokenised pay for it

    if not Path(folder).is_dir():
        raise DataError(
            f"data.tokenizer: {folder}: not a folder (a local BERT checkpoint with its tokenizer)"
        )
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise DataError(f"data.tokenizer: {folder}: no loadable tokenizer ({e})") from None


def segment_text(spoken: dict[str, tuple[np.ndarray, np.ndarray]], key: str, index: np.ndarray) -> str:
    """The words of segment `key` (their positions `index` (n, 1) in the video), joined by spaces; the SDK's
    pause marker `sp` is left out, as the field's transcripts do."""
    stored = spoken[video_of(key)][1][index[:, 0].astype(np.int64), 0]
    words = [w.decode() if isinstance(w, bytes) else str(w) for w in stored]
    return " ".join(w for w in words if w != PAUSE)


def word_pieces(tokenizer, texts: list[str], steps: int) -> SplitArrays:
    """`text_ids`, `text_mask`, `text_segment` (N, steps) int64: [CLS] pieces [SEP], cut and padded to
    `steps` (the layout of the MMSA pickles' `text_bert`)."""
    encoded = tokenizer(
        texts, max_length=steps, padding="max_length", truncation=True, return_token_type_ids=True
    )
    return {
        "text_ids": np.asarray(encoded["input_ids"], dtype=np.int64),
        "text_mask": np.asarray(encoded["attention_mask"], dtype=np.int64),
        "text_segment": np.asarray(encoded["token_type_ids"], dtype=np.int64),
    }


def _columns(features: np.ndarray, columns: list[int], path: Path) -> np.ndarray:
    if features.ndim != 2 or features.shape[1] <= max(columns):
        raise DataError(
            f"{path}: MOSI feature subset needs at least {max(columns) + 1} columns, "
            f"got shape {features.shape} (set -S data.mosi_feature_subset=false to keep all columns)"
        )
    return features[:, columns]
