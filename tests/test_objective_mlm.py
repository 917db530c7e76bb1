"""The masked language modelling objective ("mlm"), built through PretrainingModel as the trainer does."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlp.config import ConfigError
from vlp.models import DualEncoder
from vlp.models.config import DualEncoderConfig, EncoderConfig, FusionConfig
from vlp.models.fusion import FusedTokens
from vlp.models.masking import IGNORE_INDEX, MaskedText
from vlp.objectives import mlm as _mlm  # noqa: F401  (registers "mlm")
from vlp.objectives.pretraining import MaskingConfig, PretrainingModel, TextMaskConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB, PAD, CLS, SEP, MASK = 40, 0, 2, 3, 4
SPECIAL = [PAD, CLS, SEP]

# name -> (text tower, fusion, conditioned)
SETUPS = {
    "joint": ("transformer", FusionConfig(layers=1, mode="joint"), True),  # SimVTP
    "cross": ("bert", FusionConfig(layers=1, mode="cross"), True),  # ALBEF / LAVENDER
    "shared": ("transformer", FusionConfig(share_text_encoder=True), True),  # SNP-S3
    "text_only": ("bert", FusionConfig(), False),  # BERT
}


# Narrower than the tiny presets: the file runs 16 models' forward and backward on 2 shared cores.
SMALL = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)


def _pretraining(setup: str, ratio: float = 0.3, contrastive: bool = True) -> PretrainingModel:
    text, fusion, conditioned = SETUPS[setup]
    cfg = DualEncoderConfig(image_size=16, num_frames=2, max_text_length=12, embed_dim=16,
                            image=EncoderConfig(name="video_vit", preset="tiny", options=SMALL),
                            text=EncoderConfig(name=text, options=SMALL), fusion=fusion)
    objectives = {"mlm": {"conditioned": conditioned}}
    if contrastive:
        objectives["contrastive"] = {}
    return PretrainingModel(DualEncoder(cfg, vocab_size=VOCAB, pad_token_id=PAD), objectives,
                            MaskingConfig(text=TextMaskConfig(ratio=ratio)), special_ids=SPECIAL,
                            mask_id=MASK)


def _batch(b: int = 4, length: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (b, length), generator=g)
    ids[:, 0] = CLS
    attn = torch.ones(b, length, dtype=torch.long)
    for i in range(b):  # captions of different lengths, padded
        end = length - i
        ids[i, end - 1] = SEP
        ids[i, end:] = PAD
        attn[i, end:] = 0
    return {"pixels": torch.randn(b, 2, 3, 16, 16, generator=g), "input_ids": ids,
            "attention_mask": attn}


@pytest.mark.parametrize("setup", list(SETUPS))
def test_loss_is_cross_entropy_over_the_masked_tokens_only(setup):
    """The loss is F.cross_entropy of the head's logits at exactly the positions mask_text chose,
    read from the fusion encoder (conditioned) or the text tower (not); accuracy is argmax agreement."""
    torch.manual_seed(0)
    pre = _pretraining(setup).train()
    outputs, results = pre(_batch())
    mlm = pre.objectives["mlm"]
    labels = outputs["masked_text"].labels
    hidden = outputs["fused_masked"].text if mlm.cfg.conditioned else outputs["masked_text_hidden"]
    logits = mlm.logits(hidden)
    assert logits.shape == (4, 12, VOCAB)
    chosen = labels != IGNORE_INDEX
    assert 0 < chosen.sum() < outputs["masked_text"].input_ids.ne(PAD).sum()
    expected = F.cross_entropy(logits[chosen], labels[chosen])
    torch.testing.assert_close(results["mlm"].loss, expected)
    # the same as BERT's formulation over all positions with ignore_index
    torch.testing.assert_close(results["mlm"].loss,
                               F.cross_entropy(logits.flatten(0, 1), labels.flatten()))
    accuracy = (logits[chosen].argmax(-1) == labels[chosen]).float().mean()
    assert results["mlm"].metrics["accuracy"] == pytest.approx(float(accuracy))


@pytest.mark.parametrize("conditioned", [True, False])
def test_unmasked_positions_do_not_change_the_loss(conditioned):
    """Changing the states (or what stands) at positions with label -100 leaves the loss as is;
    changing a masked position's state changes it."""
    pre = _pretraining("cross" if conditioned else "text_only")
    mlm = pre.objectives["mlm"]
    torch.manual_seed(1)
    hidden = torch.randn(2, 6, mlm.head[0].in_features)
    labels = torch.full((2, 6), IGNORE_INDEX)
    labels[0, 2], labels[1, 4] = 7, 9

    def loss(h):
        masked = MaskedText(torch.zeros(2, 6, dtype=torch.long), labels)
        out = ({"masked_text": masked, "fused_masked": FusedTokens(h)} if conditioned
               else {"masked_text": masked, "masked_text_hidden": h})
        return mlm(out, {}).loss

    base = loss(hidden)
    other = hidden.clone()
    other[labels == IGNORE_INDEX] = torch.randn_like(other[labels == IGNORE_INDEX])
    torch.testing.assert_close(loss(other), base)
    moved = hidden.clone()
    moved[0, 2] += 1.0
    assert not torch.allclose(loss(moved), base)


def test_requirements_and_head_width_follow_conditioned():
    cls = _mlm.MaskedLanguageModelling
    assert cls.requirements(cls.Config()) == (frozenset({"fused_masked"}), True)
    assert cls.requirements(cls.Config(conditioned=False)) == (frozenset({"masked_text_hidden"}), False)
    for setup in SETUPS:
        pre = _pretraining(setup)
        model, head = pre.model, pre.objectives["mlm"].head
        width = model.fusion_width if SETUPS[setup][2] else model.text_encoder.width
        assert head[0].in_features == width and head[-1].out_features == model.vocab_size
    # text-only MLM runs without a fusion encoder; video-conditioned MLM needs one
    assert "fused_masked" not in _pretraining("text_only").plan.needs
    cfg = DualEncoderConfig(image_size=16, image=EncoderConfig(name="video_vit", options=SMALL),
                            text=EncoderConfig(name="bert", options=SMALL))
    with pytest.raises(ConfigError, match="fusion encoder"):
        PretrainingModel(DualEncoder(cfg, vocab_size=VOCAB), {"mlm": {}}, MaskingConfig(),
                         special_ids=SPECIAL, mask_id=MASK)


def test_nothing_masked_gives_a_zero_loss_that_reaches_the_head():
    """A batch with no maskable token (every caption empty) must not give NaN, and the head still
    takes part in backward (DDP expects every parameter used)."""
    pre = _pretraining("text_only", contrastive=False)
    mlm = pre.objectives["mlm"]
    labels = torch.full((2, 5), IGNORE_INDEX)
    hidden = torch.randn(2, 5, mlm.head[0].in_features, requires_grad=True)
    out = mlm({"masked_text": MaskedText(torch.zeros(2, 5, dtype=torch.long), labels),
               "masked_text_hidden": hidden}, {})
    assert float(out.loss.detach()) == 0.0
    out.loss.backward()
    assert all(p.grad is not None and not p.grad.any() for p in mlm.parameters())


@pytest.mark.parametrize("setup", list(SETUPS))
def test_every_trainable_parameter_gets_a_gradient(setup):
    torch.manual_seed(0)
    pre = _pretraining(setup).train()
    _, results = pre(_batch())
    total = sum(pre.objectives[name].cfg.weight * out.loss for name, out in results.items())
    total.backward()
    missing = [n for n, p in pre.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    bad = [n for n, p in pre.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, bad


@pytest.mark.parametrize("setup", list(SETUPS))
def test_loss_falls_when_overfitting_one_batch(setup):
    torch.manual_seed(0)
    pre = _pretraining(setup, ratio=0.5, contrastive=False).train()
    batch = _batch(b=4, length=8)
    opt = torch.optim.Adam(pre.parameters(), lr=5e-3)
    losses = []
    for _ in range(20):
        torch.manual_seed(1)  # the same masks every step: one batch, overfit
        _, results = pre(batch)
        opt.zero_grad()
        results["mlm"].loss.backward()
        opt.step()
        losses.append(float(results["mlm"].loss.detach()))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)
