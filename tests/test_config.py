"""params.yaml into frozen dataclasses: unknown keys, wrong types and overrides."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

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
    with pytest.raises(dataclasses.FrozenInstanceError):
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
        load_params(path)


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
