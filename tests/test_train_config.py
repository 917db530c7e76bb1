"""Training configs: every shipped recipe loads, and mistakes fail at load time naming the key."""

from __future__ import annotations

import glob
import os

import pytest

from vlp.config import ConfigError, load_config
from vlp.train.config import TrainConfig

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
