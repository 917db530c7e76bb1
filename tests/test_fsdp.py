"""``scaling.strategy: fsdp`` (FSDP2) against ``ddp``, on real Gloo groups of 2 and 4 ranks.

One spawn per world size runs every scenario (tests/dist_workers.py: ``fsdp_results``); the tests
compare. Promises protected: one FSDP step equals one DDP step (the loss, the global gradient norm that
clipping used, and every updated parameter gathered whole, to 1e-5) for the grouped contrastive loss
on a ViT + BERT dual encoder with activation checkpointing, for GradCache feature accumulation
(SigLIP, with its scalar bias), and for SimVTP's recipe (video tower on visible tubes, joint fusion
encoder, MAE + MLM + contrastive + matching), also with ``reshard_after_forward: false``; FSDP holds
about 1/W of the parameters and of AdamW's moments per rank (counted, not timed); the config names
the strategy and refuses an unknown one.
"""

from __future__ import annotations

import pytest
import torch

from tests import dist_workers
from vlp.config import ConfigError, load_config
from vlp.train.config import ScalingConfig, TrainConfig

WORLD_SIZES = (2, 4)
TOL = 1e-5


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[int, list[dict]]:
    tokenizer = dist_workers.make_tokenizer(str(tmp_path_factory.mktemp("tokenizer")))
    return {world: dist_workers.spawn_ranks(dist_workers.run_fsdp_checks, world,
                                            str(tmp_path_factory.mktemp(f"fsdp{world}")), tokenizer)
            for world in WORLD_SIZES}


CASES = [(world, name, variant) for world in WORLD_SIZES
         for name in dist_workers.fsdp_scenarios()
         for variant in (("fsdp", "fsdp_keep") if name == "simvtp" else ("fsdp",))]


@pytest.mark.parametrize("world,name,variant", CASES)
def test_one_fsdp_step_equals_one_ddp_step(results, world, name, variant):
    """Same loss, same clipped global gradient norm, same parameters after the AdamW update."""
    for rank, ranks in enumerate(results[world]):
        ddp, fsdp = ranks[name]["ddp"], ranks[name][variant]
        assert fsdp["loss"] == pytest.approx(ddp["loss"], abs=TOL), rank
        assert fsdp["grad_norm"] == pytest.approx(ddp["grad_norm"], rel=TOL), rank
        if name != "dual_feature_cache":
            # the step clipped: a norm computed from this rank's shards alone would clip differently
            assert ddp["grad_norm"] > dist_workers.GRAD_CLIP
        assert set(fsdp["params"]) == set(ddp["params"])
        for key, expected in ddp["params"].items():
            torch.testing.assert_close(fsdp["params"][key], expected, rtol=0, atol=TOL, msg=key)
    # the step did move the weights (a no-op step would pass the comparison above)
    before = results[world][0][name]["ddp"]["params"]
    assert results[world][0][name]["ddp"]["loss"] > 0 and len(before) > 10


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_each_rank_holds_about_one_wth_of_parameters_and_optimiser_state(results, world):
    """Local shard elements per rank: parameters and AdamW's exp_avg + exp_avg_sq. Under FSDP they
    add up to the model once over the ranks and no rank holds more than its padded 1/W share; under
    DDP every rank holds it all."""
    for name in dist_workers.fsdp_scenarios():
        sizes = [ranks[name]["fsdp"]["sizes"] for ranks in results[world]]
        total = sizes[0]["total"]
        # every tensor with a dimension is sharded; only the scalars (temperature, bias) are whole
        assert sizes[0]["count"] - sizes[0]["sharded"] in (1, 2), name
        assert sum(s["params"] for s in sizes) == total + (world - 1) * (
            sizes[0]["count"] - sizes[0]["sharded"])  # the scalars are on every rank
        # padding (a tensor's rows split unevenly) costs little: the largest share is near 1/W
        assert sizes[0]["bound"] <= 1.1 * total / world, name
        for s in sizes:
            assert s["params"] <= s["bound"] and s["moments"] <= 2 * s["bound"], name
        ddp = results[world][0][name]["ddp"]["sizes"]
        assert ddp["params"] == total and ddp["moments"] == 2 * total and ddp["sharded"] == 0
    if world == 4:  # twice the ranks, half the memory per rank (within the padding)
        for name in dist_workers.fsdp_scenarios():
            two = max(r[name]["fsdp"]["sizes"]["params"] for r in results[2])
            four = max(r[name]["fsdp"]["sizes"]["params"] for r in results[4])
            assert four <= 0.55 * two, name


def test_the_strategy_is_a_typed_setting():
    assert ScalingConfig().strategy == "ddp" and ScalingConfig().fsdp.reshard_after_forward
    cfg = load_config(TrainConfig, None, ["scaling.strategy=fsdp",
                                          "scaling.fsdp.reshard_after_forward=false"])
    assert cfg.scaling.strategy == "fsdp" and not cfg.scaling.fsdp.reshard_after_forward
    with pytest.raises(ConfigError, match="scaling.strategy"):
        load_config(TrainConfig, None, ["scaling.strategy=zero3"])
    with pytest.raises(ConfigError, match="scaling.strategy must be one of ddp | fsdp"):
        ScalingConfig(strategy="zero3")
