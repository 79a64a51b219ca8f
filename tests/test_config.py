import pytest

from spud.config import load_config, parse_overrides
from spud.errors import SpudError


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(None, ["model.n_layers=3", "train.lr=1e-3", "train.compile=true"])
    assert cfg.model.n_layers == 3 and cfg.train.lr == 1e-3 and cfg.train.compile is True


def test_preset_fills_fields_and_explicit_wins():
    cfg = load_config(None, ["model.preset=micro", "model.n_layers=2"])
    assert cfg.model.d_model == 192 and cfg.model.n_layers == 2 and cfg.model.kv_heads == 2


def test_unknown_key_suggests_closest():
    with pytest.raises(SpudError) as e:
        load_config(None, ["model.n_layer=3"])
    msg = str(e.value)
    assert "model.n_layer" in msg and "did you mean 'n_layers'" in msg


def test_wrong_type_names_key_and_expected_type():
    with pytest.raises(SpudError) as e:
        load_config(None, ["train.max_steps=lots"])
    msg = str(e.value)
    assert "train.max_steps" in msg and "int" in msg and "'lots'" in msg


def test_yaml_file_and_list_index_override(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  sources:\n    - {name: a, type: builtin, builtin: arithmetic}\n")
    cfg = load_config(p, ["data.sources.0.weight=2.5"])
    assert cfg.data.sources[0].weight == 2.5
    with pytest.raises(SpudError, match="index out of range"):
        load_config(p, ["data.sources.3.weight=1"])


def test_bad_files(tmp_path):
    with pytest.raises(SpudError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(SpudError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(SpudError, match="key.sub=value"):
        parse_overrides(["model.n_layers"])


def test_invalid_dimensions_explained():
    with pytest.raises(SpudError, match="multiple of n_kv_heads"):
        load_config(None, ["model.n_heads=4", "model.n_kv_heads=3"])
    with pytest.raises(SpudError, match="unknown model preset 'nan0'.*did you mean 'nano'"):
        load_config(None, ["model.preset=nan0"])
