"""Video towers: images are one-frame videos, every parameter trains, ``video_vit`` sees frame order
(it learns the direction of motion that the meanP ``vit`` provably cannot), joint and divided attention
are different functions that both train, checkpointing keeps the maths, and VideoMAE's tubelets and
pretrained folders are checked."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vlp.config import ConfigError
from vlp.models import IMAGE_ENCODERS, DualEncoder, DualEncoderConfig, EncoderConfig, build_encoder

TOWERS = [("video_vit", {"attention": "joint"}, "cls"), ("video_vit", {"attention": "divided"}, "cls"),
          ("videomae", {}, "mean")]
TOWER_IDS = ["joint", "divided", "videomae"]


def _tower(name: str, options: dict | None = None, pooling: str = "cls", *, image_size: int = 32,
           num_frames: int = 4, seed: int = 0, **cfg) -> nn.Module:
    torch.manual_seed(seed)
    return build_encoder(IMAGE_ENCODERS, EncoderConfig(name=name, options=options or {},
                                                       pooling=pooling, **cfg),
                         image_size=image_size, num_frames=num_frames)


@pytest.mark.parametrize("name,options,pooling", TOWERS, ids=TOWER_IDS)
def test_a_video_tower_maps_images_and_clips_to_features_and_an_image_is_a_one_frame_clip(
        name, options, pooling):
    tower = _tower(name, options, pooling).eval()
    image, clip = torch.randn(2, 3, 32, 32), torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        assert tower(image).shape == tower(clip).shape == (2, tower.width)
        assert tower(clip[:, :2]).shape == (2, tower.width)  # a shorter clip uses the first positions
        torch.testing.assert_close(tower(image.unsqueeze(1)), tower(image))
        if name == "videomae":  # an image is repeated to one tubelet
            torch.testing.assert_close(tower(image.unsqueeze(1).expand(-1, 2, -1, -1, -1)),
                                       tower(image))


@pytest.mark.parametrize("name,options,pooling", TOWERS, ids=TOWER_IDS)
def test_every_parameter_of_a_video_tower_gets_a_finite_nonzero_gradient(name, options, pooling):
    tower = _tower(name, options, pooling)
    tower(torch.randn(2, 4, 3, 32, 32)).square().mean().backward()
    for n, p in tower.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, n


def test_video_vit_sees_frame_order_and_the_meanp_vit_does_not():
    clip = torch.randn(2, 4, 3, 32, 32)
    reordered = clip[:, [2, 0, 3, 1]]
    with torch.no_grad():
        for options in ({"attention": "joint"}, {"attention": "divided"}):
            tower = _tower("video_vit", options).eval()
            assert (tower(clip) - tower(reordered)).abs().max() > 1e-3, options
        meanp = _tower("vit").eval()
        torch.testing.assert_close(meanp(reordered), meanp(clip), atol=1e-5, rtol=1e-5)


def test_divided_attention_is_joint_attention_split_into_time_then_space():
    """With the joint model's weights and the temporal step switched off, a divided model equals it on
    images (one frame: spatial attention is all there is) and differs on clips (it never attends
    across frames), so the two are different functions, not two initialisations."""
    joint = _tower("video_vit", {"attention": "joint"}).eval()
    divided = _tower("video_vit", {"attention": "divided"}, seed=1).eval()
    renamed = {".norm1.": ".space_norm.", ".attn.": ".space_attn.", ".norm2.": ".mlp_norm."}
    state = {}
    for key, value in joint.state_dict().items():
        for old, new in renamed.items():
            key = key.replace(old, new)
        state[key] = value
    missing, unexpected = divided.load_state_dict(state, strict=False)
    assert not unexpected and all(".time_" in key for key in missing)
    with torch.no_grad():
        for block in divided.blocks:
            block.time_attn.proj.weight.zero_()
            block.time_attn.proj.bias.zero_()
        image, clip = torch.randn(2, 3, 32, 32), torch.randn(2, 4, 3, 32, 32)
        torch.testing.assert_close(divided(image), joint(image), atol=1e-5, rtol=1e-5)
        assert (divided(clip) - joint(clip)).abs().max() > 1e-3


@pytest.mark.parametrize("attention", ["joint", "divided"])
def test_a_video_vit_checkpoint_with_fused_qkv_projections_still_loads(attention):
    """Model checkpoints written while the video blocks had their own attention (one ``qkv`` projection
    per attention) load into the shared ``Attention``'s ``q`` and ``kv``, nested in a dual encoder as
    ``vlp eval`` loads them, and give the same features."""
    cfg = DualEncoderConfig(image=EncoderConfig(name="video_vit", options={"attention": attention}),
                            num_frames=4, image_size=32, max_text_length=8, embed_dim=16)
    torch.manual_seed(0)
    saved = DualEncoder(cfg, vocab_size=50).eval()
    old_format = {}
    for key, value in saved.state_dict().items():
        if key.startswith("image_encoder.") and ".kv." in key:
            head, leaf = key.rsplit(".kv.", 1)
            old_format[f"{head}.qkv.{leaf}"] = torch.cat([old_format.pop(f"{head}.q.{leaf}"), value])
        else:
            old_format[key] = value
    assert any(".qkv." in key for key in old_format) and not any(".q." in key for key in old_format)
    torch.manual_seed(1)
    loaded = DualEncoder(cfg, vocab_size=50).eval()
    loaded.load_state_dict(old_format)  # strict: every key is matched
    clip = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(clip), saved.encode_image(clip))


def _motion_clips(pairs: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """4 frames of 16x16: a bright 4x4 square moving right (label 1) and the same frames reversed
    (moving left, label 0). Both orders have the same frames, so only frame order tells them apart."""
    g = torch.Generator().manual_seed(seed)
    clips, labels = [], []
    for _ in range(pairs):
        step = int(torch.randint(3, 5, (), generator=g))
        x0 = int(torch.randint(0, 16 - 4 - 3 * step + 1, (), generator=g))
        y = int(torch.randint(0, 13, (), generator=g))
        clip = torch.full((4, 3, 16, 16), -1.0)
        for t in range(4):
            clip[t, :, y:y + 4, x0 + t * step:x0 + t * step + 4] = 1.0
        clips += [clip, clip.flip(0)]
        labels += [1, 0]
    return torch.stack(clips), torch.tensor(labels)


def _fit_motion(tower: nn.Module, steps: int = 30) -> tuple[list[float], torch.Tensor]:
    """Fit a linear probe and the tower on 8 clip pairs with Adam; returns losses and last logits.

    The probe standardises features (BatchNorm without affine, as MAE's linear probe) and starts at
    zero: the clips of a pair share their content, so their features differ little at first, and a
    plain random head spends its first steps on the shared part (Adam's second moments then keep the
    small order signal from moving anything for hundreds of steps)."""
    probe = nn.Sequential(nn.BatchNorm1d(tower.width, affine=False, track_running_stats=False),
                          nn.Linear(tower.width, 2))
    nn.init.zeros_(probe[1].weight)
    nn.init.zeros_(probe[1].bias)
    clips, labels = _motion_clips(8)
    opt = torch.optim.Adam([*tower.parameters(), *probe.parameters()], lr=1e-3)
    losses = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(probe(tower(clips)), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        return losses, probe(tower(clips))


@pytest.mark.parametrize("attention", ["joint", "divided"])
def test_video_vit_learns_the_direction_of_motion(attention):
    """The honest check of the temporal position embeddings: fit motion direction in 30 steps."""
    losses, logits = _fit_motion(_tower("video_vit", {"attention": attention}, image_size=16))
    labels = _motion_clips(8)[1]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6) and losses[-1] < 0.3, losses
    assert (logits.argmax(-1) == labels).float().mean() >= 0.9


def test_the_meanp_vit_cannot_beat_chance_on_the_direction_of_motion():
    """A clip and its reversal give meanP the same features, so each pair gets one label right."""
    losses, logits = _fit_motion(_tower("vit", image_size=16))
    labels = _motion_clips(8)[1]
    torch.testing.assert_close(logits[0::2], logits[1::2], atol=1e-4, rtol=1e-4)
    assert min(losses) > math.log(2) - 1e-3  # identical pair features: ln 2 is the best loss
    assert (logits.argmax(-1) == labels).float().mean() == 0.5


@pytest.mark.parametrize("name,options,pooling", TOWERS, ids=TOWER_IDS)
def test_gradient_checkpointing_gives_the_same_gradients_and_recomputes(name, options, pooling):
    grads, calls = [], []
    clip = torch.randn(2, 4, 3, 32, 32)
    for checkpointing in (False, True):
        tower = _tower(name, options, pooling, gradient_checkpointing=checkpointing).train()
        # a module inside the first block: transformers checkpoints a layer's forward, not its hooks
        inner = (tower.blocks[0].mlp if name == "video_vit"
                 else tower.videomae.encoder.layer[0].intermediate)
        count = [0]
        inner.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
        tower(clip).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in tower.named_parameters()})
        calls.append(count[0])
    assert calls == [1, 2]  # the checkpointed block runs again in the backward pass
    for n, grad in grads[0].items():
        torch.testing.assert_close(grads[1][n], grad, rtol=1e-5, atol=1e-7, msg=n)


def test_video_vit_settings_are_checked_with_the_key_named():
    with pytest.raises(ConfigError, match="unknown option 'hidden_sizes'"):
        _tower("video_vit", {"hidden_sizes": 3})
    with pytest.raises(ConfigError, match="attention: must be one of"):
        _tower("video_vit", {"attention": "sparse"})
    with pytest.raises(ConfigError, match="presets: tiny, s-16, b-16"):
        _tower("video_vit", preset="l-14")
    with pytest.raises(ConfigError, match="multiple of the patch size 8"):
        _tower("video_vit", image_size=36)
    with pytest.raises(ConfigError, match="model.num_frames=4"):
        _tower("video_vit")(torch.randn(1, 5, 3, 32, 32))
    tower = _tower("video_vit", {"num_hidden_layers": 1, "attention": "divided"}, pooling="mean")
    assert len(tower.blocks) == 1 and tower.settings.hidden_size == 128


def test_videomae_needs_frames_its_tubelets_can_cut():
    with pytest.raises(ConfigError, match="tubelet_size 2"):
        _tower("videomae", pooling="mean", num_frames=3)
    with pytest.raises(ConfigError, match="cannot pool by 'cls'"):
        _tower("videomae", pooling="cls")
    with pytest.raises(ConfigError, match="set model.num_frames"):
        _tower("videomae", {"num_frames": 8}, "mean")
    tower = _tower("videomae", pooling="mean")
    for frames in (3, 6):  # not a whole number of tubelets; more than its positions cover
        with pytest.raises(ConfigError, match="divisible by its tubelet_size 2"):
            tower(torch.randn(1, frames, 3, 32, 32))
    image_model = _tower("videomae", pooling="mean", num_frames=1)  # built for one tubelet
    assert image_model.num_frames == 2 and image_model(torch.randn(1, 3, 32, 32)).shape == (1, 128)


def test_videomae_loads_a_local_folder_and_matches_transformers(tmp_path):
    from transformers import VideoMAEConfig, VideoMAEModel

    torch.manual_seed(0)
    reference = VideoMAEModel(VideoMAEConfig(
        image_size=32, patch_size=8, num_frames=4, tubelet_size=2, hidden_size=64,
        num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)).eval()
    reference.save_pretrained(tmp_path)
    tower = _tower("videomae", pooling="mean", pretrained_path=str(tmp_path)).eval()
    clip = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        expected = tower.fc_norm(reference(pixel_values=clip).last_hidden_state.mean(dim=1))
        torch.testing.assert_close(tower(clip), expected, atol=1e-5, rtol=1e-5)
    assert tower.width == 64
    with pytest.raises(ConfigError, match="expects 32px images"):
        _tower("videomae", pooling="mean", pretrained_path=str(tmp_path), image_size=64)
    with pytest.raises(ConfigError, match="covers 4 frames"):
        _tower("videomae", pooling="mean", pretrained_path=str(tmp_path), num_frames=8)


def test_a_dual_encoder_with_a_video_tower_embeds_clips_and_images():
    cfg = DualEncoderConfig(image=EncoderConfig(name="video_vit"), num_frames=4, image_size=32,
                            max_text_length=8, embed_dim=16)
    model = DualEncoder(cfg, vocab_size=50)
    assert model.image_encoder.num_frames == 4
    batch = {"pixels": torch.randn(3, 4, 3, 32, 32), "input_ids": torch.randint(5, 50, (3, 8)),
             "attention_mask": torch.ones(3, 8, dtype=torch.long)}
    out = model(batch)
    assert out["image_embeds"].shape == out["text_embeds"].shape == (3, 16)
    torch.testing.assert_close(out["image_embeds"].norm(dim=-1), torch.ones(3))
    assert model.encode_image(torch.randn(3, 3, 32, 32)).shape == (3, 16)
    with pytest.raises(ConfigError, match="model.num_frames must be >= 1"):
        DualEncoderConfig(num_frames=0)
