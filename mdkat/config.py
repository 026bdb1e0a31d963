"""`params.yaml`, read once into frozen dataclasses.

Every key the pipeline reads is declared here with its type, and nowhere else has a default: the values
live in `params.yaml` (the single source of truth that DVC tracks). Loading rejects unknown keys, missing
keys and wrong types with a message naming the file and the dotted key. `-S section.key=value` overrides
use the syntax of `dvc exp run -S`: the value is parsed as a YAML scalar (`3`, `1e-4`, `true`, `null`).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from mdkat.errors import MdkatError


class ConfigError(MdkatError):
    """A parameter file or override that does not match the declared schema."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class PerModality:
    """One integer per named modality (feature dims, sequence lengths)."""

    text: int
    audio: int
    vision: int


@dataclass(frozen=True)
class UnalignedLengths:
    """Audio and vision steps of unaligned data; text keeps `data.seq_len` steps (one per token)."""

    audio: int
    vision: int


@dataclass(frozen=True)
class SyntheticConfig:
    """The synthetic data generator (see `mdkat.data.synthetic`)."""

    n_train: int
    n_valid: int
    n_test: int
    dims: PerModality
    aligned: bool
    unaligned_len: UnalignedLengths


@dataclass(frozen=True)
class DataConfig:
    """Where the data comes from and how it is shaped (`prepare` stage)."""

    source: Literal["synthetic", "mmsa", "cmu-sdk"]
    dataset: Literal["mosi", "mosei"]
    seed: int
    seq_len: int
    path: str | None
    url: str | None
    sha256: str | None
    base_url: str
    csd_dir: str | None
    cache_dir: str
    mosi_feature_subset: bool
    download_retries: int
    download_timeout_s: float
    synthetic: SyntheticConfig


@dataclass(frozen=True)
class ModalityFloats:
    """One number per named modality (dropout rates)."""

    text: float
    audio: float
    vision: float


@dataclass(frozen=True)
class ModelConfig:
    """The network (`mdkat.models`): sizes, module switches for ablations, module hyper-parameters."""

    name: str  # a key of mdkat.models.REGISTRY
    width: int
    heads: int
    layers: int
    conv_kernel: PerModality
    input_dropout: ModalityFloats
    dropout: float
    amsa_threshold: float
    ka_temperature: float
    kt_temperature: float
    kt_momentum: float
    use_cff: bool
    use_amsa: bool
    use_ka: bool
    use_kt: bool
    use_decoupling: bool


@dataclass(frozen=True)
class LossConfig:
    """Weights of the loss terms next to the task L1 (weight 1): what Optuna tunes."""

    unimodal: float
    rec: float
    orth: float
    ka: float
    kt: float


@dataclass(frozen=True)
class TrainConfig:
    """The training loop (`mdkat.training.fit`)."""

    seed: int
    device: Literal["auto", "cpu", "cuda"]
    epochs: int
    batch_size: int
    eval_batch_size: int
    lr: float
    weight_decay: float
    grad_clip: float
    lr_patience: int
    lr_factor: float
    patience: int
    select_on: str  # a key of mdkat.metrics.regression_metrics


@dataclass(frozen=True)
class MlflowConfig:
    """Where runs are recorded (the tracking URI comes from MLFLOW_TRACKING_URI, see mdkat.tracking)."""

    experiment: str


@dataclass(frozen=True)
class SearchRange:
    """One tuned parameter: a dotted key of this file and its range."""

    key: str
    low: float
    high: float
    log: bool


@dataclass(frozen=True)
class TuneConfig:
    """The Optuna study over the loss weights (`mdkat.tuning`)."""

    study_name: str  # a short hash of everything the objective depends on is appended
    storage: str  # sqlite:///optuna.db | journal:PATH | an RDB URL such as postgresql://...
    n_trials: int
    timeout_s: float | None
    epochs: int  # per trial
    metric: str  # validation metric to optimise (a key of mdkat.metrics.regression_metrics)
    seed: int
    pruner: Literal["median", "hyperband", "none"]
    heartbeat_s: int  # RDB storages: a trial whose worker is silent this long is failed
    space: tuple[SearchRange, ...]


@dataclass(frozen=True)
class ReportBudget:
    """Shorter training for the report's many runs; null keeps the `train` section's value."""

    epochs: int | None
    patience: int | None


@dataclass(frozen=True)
class ReportConfig:
    """The ablation and multi-seed report (`mdkat.report`)."""

    variants: tuple[str, ...]  # keys of mdkat.models.ABLATIONS
    seeds: tuple[int, ...]  # train.seed of each run; the data stay the same
    budget: ReportBudget
    alpha: float  # significance level of the paired tests


@dataclass(frozen=True)
class Tolerances:
    """How much worse than the baseline each test metric may get before CI fails (absolute)."""

    mae: float
    corr: float
    acc7: float
    acc5: float
    acc2_has0: float
    f1_has0: float
    acc2_non0: float
    f1_non0: float


@dataclass(frozen=True)
class CiConfig:
    """The CI profile (`mdkat.ci`): the real stages on a small problem, checked against a baseline."""

    overrides: tuple[str, ...]  # `key=value`, as `-S`: what turns this file into the CI profile
    baseline: str  # the committed test metrics of the CI profile, relative to the project root
    tolerance: Tolerances


@dataclass(frozen=True)
class Params:
    """Everything in `params.yaml`."""

    data: DataConfig
    model: ModelConfig
    loss: LossConfig
    train: TrainConfig
    mlflow: MlflowConfig
    tune: TuneConfig
    report: ReportConfig
    ci: CiConfig


# ---------------------------------------------------------------------------------------------------------
# loading


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` as a string; researchers (and `dvc exp run -S`) mean a float, as in YAML 1.2."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _read_yaml(path: Path, what: str) -> Any:
    try:
        return _yaml(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None


def read_best(path: str | Path) -> dict[str, Any]:
    """The tuned values of a `--best` file: `{params: {dotted.key: value}, metric, value, trial, ...}`."""
    path = Path(path)
    best = _read_yaml(path, "file of tuned values")
    if not isinstance(best, dict) or not isinstance(best.get("params"), dict):
        raise ConfigError(f"{path}: expected a mapping with a 'params' mapping of dotted keys to values")
    for key in best["params"]:
        _check_key_exists(Params, str(key), f"{path} (params)")
    return best


def load_params(
    path: str | Path = "params.yaml", overrides: typing.Sequence[str] = (), best: str | Path | None = None
) -> Params:
    """Read `path`, apply the tuned values of `best`, then `-S key=value` overrides; validate into `Params`.

    Precedence, lowest first: the parameter file, the `best` file, the overrides.
    """
    path = Path(path)
    raw = _read_yaml(path, "parameter file")
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: expected a mapping of sections at the top level, got {type(raw).__name__}"
        )
    by_key = {}
    if best is not None:
        for key, value in read_best(best)["params"].items():
            set_dotted(raw, key, value, f"{best} (params)")
            by_key[key] = f"{key}={value!r} from {best}"
    for item in overrides:
        key, value = parse_override(item)
        _check_key_exists(Params, key, f"override -S {item}")
        set_dotted(raw, key, value, f"{path} (override -S {item})")
        by_key[key] = f"-S {item}"
    try:
        params = from_mapping(Params, raw, str(path))
        _check_choices(params, str(path))
    except ConfigError as e:
        if e.key in by_key:
            raise ConfigError(f"{e} (set by {by_key[e.key]})", e.key) from None
        raise
    return params


def _check_choices(params: Params, file: str) -> None:
    # Choices that a registry defines are checked against the registry itself, never a copy of its keys.
    from mdkat.metrics import METRIC_NAMES
    from mdkat.models import ABLATIONS, REGISTRY

    for key, value, choices in (
        ("model.name", params.model.name, sorted(REGISTRY)),
        ("train.select_on", params.train.select_on, list(METRIC_NAMES)),
        ("tune.metric", params.tune.metric, list(METRIC_NAMES)),
    ):
        if value not in choices:
            raise ConfigError(f"{file}: '{key}' expected one of {choices}, got {value!r}", key)
    flat = to_flat_dict(params)
    for i, item in enumerate(params.tune.space):
        where = f"{file}: 'tune.space[{i}]'"
        if not isinstance(flat.get(item.key), float):
            raise ConfigError(f"{where}: key {item.key!r} is not a numeric (float) parameter", "tune.space")
        valid = 0 < item.low < item.high if item.log else item.low < item.high
        if not valid:
            raise ConfigError(f"{where}: expected low < high (and low > 0 on a log scale)", "tune.space")
    for variant in params.report.variants:
        if variant not in ABLATIONS:
            raise ConfigError(
                f"{file}: 'report.variants' expected items of {sorted(ABLATIONS)}, got {variant!r}",
                "report.variants",
            )
    for item in params.ci.overrides:
        key, _value = parse_override(item)
        _check_key_exists(Params, key, f"{file}: 'ci.overrides' item {item!r}")


def parse_override(item: str) -> tuple[str, Any]:
    """Split `a.b=value` into the dotted key and the value parsed as a YAML scalar."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected the form section.key=value")
    try:
        value = _yaml(text) if text.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not a YAML scalar: {e}") from None
    return key, value


def set_dotted(raw: dict, key: str, value: Any, where: str) -> None:
    """Set `raw[a][b]... = value` for the dotted key `a.b...`, creating sections; `where` names the source."""
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: '{'.'.join(parts[: i + 1])}' is not a section")
        node = child
    node[parts[-1]] = value


def _check_key_exists(cls: type, key: str, where: str) -> None:
    hints = typing.get_type_hints(cls)
    for i, part in enumerate(key.split(".")):
        if not (dataclasses.is_dataclass(cls) and part in hints):
            prefix = ".".join(key.split(".")[:i])
            known = ", ".join(sorted(hints)) if dataclasses.is_dataclass(cls) else "(not a section)"
            raise ConfigError(f"{where}: unknown key '{key}' ('{prefix or '<top>'}' has: {known})")
        cls = hints[part]
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}


def from_mapping(cls: type, raw: Any, file: str, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, checking every key and type; errors name `file` and the key."""
    where = prefix.rstrip(".") or "<top>"
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: '{where}' must be a mapping, got {_describe(raw)}", prefix.rstrip("."))
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ConfigError(
            f"{file}: unknown key '{prefix}{unknown[0]}' (allowed in '{where}': {', '.join(names)})",
            f"{prefix}{unknown[0]}",
        )
    missing = [n for n in names if n not in raw]
    if missing:
        raise ConfigError(f"{file}: missing key '{prefix}{missing[0]}'", f"{prefix}{missing[0]}")
    values = {n: _convert(hints[n], raw[n], file, f"{prefix}{n}") for n in names}
    return cls(**values)


def _convert(tp: Any, value: Any, file: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_mapping(tp, value, file, key + ".")
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in (o for o in options if o is not type(None)):
            try:
                return _convert(option, value, file, key)
            except ConfigError:
                continue
        raise ConfigError(f"{file}: '{key}' expected {_type_name(tp)}, got {_describe(value)}", key)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{file}: '{key}' expected one of {list(allowed)}, got {_describe(value)}", key)
        return value
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(
                f"{file}: '{key}' expected a list of {_type_name(item_tp)}, got {_describe(value)}", key
            )
        return tuple(_convert(item_tp, v, file, f"{key}[{i}]") for i, v in enumerate(value))
    # bool is a subclass of int in Python; `true` where a number is expected is a mistake, not 1.
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif tp is str:
        ok = isinstance(value, str)
    else:  # pragma: no cover - a schema bug, not a user error
        raise TypeError(f"unsupported parameter type {tp!r} for {key}")
    if not ok:
        raise ConfigError(f"{file}: '{key}' expected {_type_name(tp)}, got {_describe(value)}", key)
    return value


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(t) for t in typing.get_args(tp))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if value is not None else "null"


def to_flat_dict(obj: Any, prefix: str = "") -> dict[str, Any]:
    """`{'data.seed': 1111, ...}`: a dataclass tree as dotted keys (for logging and hashing)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(to_flat_dict(value, f"{prefix}{f.name}."))
        elif isinstance(value, tuple) and value and dataclasses.is_dataclass(value[0]):
            for i, item in enumerate(value):
                out.update(to_flat_dict(item, f"{prefix}{f.name}.{i}."))
        else:
            out[f"{prefix}{f.name}"] = list(value) if isinstance(value, tuple) else value
    return out


def with_values(params: Params, values: typing.Mapping[str, Any], where: str = "with_values") -> Params:
    """A copy of `params` with dotted keys set to `values`, validated like the file itself."""
    raw = dataclasses.asdict(params)
    for key, value in values.items():
        _check_key_exists(Params, key, where)
        set_dotted(raw, key, value, where)
    result = from_mapping(Params, raw, where)
    _check_choices(result, where)
    return result
