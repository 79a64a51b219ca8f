import pytest

from spud.config import load_config, parse_overrides
from spud.errors import SpudError


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(None, ["model.n_layers=3", "train.lr=1e-3", "train.compile=true"])
    assert cfg.model.n_layers == 3 and cfg.train.lr == 1e-3 and cfg.train.compile is True


def test_untied_embedding_and_head_lrs_follow_train_lr_unless_given(tmp_path):
    cfg = load_config(None, [])  # the default recipe: Muon, untied head
    assert not cfg.model.tie_embeddings and cfg.train.optimizer == "muon"
    assert cfg.train.embed_lr == pytest.approx(5 * cfg.train.lr) and cfg.train.head_lr == pytest.approx(0.5 * cfg.train.lr)
    cfg = load_config(None, ["train.lr=0.002", "train.head_lr=0.0001"])
    assert cfg.train.embed_lr == pytest.approx(0.01) and cfg.train.head_lr == 0.0001  # given wins
    cfg = load_config(None, ["train.embed_lr=null"])  # null: the embedding at train.lr
    assert cfg.train.embed_lr is None and cfg.train.head_lr == pytest.approx(0.5 * cfg.train.lr)
    for other in (["model.tie_embeddings=true"], ["train.optimizer=adamw"]):  # not what was measured
        cfg = load_config(None, other)
        assert cfg.train.embed_lr is None and cfg.train.head_lr is None, other
    # resolved once: the saved config reads back the same numbers, not recomputed from a new lr
    path = tmp_path / "c.yaml"
    path.write_text(load_config(None, ["train.lr=0.002"]).to_yaml())
    again = load_config(str(path), ["train.lr=0.004"])
    assert again.train.embed_lr == pytest.approx(0.01) and again.train.head_lr == pytest.approx(0.001)


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


@pytest.mark.parametrize("override, message", [
    ("train.max_steps=true", "train.max_steps: true is a boolean, not an integer"),
    ("model.d_model=64.0", "model.d_model: 64.0 is a float, not an integer; write 64"),
    ("model.d_model=64.5", "model.d_model: 64.5 is a float, not an integer"),
    ("train.lr=true", "train.lr: true is a boolean, not a number"),
    ("train.compile=1", "train.compile: 1 is not a boolean; write true or false"),
    ("train.debug_nan_at_step=[3, true]", "train.debug_nan_at_step: true is a boolean, not an integer"),
])
def test_wrong_kinds_are_not_coerced(override, message):
    """Lax pydantic would train 1 step for max_steps=true and accept d_model=64.0."""
    with pytest.raises(SpudError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_wrong_kinds_in_yaml_file_are_errors_too(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  max_steps: true\nmodel:\n  d_model: 64.0\n"
                 "data:\n  sources:\n    - {name: a, type: builtin, builtin: arithmetic, max_documents: false}\n")
    with pytest.raises(SpudError) as e:
        load_config(p)
    lines = str(e.value).splitlines()
    assert lines[0] == f"invalid config ({p}):"
    assert sorted(lines[1:]) == ["  data.sources.0.max_documents: false is a boolean, not an integer",
                                 "  model.d_model: 64.0 is a float, not an integer; write 64",
                                 "  train.max_steps: true is a boolean, not an integer"]


def test_float_fields_still_take_integers():
    cfg = load_config(None, ["train.lr=3"])
    assert cfg.train.lr == 3.0 and isinstance(cfg.train.lr, float)


def test_save_config_is_atomic_and_round_trips(tmp_path, monkeypatch):
    from spud.config import save_config

    cfg = load_config(None, ["train.max_steps=400"])
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    assert load_config(path).train.max_steps == 400
    # A crash mid-write (here: the write itself fails) leaves the previous file untouched.
    def boom(*_a, **_k):
        raise OSError("disk full")
    monkeypatch.setattr("spud.config.os.fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        save_config(load_config(None, ["train.max_steps=7"]), path)
    assert load_config(path).train.max_steps == 400
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]  # no temp file left behind


def test_cli_reports_a_wrong_kind_before_any_work(tmp_path, capsys):
    from spud.cli import main

    rc = main(["train", "tiny", "train.max_steps=true", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: invalid config (")
    assert "  train.max_steps: true is a boolean, not an integer" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
