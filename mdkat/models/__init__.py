"""Models: one registry, from which the choices of `model.name`, each model's config and loss terms come.

Adding a model is one file here (a `Model` subclass with its `Config` type), one line in `REGISTRY` and one
section `model.<name>` in `params.yaml` (plus `loss.<name>` if it weights loss terms). Everything that
depends on the chosen model is checked against it by `check_params`, before any work starts: its section,
its loss weights, the tune space and the report's variants.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from mdkat.config import ConfigError, Params, SearchRange, to_flat_dict, translate, with_origin
from mdkat.models.base import Ablation, Model, ModelOutput
from mdkat.models.dmd import DMD
from mdkat.models.late_fusion import LateFusion
from mdkat.models.mdkat import MDKAT
from mdkat.models.misa import MISA
from mdkat.models.mult import MulT
from mdkat.models.self_mm import SelfMM
from mdkat.models.tfn import TFN

# the project's model first, then the field's baselines in order of publication
REGISTRY: dict[str, type[Model]] = {
    "mdkat": MDKAT,
    "late_fusion": LateFusion,
    "tfn": TFN,
    "mult": MulT,
    "misa": MISA,
    "self_mm": SelfMM,
    "dmd": DMD,
}


def model_class(params: Params) -> type[Model]:
    """The class of `model.name`."""
    return REGISTRY[params.model.name]


def parse_config(name: str, raw: Any, file: str, params: Params | None = None) -> BaseModel:
    """Model `name`'s config from its raw `model.<name>` mapping; errors name `file`, the dotted key and,
    with `params`, the override that set it."""
    cls = REGISTRY[name]
    try:
        return cls.Config.model_validate(raw)
    except ValidationError as e:
        error = translate(e, cls.Config, file, prefix=f"model.{name}.")
        raise (with_origin(error, params.origin(error.key or "")) if params else error) from None


def config_of(params: Params, name: str | None = None) -> BaseModel:
    """The validated config of model `name` (default: `model.name`) from its `model.<name>` section."""
    name = name or params.model.name
    sections = params.model.sections()
    if name not in sections:
        if name == params.model.name:
            raise params.error("model.name", f"is {name!r}, but its section 'model.{name}' is missing")
        raise params.error(f"model.{name}", "missing: every model used needs its section")
    return parse_config(name, sections[name], params.file, params)


def build(
    params: Params, dims: dict[str, int], aligned: bool = False, sizes: dict[str, int] | None = None
) -> Model:
    """The model `model.name` for inputs of feature sizes `dims` ({modality: d_m}), aligned or not, and
    splits of `sizes` samples ({split: n}; only models with per-sample state need them); with
    `model.text_encoder: bert`, wrapped to read its text through the fine-tuned BERT.

    The model's `spec` is what `rebuild` needs to make it again from a model file.
    """
    cfg = config_of(params)
    bert = None
    if params.model.text_encoder == "bert":
        from mdkat.models.bert import load_bert, text_config

        bert = load_bert(params.model.bert, params.file)
        cfg, dims = text_config(cfg), {**dims, "text": bert.config.hidden_size}
    return _assemble(params.model.name, cfg, dims, aligned, sizes, bert, params.model.bert.lr)


def _assemble(name, cfg, dims, aligned, sizes, bert, bert_lr) -> Model:
    model = REGISTRY[name](cfg, dims, aligned, sizes)
    if bert is not None:
        from mdkat.models.bert import WithBert

        model = WithBert(model, bert, bert_lr)
    model.spec = {
        "model_name": name,
        "model_config": cfg.model_dump(),
        "dims": dims,
        "aligned": aligned,
        "sizes": sizes,
        **({"bert": bert.config.to_dict(), "bert_lr": bert_lr} if bert is not None else {}),
    }
    return model


def rebuild(spec: dict[str, Any], file: str) -> Model:
    """A model from a model file's `spec` (see `build`): registry name, config, input and split sizes,
    alignment and, for a BERT text encoder, BERT's architecture (its weights come with the state dict)."""
    name = spec["model_name"]
    if name not in REGISTRY:
        raise ConfigError(f"{file}: a checkpoint of model {name!r}, which is not one of {sorted(REGISTRY)}")
    bert = None
    if "bert" in spec:
        from mdkat.models.bert import bert_from_config

        bert = bert_from_config(spec["bert"])
    cfg = parse_config(name, spec["model_config"], file)
    # files written before split sizes were recorded have none
    return _assemble(name, cfg, spec["dims"], spec["aligned"], spec.get("sizes"), bert, spec.get("bert_lr"))


def loss_terms(params: Params) -> tuple[str, ...]:
    """The loss terms the chosen model computes under its config's switches."""
    return model_class(params).loss_terms(config_of(params))


def search_space(params: Params) -> list[SearchRange]:
    """The ranges of `tune.space` that apply to the chosen model.

    Left out: ranges in another model's sections (`model.<other>.*`, `loss.<other>.*`) and weights of loss
    terms the chosen configuration does not compute (a switched-off module's weight changes nothing).
    """
    name, terms = params.model.name, set(loss_terms(params))
    kept = []
    for r in params.tune.space:
        section, _, rest = r.key.partition(".")
        owner = rest.split(".", 1)[0] if section in ("model", "loss") else name
        if owner != name or (section == "loss" and rest.split(".", 1)[-1] not in terms):
            continue
        kept.append(r)
    return kept


def variant_values(params: Params, variant: str) -> dict[str, Any]:
    """The dotted values a report variant sets: another model, or an ablation of the chosen one."""
    if variant in REGISTRY:
        return {"model.name": variant}
    changes = model_class(params).ABLATIONS[variant].changes
    return {f"model.{params.model.name}.{key}": value for key, value in changes.items()}


def variant_label(params: Params, variant: str) -> str:
    """How the report names a variant."""
    if variant in REGISTRY:
        return REGISTRY[variant].LABEL
    return model_class(params).ABLATIONS[variant].label


def check_params(params: Params) -> None:
    """The chosen model, every model section, the loss weights and the tune space against the registry.

    A `ConfigError` on the first fault. The report's variants are checked by `check_variants`, for the
    report only: choosing another model must not make the train stage fail on the report's list.
    """
    name = params.model.name
    if name not in REGISTRY:
        raise params.error("model.name", f"expected one of {sorted(REGISTRY)}, got {name!r}")
    for section in params.model.sections():
        if section not in REGISTRY:
            raise params.error(f"model.{section}", f"is not a model; sections are for {sorted(REGISTRY)}")
        config_of(params, section)
    config_of(params, name)  # a missing section of the chosen model
    for model, weights in params.loss.items():
        if model not in REGISTRY:
            raise params.error(f"loss.{model}", f"is not a model; loss weights are for {sorted(REGISTRY)}")
        expected = REGISTRY[model].WEIGHTED_TERMS
        for term in weights:
            if term not in expected:
                raise params.error(f"loss.{model}.{term}", f"is not a loss term of {model}: {list(expected)}")
        for term in expected:
            if term not in weights:
                raise params.error(f"loss.{model}.{term}", "missing: every weighted term needs its weight")
    _require_weights(params, name)
    _check_space(params)
    if params.model.text_encoder == "bert":
        from mdkat.models.bert import CHECKPOINT_KEY, require_checkpoint

        try:
            require_checkpoint(params.model.bert, params.file)
        except ConfigError as e:
            raise with_origin(e, params.origin(CHECKPOINT_KEY)) from None


def _require_weights(params: Params, model: str) -> None:
    terms = list(REGISTRY[model].WEIGHTED_TERMS)
    if terms and model not in params.loss:
        raise params.error(f"loss.{model}", f"missing: {model} weights {terms}")


def check_variants(params: Params) -> None:
    """`report.variants` are models of the registry or ablations of the chosen model; `report.models`
    are models of the registry."""
    check_params(params)
    for key, allowed in (
        ("report.variants", [*REGISTRY, *model_class(params).ABLATIONS]),
        ("report.models", list(REGISTRY)),
    ):
        for variant in getattr(params.report, key.split(".")[1]):
            if variant not in allowed:
                raise params.error(key, f"expected items of {allowed}, got {variant!r}")
            if variant in REGISTRY:  # trained with its own section and weights
                config_of(params, variant)
                _require_weights(params, variant)


def _check_space(params: Params) -> None:
    flat = to_flat_dict(params)
    for model in params.model.sections():
        flat.update(to_flat_dict(config_of(params, model), f"model.{model}."))
    for i, r in enumerate(params.tune.space):
        if not isinstance(flat.get(r.key), float):
            raise params.error(f"tune.space[{i}]", f"key {r.key!r} is not a numeric (float) parameter")
        if not (0 < r.low < r.high if r.log else r.low < r.high):
            raise params.error(f"tune.space[{i}]", "expected low < high (and low > 0 on a log scale)")


__all__ = [
    "REGISTRY",
    "Ablation",
    "Model",
    "ModelOutput",
    "build",
    "check_params",
    "check_variants",
    "config_of",
    "loss_terms",
    "rebuild",
    "search_space",
    "variant_label",
    "variant_values",
]
