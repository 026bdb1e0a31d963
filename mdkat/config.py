"""`params.yaml`, read once into a frozen, validated schema (pydantic, strict).

Every key the pipeline reads is declared here with its type and range, and nowhere else has a default: the
values live in `params.yaml` (the single source of truth that DVC tracks). Loading rejects unknown keys,
missing keys, wrong types and out-of-range values with a message naming the file and the dotted key (and,
for a value set by `-S` or a `--best` file, where it came from). `-S section.key=value` overrides use the
syntax of `dvc exp run -S`: the value is parsed as a YAML scalar (`3`, `1e-4`, `true`, `null`).

This module knows keys, types and ranges, not the registries: `model.<name>` sections are kept as plain
mappings here and validated by the model's own config type, and choices such as `model.name`,
`data.source` or `report.variants` are checked by the registry that defines them
(`mdkat.models.check_params`, `mdkat.data.sources.check_params`), before any work starts. So reading the
parameters imports neither torch nor any model.
"""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, ValidationError

from mdkat import MODALITIES
from mdkat.errors import MdkatError
from mdkat.metrics import METRIC_NAMES


class ConfigError(MdkatError):
    """A parameter file or override that does not match the declared schema."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


class Section(BaseModel):
    """A frozen part of the parameters: strict types, no unknown keys."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


def _list_to_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value  # YAML has lists; frozen sections hold tuples


T = typing.TypeVar("T")

# keys added after results were committed: left unset (None), such a key changes nothing a run did, so it
# stays out of every identity (a run's parameters, its data's manifest) and those results keep theirs
ADDED_UNSET = ("data.tokenizer",)
Items = Annotated[tuple[T, ...], BeforeValidator(_list_to_tuple)]
Positive = Annotated[int, Field(gt=0)]
NonNegative = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Probability = Annotated[float, Field(ge=0, lt=1)]  # dropout rates, momenta: 1 would switch everything off
MetricName = Literal[METRIC_NAMES]


class PerModality(Section):
    """One positive integer per named modality (feature dims, sequence lengths, kernels)."""

    text: Positive
    audio: Positive
    vision: Positive


class PerModalityCount(Section):
    """One non-negative integer per named modality (0 switches a per-modality option off)."""

    text: NonNegative
    audio: NonNegative
    vision: NonNegative


class PerModalityRate(Section):
    """One probability per named modality (dropout rates)."""

    text: Probability
    audio: Probability
    vision: Probability


for _cls in (PerModality, PerModalityCount, PerModalityRate):  # modalities are named once, in MODALITIES
    assert tuple(_cls.model_fields) == MODALITIES, _cls


class UnalignedLengths(Section):
    """Audio and vision steps of unaligned data; text keeps `data.seq_len` steps (one per token)."""

    audio: Positive
    vision: Positive


class SyntheticConfig(Section):
    """The synthetic data generator (see `mdkat.data.synthetic`)."""

    n_train: Positive
    n_valid: Positive
    n_test: Positive
    dims: PerModality
    aligned: bool
    unaligned_len: UnalignedLengths


class DataConfig(Section):
    """Where the data comes from and how it is shaped (`prepare` stage)."""

    source: str  # a key of mdkat.data.sources.SOURCES
    dataset: Literal["mosi", "mosei"]
    seed: int
    seq_len: Positive
    path: str | None
    url: str | None
    sha256: str | None
    base_url: str
    csd_dir: str | None
    # cmu-sdk: a local BERT checkpoint folder whose tokenizer makes the word pieces; defaults to None only
    # for manifests written before the key existed (params.yaml always sets it)
    tokenizer: str | None = None
    cache_dir: str
    mosi_feature_subset: bool
    download_retries: NonNegative
    download_timeout_s: PositiveFloat
    synthetic: SyntheticConfig


class BertConfig(Section):
    """`model.bert`: the BERT that `model.text_encoder: bert` fine-tunes (`mdkat.models.bert`)."""

    checkpoint: str | None  # a local folder (config.json, weights, tokenizer files); never downloaded
    lr: PositiveFloat  # its own learning rate: the field fine-tunes BERT at 5e-5, far below the rest


class ModelSection(Section):
    """`model.name`, the text encoder and one mapping per model (`model.<name>`), validated by that
    model's config type."""

    model_config = ConfigDict(strict=True, extra="allow", frozen=True)

    name: str  # a key of mdkat.models.REGISTRY
    text_encoder: Literal[
        "features", "bert"
    ]  # features: the prepared vectors; bert: fine-tuned on word pieces
    bert: BertConfig

    def sections(self) -> dict[str, Any]:
        """`{model name: its raw mapping}` for every model section in the file."""
        return dict(self.model_extra or {})


class TrainConfig(Section):
    """The training loop (`mdkat.training.fit`)."""

    seed: int
    device: Literal["auto", "cpu", "cuda"]
    epochs: Positive
    batch_size: Positive
    eval_batch_size: Positive
    lr: PositiveFloat
    weight_decay: Annotated[float, Field(ge=0)]
    grad_clip: PositiveFloat
    ema: Probability  # decay of the weights' moving average that is validated and kept (0: off)
    lr_patience: NonNegative
    lr_factor: Annotated[float, Field(gt=0, lt=1)]
    patience: Positive
    select_on: MetricName


class MlflowConfig(Section):
    """Where runs are recorded (the tracking URI comes from MLFLOW_TRACKING_URI, see mdkat.tracking)."""

    experiment: str
    registered_model: str  # train registers each model as a new version of this registered model
    system_metrics: bool  # MLflow's system-metrics monitor on train runs (off: no sampling thread)


class SearchRange(Section):
    """One tuned parameter: a dotted key of this file and its range."""

    key: str
    low: float
    high: float
    log: bool


class TuneConfig(Section):
    """The Optuna study over the loss weights (`mdkat.tuning`)."""

    study_name: str  # a short hash of everything the objective depends on is appended
    storage: str  # sqlite:///optuna.db | journal:PATH | an RDB URL such as postgresql://...
    n_trials: Positive
    timeout_s: PositiveFloat | None
    epochs: Positive  # per trial
    metric: MetricName
    seed: int
    pruner: Literal["median", "hyperband", "none"]
    heartbeat_s: Positive  # RDB storages: a trial whose worker is silent this long is failed
    max_retries: NonNegative  # a trial whose worker died is run again with its values, at most this often
    # ranges of other models' sections, and weights of switched-off loss terms, are left out of a study
    space: Items[SearchRange]


class ReportBudget(Section):
    """Shorter training for the report's many runs; null keeps the `train` section's value."""

    epochs: Positive | None
    patience: Positive | None


class ReportConfig(Section):
    """The ablation and multi-seed report (`mdkat.report`)."""

    variants: Items[str]  # the ablation table: registry models and ablations of `model.name`
    models: Items[str]  # the models table: registry models, each with its own section and loss weights
    seeds: Items[int]  # train.seed of each run; the data stay the same
    budget: ReportBudget
    alpha: Annotated[float, Field(gt=0, lt=1)]  # significance level of the paired tests


class CiConfig(Section):
    """The CI profile (`mdkat.ci`): the real stages on a small problem, checked against a baseline."""

    overrides: Items[str]  # `key=value`, as `-S`: what turns this file into the CI profile
    baseline: str  # the committed test metrics of the CI profile, relative to the project root


class Params(Section):
    """Everything in `params.yaml`."""

    data: DataConfig
    model: ModelSection
    # loss.<model>.<term>: the weight of each loss term next to the task L1 (weight 1); Optuna tunes them
    loss: dict[str, dict[str, float]]
    train: TrainConfig
    mlflow: MlflowConfig
    tune: TuneConfig
    report: ReportConfig
    ci: CiConfig

    _file: str = PrivateAttr(default="params")
    _set_by: dict[str, str] = PrivateAttr(default_factory=dict)

    @property
    def file(self) -> str:
        """The parameter file (or other source) these values were read from, for messages."""
        return self._file

    def origin(self, key: str) -> str | None:
        """The override or `--best` file that set `key` (or a section above it), if one did."""
        related = (k for k in self._set_by if key == k or key.startswith(k + ".") or k.startswith(key + "."))
        return next((self._set_by[k] for k in related), None)

    def error(self, key: str, message: str) -> ConfigError:
        """A `ConfigError` for `key` that names the file and, if an override set it, the override."""
        return with_origin(ConfigError(f"{self._file}: '{key}' {message}", key), self.origin(key))

    def weights(self, model: str | None = None) -> dict[str, float]:
        """The loss weights of `model` (default: `model.name`): `{term: weight}`."""
        return dict(self.loss.get(model or self.model.name, {}))


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
    """The tuned values of a `--best` file: `{params: {dotted.key: value}, metric, value, trial, ...}`.

    Its keys are checked where they are applied (`load_params`): an unknown key is an error there.
    """
    path = Path(path)
    best = _read_yaml(path, "file of tuned values")
    if not isinstance(best, dict) or not isinstance(best.get("params"), dict):
        raise ConfigError(f"{path}: expected a mapping with a 'params' mapping of dotted keys to values")
    return best


def load_params(
    path: str | Path = "params.yaml", overrides: Sequence[str] = (), best: str | Path | None = None
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
    set_by: dict[str, str] = {}
    if best is not None:
        for key, value in read_best(best)["params"].items():
            set_dotted(raw, str(key), value, f"{best} (params)")
            set_by[str(key)] = f"{key}={value!r} from {best}"
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(raw, key, value, f"{path} (override -S {item})")
        set_by[key] = f"-S {item}"
    return validate(raw, str(path), set_by)


def validate(raw: Mapping[str, Any], file: str, set_by: Mapping[str, str] | None = None) -> Params:
    """`Params` from a nested mapping; a `ConfigError` naming `file` and the first offending key."""
    try:
        params = Params.model_validate(raw)
    except ValidationError as e:
        error = translate(e, Params, file)
        raise with_origin(error, (set_by or {}).get(error.key or "")) from None
    params._file = file
    params._set_by = dict(set_by or {})
    return params


def with_origin(error: ConfigError, origin: str | None) -> ConfigError:
    """`error` with "(set by ORIGIN)" appended when an override or a `--best` file set the key."""
    return ConfigError(f"{error} (set by {origin})", error.key) if origin else error


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
            # `data.seed.x`: 'data.seed' is a value, so 'data.seed.x' is no key of the schema
            raise ConfigError(f"{where}: unknown key '{key}' ('{'.'.join(parts[: i + 1])}' is not a section)")
        node = child
    node[parts[-1]] = value


def to_flat_dict(obj: BaseModel | Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{'data.seed': 1111, ...}`: a schema tree (or mapping) as dotted keys (for logging and hashing)."""
    tree = obj.model_dump() if isinstance(obj, BaseModel) else obj
    out: dict[str, Any] = {}
    for name, value in tree.items():
        key = f"{prefix}{name}"
        if isinstance(value, Mapping):
            out.update(to_flat_dict(value, key + "."))
        elif isinstance(value, list | tuple) and value and isinstance(value[0], Mapping):
            for i, item in enumerate(value):
                out.update(to_flat_dict(item, f"{key}.{i}."))
        else:
            out[key] = list(value) if isinstance(value, tuple) else value
    return out


def chosen_flat_dict(params: Params) -> dict[str, Any]:
    """`to_flat_dict` without the sections of models other than `model.name`: what a run depends on."""
    others = [f"{section}.{name}." for section in ("model", "loss") for name in params.model.sections()]
    others += [f"loss.{name}." for name in params.loss]
    mine = (f"model.{params.model.name}.", f"loss.{params.model.name}.")
    return {
        k: v
        for k, v in to_flat_dict(params).items()
        if k.startswith(mine) or not any(k.startswith(o) for o in others)
    }


def with_values(params: Params, values: Mapping[str, Any], where: str = "with_values") -> Params:
    """A copy of `params` with dotted keys set to `values`, validated like the file itself."""
    raw = params.model_dump()
    for key, value in values.items():
        set_dotted(raw, key, value, where)
    set_by = {**params._set_by, **{key: where for key in values}}
    return validate(raw, params.file, set_by)


# ---------------------------------------------------------------------------------------------------------
# messages: pydantic's errors in the project's words (file, dotted key, what was expected, what was found)

_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def translate(error: ValidationError, schema: type[BaseModel], file: str, prefix: str = "") -> ConfigError:
    """The first error of `error` (validating `schema`, found at `prefix`) as a `ConfigError`."""
    errors = error.errors(include_url=False)
    # an unknown key first: a misspelt key also makes the intended one "missing", and the typo explains both
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = tuple(first["loc"])
    kind, value = first["type"], first.get("input")
    key = (prefix + _dotted(loc)).rstrip(".")
    if kind == "value_error":  # a validator's own check, e.g. a width that the heads do not divide
        return ConfigError(f"{file}: '{key}' {first['msg'].removeprefix('Value error, ')}", key)
    if kind == "missing":
        return ConfigError(f"{file}: missing key '{key}'", key)
    if kind == "extra_forbidden":
        parent = _annotation_at(schema, loc[:-1])
        allowed = ", ".join(parent.model_fields) if _is_schema(parent) else "?"
        where = prefix + _dotted(loc[:-1]) or "<top>"
        return ConfigError(f"{file}: unknown key '{key}' (allowed in '{where.rstrip('.')}': {allowed})", key)
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return ConfigError(f"{file}: '{key}' must be a mapping, got {_describe(value)}", key)
    if kind == "literal_error":
        options = list(typing.get_args(_annotation_at(schema, loc)))
        return ConfigError(f"{file}: '{key}' expected one of {options}, got {_describe(value)}", key)
    if kind in _BOUNDS:
        bound = next(iter(first["ctx"].values()))
        return ConfigError(
            f"{file}: '{key}' expected a value {_BOUNDS[kind]} {bound}, got {_describe(value)}", key
        )
    expected = _type_name(_annotation_at(schema, loc))
    return ConfigError(f"{file}: '{key}' expected {expected}, got {_describe(value)}", key)


def _dotted(loc: tuple) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else ("." if text else "") + str(part)
    return text


def _is_schema(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _strip(tp: Any) -> Any:
    while typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _annotation_at(schema: Any, loc: tuple) -> Any:
    """The declared type at `loc` inside `schema` (None where the path leaves the schema)."""
    tp: Any = schema
    for part in loc:
        tp = _strip(tp)
        if typing.get_origin(tp) in (typing.Union, types.UnionType):  # `X | None`: the part is in X
            tp = next(t for t in typing.get_args(tp) if t is not type(None))
            tp = _strip(tp)
        if _is_schema(tp) and isinstance(part, str) and part in tp.model_fields:
            tp = tp.model_fields[part].annotation
        elif typing.get_origin(tp) is tuple and isinstance(part, int):
            tp = typing.get_args(tp)[0]
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        else:
            return None
    return _strip(tp)


def _type_name(tp: Any) -> str:
    tp = _strip(tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(t) for t in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if origin is Literal:
        return f"one of {list(typing.get_args(tp))}"
    if _is_schema(tp):
        return "a mapping"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if value is not None else "null"
