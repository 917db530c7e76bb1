"""Every registered objective, through the pretraining module exactly as the trainer builds it.

The registry-wide test (timm's pattern): each objective in ``OBJECTIVES`` must have a tiny setup here
(a new objective without one fails ``test_every_registered_objective_has_a_setup``), and with it the
shared pass must give a finite loss and a gradient to every trainable parameter (DDP stalls on a
parameter without one), on images and on clips. Also: the plan of the shared pass (which outputs are
computed) and the config errors that keep a run from starting with objectives that cannot work.
"""

from __future__ import annotations

import pytest
import torch

from vlp.config import ConfigError, from_dict, to_dict
from vlp.models import DualEncoder, DualEncoderConfig
from vlp.objectives import OBJECTIVES, parse_objectives
from vlp.objectives.pretraining import (MaskingConfig, PretrainingModel, check_objectives, check_plan,
                                        plan_pass)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB, LENGTH = 60, 12
SPECIAL = [0, 2, 3]  # [PAD], [CLS], [SEP]
MASK_ID = 4

# name -> (objectives section, masking, model overrides); contrastive rides along where the method
# combines it, so shared parameters are exercised together.
SETUPS = {
    "contrastive": ({"contrastive": {"loss": {"mode": "global", "negnce_weight": 0.5}}}, {}, {}),
    "mae": ({"contrastive": {}, "mae": {"decoder_layers": 1}}, {"vision": {"ratio": 0.75}}, {}),
    "mlm": ({"contrastive": {}, "mlm": {"conditioned": True}}, {"text": {"ratio": 0.3}},
            {"fusion": {"layers": 1, "mode": "cross"}}),
    "matching": ({"contrastive": {}, "matching": {"negatives": "hard"}}, {},
                 {"fusion": {"layers": 1, "mode": "joint"}}),
    "word_matching": ({"contrastive": {}, "word_matching": {}}, {}, {}),
    "captioning": ({"contrastive": {}, "captioning": {"decoder_layers": 1}}, {}, {}),
}


def _model_cfg(frames: int, **overrides) -> DualEncoderConfig:
    return from_dict(DualEncoderConfig, {
        "image": {"name": "video_vit", "preset": "tiny", "options": {"num_hidden_layers": 1}},
        "text": {"name": "transformer", "preset": "tiny", "options": {"num_hidden_layers": 1}},
        "image_size": 16, "num_frames": frames, "max_text_length": LENGTH, "embed_dim": 16,
        **overrides})


def _batch(frames: int, batch: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (batch, 3, 16, 16) if frames == 1 else (batch, frames, 3, 16, 16)
    ids = torch.randint(5, VOCAB, (batch, LENGTH), generator=g)
    ids[:, 0], ids[:, -3] = 2, 3
    ids[:, -2:] = 0
    attention = (ids != 0).long()
    significant = torch.zeros_like(ids)
    significant[:, 1], significant[:, 2:4], significant[:, 5] = 1, 2, 3  # word 2 spans two tokens
    return {"pixels": torch.randn(shape, generator=g), "input_ids": ids,
            "attention_mask": attention, "significant": significant}


def _pretraining(name: str, frames: int) -> PretrainingModel:
    section, masking, model = SETUPS[name]
    torch.manual_seed(0)
    masking_cfg = from_dict(MaskingConfig, masking)
    net = DualEncoder(_model_cfg(frames, **model), vocab_size=VOCAB,
                      vision_mask_token=masking_cfg.vision.encode == "mask_token")
    return PretrainingModel(net, section, masking_cfg, special_ids=SPECIAL, mask_id=MASK_ID).train()


def test_every_registered_objective_has_a_setup():
    assert set(OBJECTIVES.names()) == set(SETUPS)


@pytest.mark.parametrize("frames", [1, 4], ids=["images", "clips"])
@pytest.mark.parametrize("name", sorted(SETUPS))
def test_each_objective_trains_every_parameter(name, frames):
    pretraining = _pretraining(name, frames)
    _, results = pretraining(_batch(frames))
    total = sum(pretraining.objectives[k].cfg.weight * out.loss for k, out in results.items())
    assert torch.isfinite(total)
    total.backward()
    missing = [n for n, p in pretraining.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    bad = [n for n, p in pretraining.named_parameters() if p.grad is not None
           and not torch.isfinite(p.grad).all()]
    assert not bad, bad
    assert all(isinstance(v, (float, torch.Tensor)) for out in results.values() for v in out.metrics.values())


@pytest.mark.parametrize("name", sorted(SETUPS))
def test_evaluation_mode_sees_whole_inputs(name):
    """No masks outside training: the visual pass keeps every patch (1 + T * N tokens)."""
    pretraining = _pretraining(name, 4).eval()
    with torch.no_grad():
        outputs = pretraining(_batch(4), encode_only=True)
    if "vision" in outputs:
        vision = outputs["vision"]
        assert vision.keep is None and vision.masked is None
        assert vision.tokens.shape[1] == 1 + 4 * vision.patches


def test_the_plan_computes_what_the_objectives_declare_and_nothing_more():
    parse = parse_objectives
    assert plan_pass(parse({"contrastive": {}}), MaskingConfig()).needs == frozenset()
    simvtp = plan_pass(parse({"mae": {"source": "fused"}, "mlm": {}}),
                       from_dict(MaskingConfig, {"vision": {"ratio": 0.9}, "text": {"ratio": 0.75}}))
    assert {"vision", "masked_text", "fused_masked"} <= simvtp.needs and simvtp.uses_fusion
    snp = plan_pass(parse({"mlm": {}}), from_dict(MaskingConfig, {"text": {"strategy": "significant"}}))
    assert snp.needs_significant
    plain = plan_pass(parse({"mlm": {"conditioned": False}}), MaskingConfig())
    assert not plain.uses_fusion and "masked_text_hidden" in plain.needs


@pytest.mark.parametrize("section,masking,model,message", [
    ({"mae": {}}, {}, {}, "masking.vision.ratio"),
    ({"matching": {}}, {}, {}, "fusion encoder"),
    ({"contrastive": {}}, {}, {"fusion": {"layers": 1}}, "no objective uses it"),
    ({"contrastive": {}}, {"vision": {"encode": "mask_token"}}, {}, "ratio > 0"),
])
def test_objectives_that_cannot_work_are_refused_at_load_time(section, masking, model, message):
    with pytest.raises(ConfigError, match=message):
        masking_cfg = from_dict(MaskingConfig, masking)
        check_plan(plan_pass(parse_objectives(section), masking_cfg), _model_cfg(4, **model), masking_cfg)


@pytest.mark.parametrize("name", sorted(SETUPS))
def test_each_objective_config_is_typed_once_and_round_trips(name):
    """``parse_objectives`` types a section and passes typed configs through, and a typed config's
    plain form (a worker's JSON payload) parses back to an equal one; its setup passes the load-time
    checks."""
    section, masking, model = SETUPS[name]
    parsed = parse_objectives(section)
    assert all(isinstance(cfg, OBJECTIVES.get(n).Config) for n, cfg in parsed.items())
    assert parse_objectives(parsed) == parsed
    assert parse_objectives(to_dict(parsed)) == parsed
    check_objectives(parsed, _model_cfg(4, **model), from_dict(MaskingConfig, masking))


@pytest.mark.parametrize("section,masking,model,message", [
    ({"contrastive": {"loss": {"mode": "sigmoid"}}}, {}, {}, "sigmoid loss needs a learnable bias"),
    ({"mae": {}}, {"vision": {"ratio": 0.5}}, {"image": {"name": "vit", "preset": "tiny"}},
     "tower that encodes visible patches"),
    ({"mae": {"source": "fused"}}, {"vision": {"ratio": 0.5}}, {"fusion": {"layers": 1, "mode": "cross"}},
     "joint"),
    ({"captioning": {"decoder_heads": 5}}, {}, {}, "decoder width 128 is not a multiple"),
])
def test_objective_checks_against_the_model_run_before_any_forward(section, masking, model, message):
    """What used to fail in a worker's first forward pass or build fails in ``check_objectives`` (run
    by ``TrainConfig`` at load time)."""
    masking_cfg = from_dict(MaskingConfig, masking)
    with pytest.raises(ConfigError, match=message):
        check_objectives(parse_objectives(section), _model_cfg(4, **model), masking_cfg)


def test_visual_masking_needs_a_tower_that_drops_patches():
    net = DualEncoder(_model_cfg(1, image={"name": "vit", "preset": "tiny"}), vocab_size=VOCAB)
    with pytest.raises(ConfigError, match="video_vit"):
        PretrainingModel(net, {"contrastive": {}}, from_dict(MaskingConfig, {"vision": {"ratio": 0.5}}),
                         special_ids=SPECIAL, mask_id=MASK_ID)


def test_mac_takes_the_contrastive_embedding_from_the_visible_patches_only():
    """With a 75% tube mask the visual pass holds 1 + T * K tokens (K = a quarter of the patches), and
    the embedding is the pooled feature of exactly those tokens."""
    torch.manual_seed(0)
    net = DualEncoder(_model_cfg(4), vocab_size=VOCAB)
    pretraining = PretrainingModel(net, {"contrastive": {}}, from_dict(MaskingConfig, {"vision": {"ratio": 0.75}}),
                                   special_ids=SPECIAL, mask_id=MASK_ID).train()
    batch = _batch(4)
    torch.manual_seed(7)
    outputs = pretraining(batch, encode_only=True)
    vision = outputs["vision"]
    assert vision.keep.shape == (4, 1) and vision.tokens.shape[1] == 1 + 4 * 1
    torch.manual_seed(7)  # the same mask again, drawn by the same RNG state
    again = net.encode_vision_tokens(batch["pixels"], vision.keep)
    torch.testing.assert_close(outputs["image_embeds"], net.embed_vision(again.pooled))
