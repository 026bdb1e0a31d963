"""params.yaml into a frozen schema: unknown keys, wrong types, ranges, overrides, registry choices."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from pydantic import ValidationError

from mdkat.checks import load_checked
from mdkat.config import ConfigError, Params, load_params, parse_override, to_flat_dict


def _write(tmp_path, root, mutate):
    raw = yaml.safe_load((root / "params.yaml").read_text())
    mutate(raw)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_real_params_file_loads_frozen(root):
    params = load_params(root / "params.yaml")
    assert isinstance(params, Params)
    assert params.data.source == "synthetic"
    assert params.data.synthetic.dims.text == 768
    with pytest.raises(ValidationError, match="frozen"):
        params.data.seed = 3  # type: ignore[misc]


def test_unknown_key_names_file_and_key(tmp_path, root):
    path = _write(tmp_path, root, lambda r: r["data"]["synthetic"].update(n_trian=5))
    with pytest.raises(ConfigError, match=r"p\.yaml: unknown key 'data\.synthetic\.n_trian'"):
        load_params(path)


def test_unknown_section(tmp_path, root):
    path = _write(tmp_path, root, lambda r: r.update(trian={"x": 1}))
    with pytest.raises(ConfigError, match="unknown key 'trian'"):
        load_params(path)


def test_missing_key_names_it(tmp_path, root):
    path = _write(tmp_path, root, lambda r: r["data"].pop("seed"))
    with pytest.raises(ConfigError, match=r"p\.yaml: missing key 'data\.seed'"):
        load_params(path)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("seed", "abc", "expected int, got str 'abc'"),
        ("seed", True, "expected int, got bool True"),
        ("seed", 1.5, "expected int, got float 1.5"),
        ("source", "mmsaa", r"expected one of \['synthetic', 'mmsa', 'cmu-sdk'\]"),
        ("path", 3, "expected str or null"),
        ("mosi_feature_subset", "yes", "expected bool"),
        ("synthetic", 5, "must be a mapping, got int 5"),
    ],
)
def test_wrong_types_name_file_and_key(tmp_path, root, key, value, expected):
    path = _write(tmp_path, root, lambda r: r["data"].update({key: value}))
    with pytest.raises(ConfigError, match=rf"p\.yaml: '?data\.{key}'? ?.*{expected}"):
        load_checked(path)  # the data source is a registry's choice, checked right after the schema


def test_int_accepted_where_float_expected(tmp_path, root):
    path = _write(tmp_path, root, lambda r: r["data"].update(download_timeout_s=5))
    value = load_params(path).data.download_timeout_s
    assert value == 5.0 and isinstance(value, float)


def test_overrides_parse_yaml_scalars(root):
    params = load_params(
        root / "params.yaml",
        ["data.seed=7", "data.synthetic.aligned=false", "data.path=null", "data.url=http://x/y.pkl"],
    )
    assert params.data.seed == 7
    assert params.data.synthetic.aligned is False
    assert params.data.path is None
    assert params.data.url == "http://x/y.pkl"
    assert parse_override("a.b=1e-4") == ("a.b", 1e-4)
    assert parse_override("a.b=-2E3") == ("a.b", -2000.0)
    assert parse_override("a.b=1e4x") == ("a.b", "1e4x")
    assert parse_override("a.b = x=y") == ("a.b", "x=y")


def test_bad_overrides(root):
    with pytest.raises(ConfigError, match="unknown key 'data.sead'"):
        load_params(root / "params.yaml", ["data.sead=1"])
    with pytest.raises(ConfigError, match=r"expected int, got str 'x' \(set by -S data.seed=x\)"):
        load_params(root / "params.yaml", ["data.seed=x"])
    with pytest.raises(ConfigError, match="expected the form section.key=value"):
        load_params(root / "params.yaml", ["data.seed"])
    with pytest.raises(ConfigError, match="unknown key 'data.seed.x'"):
        load_params(root / "params.yaml", ["data.seed.x=1"])


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: parameter file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_params(bad)


def test_flat_dict_has_dotted_keys(root):
    flat = to_flat_dict(load_params(root / "params.yaml"))
    assert flat["data.synthetic.dims.audio"] == 5
    assert flat["data.synthetic.unaligned_len.vision"] == 500
    assert all("." in k for k in flat)


def test_reading_the_parameters_loads_neither_torch_nor_a_model(root):
    code = (
        "import sys; from mdkat.config import load_params; load_params('params.yaml'); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'sklearn', 'mlflow', 'optuna')"
        " or m.startswith('mdkat.models')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        # ranges, checked by the schema
        ("train.batch_size=0", r"'train.batch_size' expected a value > 0, got int 0"),
        ("train.lr=-1e-3", r"'train.lr' expected a value > 0.0, got float -0.001"),
        ("train.lr_factor=1.0", r"'train.lr_factor' expected a value < 1.0, got float 1.0"),
        ("tune.n_trials=0", r"'tune.n_trials' expected a value > 0"),
        ("data.seq_len=-5", r"'data.seq_len' expected a value > 0"),
        ("report.alpha=1.5", r"'report.alpha' expected a value < 1.0"),
        ("train.select_on=accuracy", r"'train.select_on' expected one of \['mae', 'corr'"),
        # model sections and loss weights, checked by the models' registry with each model's own config type
        ("model.mdkat.widht=3", r"unknown key 'model\.mdkat\.widht' \(allowed in 'model\.mdkat': width, "),
        ("model.mdkat.width=wide", r"'model\.mdkat\.width' expected int, got str 'wide'"),
        ("model.late_fusion.dropout=1.0", r"'model\.late_fusion\.dropout' expected a value < 1"),
        ("model.mdkat.use_ka=1", r"'model\.mdkat\.use_ka' expected bool, got int 1"),
        ("model.mdkat.conv_kernel.text=4", r"'model\.mdkat\.conv_kernel' must be odd.*'text': 4"),
        ("model.mdkat.heads=7", r"'model\.mdkat' width 50 is not divisible by heads 7"),
        ("model.name=nope", r"'model\.name' expected one of \['dmd', 'late_fusion', .*\], got 'nope'"),
        ("model.nope.width=3", r"'model\.nope' is not a model"),
        ("loss.mdkat.kaa=0.1", r"'loss\.mdkat\.kaa' is not a loss term of mdkat: \['unimodal'"),
        ("loss.late_fusion.ka=0.1", r"'loss\.late_fusion\.ka' is not a loss term of late_fusion: \[\]"),
        ("loss.mdkat.ka=high", r"'loss\.mdkat\.ka' expected float, got str 'high'"),
    ],
)
def test_bad_values_name_the_file_the_key_and_the_override(root, override, expected):
    with pytest.raises(ConfigError, match=rf"params\.yaml: .*{expected}.*\(set by -S {override}\)"):
        load_checked(root / "params.yaml", [override])


def test_the_chosen_model_needs_its_section_and_weights(tmp_path, root):
    path = _write(tmp_path, root, lambda r: r["model"].pop("late_fusion"))
    load_checked(path)  # another model's section may be left out ...
    with pytest.raises(ConfigError, match=r"'model\.late_fusion' is missing.*\(set by -S model\.name="):
        load_checked(path, ["model.name=late_fusion"])  # ... the chosen one's may not
    path = _write(tmp_path, root, lambda r: r["loss"]["mdkat"].pop("kt"))
    with pytest.raises(ConfigError, match=r"p\.yaml: 'loss\.mdkat\.kt' missing"):
        load_checked(path)


def test_chosen_flat_dict_leaves_out_other_models(root):
    from mdkat.config import chosen_flat_dict, with_values

    params = load_params(root / "params.yaml")
    keys = set(chosen_flat_dict(params))
    assert "model.mdkat.width" in keys and "loss.mdkat.ka" in keys and "train.lr" in keys
    assert not any(k.startswith("model.late_fusion") for k in keys)
    late = set(chosen_flat_dict(with_values(params, {"model.name": "late_fusion"})))
    assert "model.late_fusion.width" in late
    assert not any(k.startswith(("model.mdkat", "loss.mdkat")) for k in late)
    # every key belongs to some model's choice, or to every one (the text encoder is shared)
    everyone = set()
    for name in params.model.sections():
        everyone |= set(chosen_flat_dict(with_values(params, {"model.name": name})))
    assert set(to_flat_dict(params)) == everyone
    assert {"model.text_encoder", "model.bert.lr"} <= keys & late
