"""The masked-autoencoding objective (``mae``): VideoMAE's pixel reconstruction and SimVTP's joint form.

Protects: targets are the batch's patches (per-patch normalised) in the token order; the loss reads
masked patches only; the decoder can fit a batch; every trainable parameter of the pretraining module
gets a gradient in each configuration (visible-only and mask-token encoding, images and clips, tower
or joint-fusion tokens), which DDP needs; misconfigurations fail at build time with the key named.
"""

from __future__ import annotations

import math

import pytest
import torch

from vlp.config import ConfigError
from vlp.models import DualEncoder, DualEncoderConfig, EncoderConfig
from vlp.models.config import FusionConfig
from vlp.models.masking import keep_to_mask, tube_mask
from vlp.objectives import mae as mae_module  # registers "mae"
from vlp.objectives.mae import (MaskedAutoencoder, default_decoder_width, masked_patch_loss,
                                normalise_patches, patchify)
from vlp.objectives.pretraining import MaskingConfig, PretrainingModel, VisionMaskConfig

IMAGE, FRAMES, PATCH, VOCAB = 32, 4, 8, 60
PATCHES = (IMAGE // PATCH) ** 2
CLS, SEP, PAD, MASK = 2, 3, 0, 1


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(fusion=None, mask_token=False, seed=0):
    torch.manual_seed(seed)
    cfg = DualEncoderConfig(image_size=IMAGE, num_frames=FRAMES, max_text_length=12, embed_dim=32,
                            image=EncoderConfig(name="video_vit", preset="tiny"),
                            # narrower than the visual tower (128), so the fused source's width shows
                            text=EncoderConfig(name="transformer", preset="tiny",
                                               options={"hidden_size": 96, "intermediate_size": 192}),
                            fusion=fusion or FusionConfig())
    return DualEncoder(cfg, vocab_size=VOCAB, pad_token_id=PAD, vision_mask_token=mask_token)


def _pretraining(mae=None, *, ratio=0.75, encode="visible", fusion=None, contrastive=True, seed=0):
    objectives = {"mae": mae or {}}
    if contrastive:
        objectives = {"contrastive": {}, **objectives}
    masking = MaskingConfig(vision=VisionMaskConfig(ratio=ratio, encode=encode))
    net = _model(fusion, mask_token=encode == "mask_token", seed=seed)
    return PretrainingModel(net, objectives, masking, special_ids=[CLS, SEP, PAD],
                            mask_id=MASK).train()


def _batch(b=3, frames=FRAMES, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (b, 3, IMAGE, IMAGE) if frames is None else (b, frames, 3, IMAGE, IMAGE)
    ids = torch.randint(4, VOCAB, (b, 12), generator=g)
    ids[:, 0], ids[:, -1] = CLS, SEP
    attn = torch.ones(b, 12, dtype=torch.long)
    ids[0, 8:], attn[0, 8:] = PAD, 0  # one padded caption
    ids[0, 7] = SEP
    return {"pixels": torch.randn(*shape, generator=g), "input_ids": ids, "attention_mask": attn}


# ---- the maths against plain loops ----------------------------------------------------------------


def test_patchify_and_normalisation_match_a_plain_loop():
    pixels = torch.randn(2, 3, 3, 16, 24)  # 2 clips of 3 frames, a 2 x 3 grid of 8px patches
    patches = patchify(pixels, 8)
    assert patches.shape == (2, 3, 6, 8 * 8 * 3)
    for b in range(2):
        for t in range(3):
            for n in range(6):
                row, col = divmod(n, 3)
                block = pixels[b, t, :, row * 8:(row + 1) * 8, col * 8:(col + 1) * 8]  # (C, p, p)
                values = [float(block[c, i, j]) for i in range(8) for j in range(8) for c in range(3)]
                assert patches[b, t, n].tolist() == pytest.approx(values)
                mean = sum(values) / len(values)
                var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
                expected = [(v - mean) / math.sqrt(var + 1e-6) for v in values]
                assert normalise_patches(patches)[b, t, n].tolist() == pytest.approx(expected, abs=1e-5)
    # an image is a one-frame clip
    assert torch.equal(patchify(pixels[:, 0], 8), patches[:, :1])


def test_masked_patch_loss_matches_a_loop_and_ignores_visible_patches():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 3, 16, 12, generator=g), torch.randn(2, 3, 16, 12, generator=g)
    keep = tube_mask(2, 16, 0.75, generator=g)
    masked = keep_to_mask(keep, 16)
    errors = [float(((pred[b, t, n] - target[b, t, n]) ** 2).mean())
              for b in range(2) for t in range(3) for n in range(16) if masked[b, n]]
    loss = masked_patch_loss(pred, target, masked)
    assert len(errors) == 2 * 3 * 12
    assert float(loss) == pytest.approx(sum(errors) / len(errors), rel=1e-5)

    visible = pred.clone()
    visible[0, 2, int(keep[0, 1])] += 100.0  # a visible patch of the last frame
    visible[1, 0, int(keep[1, 0])] -= 50.0
    assert float(masked_patch_loss(visible, target, masked)) == float(loss)
    hidden = pred.clone()
    hidden[0, 2, int(masked[0].nonzero()[0])] += 1.0
    assert float(masked_patch_loss(hidden, target, masked)) > float(loss)


def test_default_decoder_width_is_half_the_source_at_least_32_and_fits_the_heads():
    assert default_decoder_width(768, 4) == 384
    assert default_decoder_width(128, 4) == 64
    assert default_decoder_width(40, 4) == 32
    assert default_decoder_width(200, 6) == 102


# ---- the objective in the pretraining module ------------------------------------------------------


@pytest.mark.parametrize("encode,frames", [("visible", FRAMES), ("visible", None), ("visible", 2),
                                           ("mask_token", FRAMES)])
def test_shapes_and_the_loss_reads_the_batch_targets_at_masked_patches(encode, frames):
    pre = _pretraining(encode=encode)
    objective = pre.objectives["mae"]
    assert objective.width == 64 and objective.patch_size == PATCH  # half of the tiny tower's 128
    assert (objective.mask_token is None) == (encode == "mask_token")
    batch = _batch(frames=frames)
    torch.manual_seed(7)
    outputs = pre.encode(batch)
    vision = outputs["vision"]
    t = 1 if frames is None else frames
    k = 4  # 16 patches at 0.75
    assert vision.tokens.shape == (3, 1 + t * (PATCHES if encode == "mask_token" else k), 128)
    predictions = objective.decode(vision.tokens, vision.frames, vision.keep)
    assert predictions.shape == (3, t, PATCHES, PATCH * PATCH * 3)
    result = objective(outputs, batch, pre.model)
    targets = normalise_patches(patchify(batch["pixels"], PATCH))
    torch.testing.assert_close(result.loss, masked_patch_loss(predictions, targets, vision.masked))
    assert result.metrics["masked_fraction"] == pytest.approx(0.75)
    assert result.loss.ndim == 0 and torch.isfinite(result.loss)


def test_norm_pix_loss_off_reconstructs_the_pixels_as_given():
    pre = _pretraining({"norm_pix_loss": False, "decoder_width": 48, "decoder_layers": 2,
                        "decoder_heads": 3})
    objective = pre.objectives["mae"]
    assert objective.width == 48 and len(objective.decoder.blocks) == 2
    batch = _batch()
    torch.testing.assert_close(objective.targets(batch["pixels"]), patchify(batch["pixels"], PATCH))


def test_no_loss_in_evaluation_where_nothing_is_masked():
    pre = _pretraining().eval()
    batch = _batch()
    with torch.no_grad():
        outputs, results = pre(batch)
    assert outputs["vision"].masked is None
    assert float(results["mae"].loss) == 0.0 and results["mae"].metrics["masked_fraction"] == 0.0


def test_loss_falls_when_overfitting_one_batch():
    pre = _pretraining(contrastive=False, seed=3)
    batch = _batch(b=2, seed=4)
    # a still clip: 24 distinct masked patches to memorise (random frames would ask for 96, more than
    # the 64-wide decoder's last layer can fit exactly)
    batch["pixels"] = batch["pixels"][:, :1].expand(-1, FRAMES, -1, -1, -1).contiguous()
    optimizer = torch.optim.Adam(pre.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        torch.manual_seed(0)  # the same masks each step: one batch, one mask, to be memorised
        _, results = pre(batch)
        optimizer.zero_grad()
        results["mae"].loss.backward()
        optimizer.step()
        losses.append(float(results["mae"].loss.detach()))
    assert losses[0] > 0.8  # normalised targets: about 1 before training
    assert losses[-1] < 0.5 * losses[0], losses


CONFIGS = {
    "video, visible": dict(frames=FRAMES),
    "image, visible": dict(frames=None),
    "video, mask tokens": dict(frames=FRAMES, encode="mask_token"),
    "image, mask tokens": dict(frames=None, encode="mask_token"),
    "video, fused (joint), visible": dict(frames=FRAMES, mae={"source": "fused"},
                                          fusion=FusionConfig(layers=1, mode="joint")),
    "video, fused (joint), mask tokens": dict(frames=FRAMES, mae={"source": "fused"}, encode="mask_token",
                                              fusion=FusionConfig(layers=1, mode="joint")),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_trainable_parameter_gets_a_gradient(name):
    """With the contrastive objective beside it (the text tower's only loss when no MLM runs), every
    parameter of the pretraining module, the decoder's included, gets a finite gradient."""
    config = dict(CONFIGS[name])
    frames = config.pop("frames")
    pre = _pretraining(**config)
    if "fusion" in config:
        assert "fused_masked" in pre.plan.needs and "masked_text" in pre.plan.needs
        assert pre.objectives["mae"].embed.in_features == pre.model.fusion_width == 96
        assert pre.objectives["mae"].width == 48
    _, results = pre(_batch(frames=frames))
    sum(pre.objectives[n].cfg.weight * r.loss for n, r in results.items()).backward()
    missing = [n for n, p in pre.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in pre.parameters() if p.grad is not None)
    decoder = [n for n, _ in pre.named_parameters() if n.startswith("objectives.mae.")]
    assert any("decoder.blocks.0" in n for n in decoder)


def test_fused_source_reads_the_joint_fusion_encoders_visual_tokens():
    pre = _pretraining({"source": "fused"}, fusion=FusionConfig(layers=1, mode="joint"))
    batch = _batch()
    torch.manual_seed(5)
    outputs = pre.encode(batch)
    objective = pre.objectives["mae"]
    fused = outputs["fused_masked"].vision
    assert fused.shape[:2] == outputs["vision"].tokens.shape[:2]
    expected = masked_patch_loss(objective.decode(fused, FRAMES, outputs["vision"].keep),
                                 objective.targets(batch["pixels"]), outputs["vision"].masked)
    torch.testing.assert_close(objective(outputs, batch, pre.model).loss, expected)


def test_misconfigurations_fail_at_build_time():
    with pytest.raises(ConfigError, match="masking.vision.ratio"):
        _pretraining(ratio=0.0)
    with pytest.raises(ConfigError, match="joint"):
        _pretraining({"source": "fused"}, fusion=FusionConfig(layers=1, mode="cross"))
    with pytest.raises(ConfigError, match="fusion"):
        _pretraining({"source": "fused"})  # no fusion encoder at all
    with pytest.raises(ConfigError, match="decoder_width"):
        _pretraining({"decoder_width": 50, "decoder_heads": 4})
    assert MaskedAutoencoder.requirements(MaskedAutoencoder.Config()) == (frozenset({"vision"}), False)
    assert MaskedAutoencoder.needs_vision_mask and mae_module.MaskedAutoencoder is MaskedAutoencoder
