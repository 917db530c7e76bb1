"""The training step's two forms, checked against plain references on one process."""

from __future__ import annotations

import contextlib

import pytest
import torch

from vlp.models import DualEncoder, DualEncoderConfig, EncoderConfig
from vlp.objectives.pretraining import MaskingConfig, PretrainingModel
from vlp.train.steps import NonFiniteLossError, StepContext, feature_cache_step, plain_step

NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def _setup(seed=0, **model):
    torch.manual_seed(seed)
    cfg = DualEncoderConfig(image_size=16, max_text_length=8, embed_dim=16,
                            image=EncoderConfig(name="vit", options={"patch_size": 8, **NO_DROPOUT}),
                            text=EncoderConfig(name="bert", options=NO_DROPOUT), **model)
    net = DualEncoder(cfg, vocab_size=40).train()
    g = torch.Generator().manual_seed(seed + 1)
    batch = {"pixels": torch.randn(12, 3, 16, 16, generator=g),
             "input_ids": torch.randint(4, 40, (12, 8), generator=g),
             "attention_mask": torch.ones(12, 8, dtype=torch.long)}
    return net, batch


def _ctx(net, mode="global"):
    wrapped = PretrainingModel(net, {"contrastive": {"loss": {"mode": mode}}}, MaskingConfig(),
                               special_ids=[0], mask_id=1).train()
    return StepContext(model=wrapped, ddp=wrapped, autocast=contextlib.nullcontext)


def _split(batch, n):
    size = batch["pixels"].shape[0] // n
    return [{k: v[i * size:(i + 1) * size] for k, v in batch.items()} for i in range(n)]


def _grads(net):
    return {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode,bias", [("global", None), ("sigmoid", -10.0)])
def test_feature_cache_step_equals_one_big_batch(mode, bias):
    """GradCache over 3 micro-batches of 4 = one step on the batch of 12 (same negatives), in loss
    and in every parameter's gradient, including the temperature's."""
    net, batch = _setup(init_logit_bias=bias)
    big = plain_step(_ctx(net, mode), [batch])
    reference = _grads(net)
    net.zero_grad(set_to_none=True)
    cached = feature_cache_step(_ctx(net, mode), _split(batch, 3))
    ours = _grads(net)
    assert cached.loss == pytest.approx(big.loss, rel=1e-5)
    assert set(ours) == set(reference) and "logit_scale" in ours
    # relative to each tensor's norm (float32 sums in another order), with a floor for gradients that
    # are zero in exact arithmetic (an attention key bias) and only rounding noise here
    floor = 1e-6 * max(g.norm().item() for g in reference.values())
    for name in reference:
        error = (ours[name] - reference[name]).norm().item()
        assert error <= 1e-4 * reference[name].norm().item() + floor, name


def test_plain_step_with_micro_batches_averages_their_losses():
    net, batch = _setup()
    parts = _split(batch, 2)
    expected = []
    for part in parts:
        net.zero_grad(set_to_none=True)
        expected.append((plain_step(_ctx(net), [part]).loss, _grads(net)))
    net.zero_grad(set_to_none=True)
    result = plain_step(_ctx(net), parts)
    assert result.loss == pytest.approx((expected[0][0] + expected[1][0]) / 2, rel=1e-6)
    for name, grad in _grads(net).items():
        torch.testing.assert_close(grad, (expected[0][1][name] + expected[1][1][name]) / 2,
                                   rtol=1e-5, atol=1e-7)


def test_a_non_finite_loss_raises_before_any_gradient_is_applied():
    net, batch = _setup()
    batch["pixels"][0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 0"):
        plain_step(_ctx(net), [batch])
    assert all(p.grad is None for p in net.parameters())
