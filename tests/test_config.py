"""Recipes: strict typed loading, dotted overrides, clear errors, and a resolved dump that reloads."""

from pathlib import Path

import pytest
import yaml

from mentor.config import ConfigError, RunConfig, build_config, dump_config, load_config

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, data) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_defaults_and_method_hparams(tmp_path):
    cfg = load_config(write(tmp_path, {"method": {"name": "supervised", "label_smoothing": 0.1}}))
    assert isinstance(cfg, RunConfig)
    assert cfg.method.name == "supervised" and cfg.method.label_smoothing == 0.1
    assert cfg.optim.name == "sgd" and cfg.trainer.max_steps == 1000


def test_unknown_key_suggests_near_match(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, {"optim": {"lrr": 0.1}}))
    assert "optim.lrr" in str(e.value) and "'lr'" in str(e.value) and "r.yaml" in str(e.value)


def test_unknown_top_level_and_method_key(tmp_path):
    with pytest.raises(ConfigError, match="'trainer'"):
        load_config(write(tmp_path, {"trainr": {}}))
    with pytest.raises(ConfigError, match="label_smoothing"):
        load_config(write(tmp_path, {"method": {"name": "supervised", "label_smoothin": 0.1}}))


def test_unknown_method_suggests(tmp_path):
    with pytest.raises(ConfigError, match="supervised"):
        load_config(write(tmp_path, {"method": {"name": "supervisd"}}))


def test_wrong_type_names_key_and_type(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, {"optim": {"lr": "fast"}}))
    assert "optim.lr" in str(e.value) and "float" in str(e.value)
    with pytest.raises(ConfigError, match="trainer.max_steps: expected int"):
        load_config(write(tmp_path, {"trainer": {"max_steps": 1.5}}))
    with pytest.raises(ConfigError, match="expected bool"):
        load_config(write(tmp_path, {"trainer": {"compile": "yes"}}))
    with pytest.raises(ConfigError, match="one of 'sgd', 'adamw'"):
        load_config(write(tmp_path, {"optim": {"name": "adam"}}))


def test_yaml11_float_strings_are_accepted(tmp_path):
    cfg = load_config(write(tmp_path, {}), ["optim.lr=1e-3"])
    assert cfg.optim.lr == pytest.approx(1e-3)


def test_overrides(tmp_path):
    p = write(tmp_path, {"optim": {"lr": 0.1}})
    cfg = load_config(p, ["optim.lr=0.2", "trainer.max_steps=7", "trainer.clip_grad=null",
                          "schedule.milestones=[0.5,0.75]", "optim.betas=[0.8,0.9]"])
    assert cfg.optim.lr == 0.2 and cfg.trainer.max_steps == 7 and cfg.trainer.clip_grad is None
    assert cfg.schedule.milestones == [0.5, 0.75] and cfg.optim.betas == (0.8, 0.9)
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(p, ["optim.lr"])
    with pytest.raises(ConfigError, match="did you mean|Did you mean"):
        load_config(p, ["trainer.max_step=3"])
    with pytest.raises(ConfigError, match="2 values"):
        load_config(p, ["optim.betas=[0.9]"])


def test_invalid_values(tmp_path):
    with pytest.raises(ConfigError, match="max_steps must be >= 1"):
        load_config(write(tmp_path, {"trainer": {"max_steps": 0}}))
    with pytest.raises(ConfigError, match="ema is a decay"):
        load_config(write(tmp_path, {"trainer": {"ema": 1.5}}))


def test_missing_and_malformed_recipe(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(lst)


def test_dump_reloads_to_the_same_config(tmp_path):
    cfg = load_config(write(tmp_path, {"method": {"name": "supervised", "label_smoothing": 0.2},
                                       "optim": {"name": "adamw", "lr": 3e-4}, "schedule": {"milestones": [10]}}))
    again = build_config(yaml.safe_load(dump_config(cfg)))
    assert again == cfg


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").rglob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_recipe_is_valid(recipe):
    load_config(recipe)
