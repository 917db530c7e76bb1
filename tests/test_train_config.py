"""Training configs: every shipped recipe loads, and mistakes fail at load time naming the key."""

from __future__ import annotations

import glob
import json
import os

import pytest

from vlp.config import ConfigError, from_dict, load_config, to_dict
from vlp.objectives.captioning import CaptioningObjective
from vlp.objectives.contrastive import ContrastiveObjective
from vlp.train.config import TrainConfig
from vlp.train.tracking import safe_params

RECIPES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "ray_configs", "train_*.yaml")))


def test_recipes_exist():
    names = {os.path.basename(p) for p in RECIPES}
    assert {"train_quickstart.yaml", "train_vit_b16_gpu.yaml", "train_siglip.yaml",
            "train_lit_minilm.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_every_recipe_loads_and_builds_its_objectives(path):
    from vlp.objectives import parse_objectives

    cfg = load_config(TrainConfig, path)
    parsed = parse_objectives(cfg.objectives)
    assert "contrastive" in parsed
    if parsed["contrastive"].loss.mode == "sigmoid":
        assert cfg.model.init_logit_bias is not None  # the sigmoid loss needs its bias


@pytest.mark.parametrize("override,message", [
    ("objectives={contrastiv: {}}", "unknown objective 'contrastiv'"),
    ("objectives.contrastive.loss.mode=globl", "globl"),
    ("objectives.contrastive.wieght=2", "objectives.contrastive.wieght"),
    ("optim.lr=-1", "lr > 0"),
    ("data.batch_size=1", "data.batch_size"),
    ("scaling.min_workers=5", "min_workers"),
    ("model.max_logit_scale=5", "max_logit_scale"),
    ("feature_accumulation=0", "feature_accumulation"),
    ("run_name=a/b", "run_name"),
])
def test_config_mistakes_fail_at_load_time(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, None, [override])


def test_feature_accumulation_and_gradient_accumulation_exclude_each_other():
    with pytest.raises(ConfigError, match="not both"):
        load_config(TrainConfig, None, ["feature_accumulation=2", "optim.grad_accum_steps=2"])
    assert load_config(TrainConfig, None, ["feature_accumulation=4"]).feature_accumulation == 4


def test_objectives_are_typed_at_load_time_and_logged_with_their_defaults():
    """The objectives section is typed once, on the driver: each objective's whole config, defaults
    filled in, is what MLflow logs as params, and it survives the JSON trip to the workers."""
    default = safe_params(load_config(TrainConfig))
    assert default["objectives.contrastive.loss.mode"] == "grouped"
    assert default["objectives.contrastive.weight"] == "1.0"

    cfg = load_config(TrainConfig, None,
                      ["objectives={contrastive: {loss: {mode: global}}, captioning: {}}"])
    assert isinstance(cfg.objectives["contrastive"], ContrastiveObjective.Config)
    assert isinstance(cfg.objectives["captioning"], CaptioningObjective.Config)
    params = safe_params(cfg)
    assert params["objectives.contrastive.loss.mode"] == "global"
    assert params["objectives.contrastive.loss.negnce_weight"] == "0.0"
    assert params["objectives.captioning.weight"] == "2.0"
    assert params["objectives.captioning.decoder_layers"] == "2"
    assert from_dict(TrainConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg


def test_a_recipe_that_names_another_objective_keeps_the_default_contrastive(tmp_path):
    """A recipe's objectives are merged into the defaults' (the contrastive objective), as before
    they were typed."""
    recipe = tmp_path / "mae.yaml"
    recipe.write_text("model: {image: {name: video_vit}}\nmasking: {vision: {ratio: 0.9}}\n"
                      "objectives: {mae: {decoder_layers: 2}}\n")
    cfg = load_config(TrainConfig, str(recipe))
    assert set(cfg.objectives) == {"contrastive", "mae"}
    assert cfg.objectives["contrastive"] == ContrastiveObjective.Config()
    assert cfg.objectives["mae"].decoder_layers == 2


@pytest.mark.parametrize("overrides,message", [
    (["objectives.contrastive.weight=-1"], "objectives.contrastive.weight must be >= 0"),
    (["objectives.contrastive.loss.mode=sigmoid"], "the sigmoid loss needs a learnable bias"),
    (["objectives={captioning: {decoder_heads: 5}}"], "width 128 is not a multiple of decoder_heads 5"),
    (["objectives={captioning: {decoder_width: 30}}"], "decoder width 30 is not a multiple"),
    (["masking.vision.ratio=0.5"], "tower that encodes visible patches"),
    (["model.image.name=video_vit", "masking.vision.ratio=0.5", "model.fusion.layers=1",
      "objectives={mae: {source: fused}}"], "joint"),
])
def test_objective_combinations_that_cannot_train_fail_at_load_time(overrides, message):
    """Checks of an objective against the model and masking run on the driver, at load time, not
    first in a worker's forward pass."""
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, None, overrides)
