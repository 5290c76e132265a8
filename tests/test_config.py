"""Config loading, overrides and validation errors that name the key."""

from __future__ import annotations

import json

import pytest

from captioner.config import (
    BUILTIN_CONFIG_DIR,
    Config,
    ConfigError,
    apply_overrides,
    builtin_configs,
    config_from_dict,
    load_config,
    resolve_config,
)


def test_every_shipped_config_loads(project_root):
    paths = sorted((project_root / "configs").glob("*.yaml"))
    assert paths, "configs/ holds no YAML file"
    for path in paths:
        cfg = load_config(path)
        assert isinstance(cfg, Config)


def test_yaml_values_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  units: 64\ntrain:\n  learning_rate: 1\n")
    cfg = load_config(path, ["train.epochs=3", "model.cnn_filters=[4, 8]",
                             "data.limit=null", "train.scheduled_sampling.enabled=true"])
    assert cfg.model.units == 64
    assert cfg.train.learning_rate == 1.0 and isinstance(cfg.train.learning_rate, float)
    assert cfg.train.epochs == 3
    assert cfg.model.cnn_filters == [4, 8]
    assert cfg.data.limit is None
    assert cfg.train.scheduled_sampling.enabled is True


def test_unknown_key_names_full_path(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  unitz: 64\n")
    with pytest.raises(ConfigError, match=r"model\.unitz"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"train\.scheduled_sampling\.nope"):
        apply_overrides(Config(), ["train.scheduled_sampling.nope=1"])


@pytest.mark.parametrize("override, key", [
    ("model.units=many", "model.units"),
    ("train.epochs=2.5", "train.epochs"),
    ("train.tensorboard=3", "train.tensorboard"),
    ("model.cnn_filters=[8, x]", r"model.cnn_filters\[1\]"),
    ("model.attention=cosine", "model.attention"),
    ("train.precision=float8", "train.precision"),
    ("train.strategy=ring", "train.strategy"),
    ("train.logical_cpus=-1", "train.logical_cpus"),
    ("decode.crop_margin=-0.1", "decode.crop_margin"),
    ("decode.crop_margin=wide", "decode.crop_margin"),
])
def test_wrong_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        apply_overrides(Config(), [override])


def test_dot_attention_needs_equal_sizes():
    with pytest.raises(ConfigError, match="model.attention"):
        apply_overrides(Config(), ["model.attention=dot", "model.units=128",
                                   "model.embedding_dim=64"])
    cfg = apply_overrides(Config(), ["model.attention=dot", "model.units=64",
                                     "model.embedding_dim=64"])
    assert cfg.model.attention == "dot"


def test_image_size_must_fit_the_cnn():
    with pytest.raises(ConfigError, match="model.image_size"):
        apply_overrides(Config(), ["model.image_size=100"])


def test_json_round_trip(tmp_path):
    cfg = apply_overrides(Config(), ["model.units=32", "train.seed=7"])
    cfg.save(tmp_path / "config.json")
    again = config_from_dict(json.loads((tmp_path / "config.json").read_text()))
    assert again == cfg


def test_float_keys_accept_exponent_notation(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  min_learning_rate: 1e-5\n")  # YAML 1.1 reads this as a string
    assert load_config(path).train.min_learning_rate == 1e-5
    assert apply_overrides(Config(), ["train.learning_rate=3e-4"]).train.learning_rate == 3e-4
    with pytest.raises(ConfigError, match="train.learning_rate"):
        apply_overrides(Config(), ["train.learning_rate=fast"])


def test_saved_json_config_loads_again(tmp_path):
    cfg = apply_overrides(Config(), ["train.min_learning_rate=1e-5"])
    cfg.save(tmp_path / "config.json")
    assert load_config(tmp_path / "config.json") == cfg


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(Config(), ["model.units"])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nowhere.yaml"):
        load_config(tmp_path / "nowhere.yaml")


def test_builtin_configs_load_by_name(project_root):
    shipped = sorted(p.stem for p in (project_root / "configs").glob("*.yaml"))
    assert builtin_configs() == shipped
    assert BUILTIN_CONFIG_DIR.resolve() == (project_root / "configs").resolve()
    for name in shipped:
        assert load_config(name) == load_config(project_root / "configs" / f"{name}.yaml")
    assert load_config("shapes.yaml", ["train.epochs=2"]).train.epochs == 2
    assert resolve_config("shapes") == BUILTIN_CONFIG_DIR / "shapes.yaml"


def test_a_file_wins_over_a_builtin_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shapes").write_text("model:\n  units: 24\n")
    assert load_config("shapes").model.units == 24
    (tmp_path / "shapes.yaml").write_text("model:\n  units: 40\n")
    assert load_config("shapes.yaml").model.units == 40


def test_unknown_name_lists_the_builtin_configs(tmp_path):
    with pytest.raises(ConfigError, match="no_such_config") as info:
        load_config("no_such_config")
    assert all(name in str(info.value) for name in builtin_configs())
    with pytest.raises(ConfigError, match="built-in config: coco, flickr8k, shapes"):
        load_config(tmp_path / "shapes")  # a path with a folder is never a name
