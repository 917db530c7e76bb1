"""Video towers: visual encoders that see the order of frames.

Like every visual tower (see ``encoders``), these map images ``(B, 3, H, W)`` or videos
``(B, T, 3, H, W)`` to features ``(B, width)``, an image being a one-frame video. The time-blind
baseline is the ``vit`` tower, which averages per-frame features (CLIP4Clip's "meanP"); the towers here
give tokens a temporal position, so reversing a video changes its features:

- ``video_vit``: our own ViT over space and time (``VideoViT``), with learned temporal position
  embeddings and ``attention: joint`` (one attention over all frames' patches, as ViViT's
  spatio-temporal model) or ``divided`` (TimeSformer: attention over time, then over space, per block);
- ``videomae``: ``transformers``' VideoMAE (tubelet patches, fixed sin-cos positions), from a preset or a
  local pretrained folder.

A new video tower is a new class here registered in ``IMAGE_ENCODERS``; the registry-wide tests in
tests/test_models.py then cover it with images and videos. A new attention form for ``video_vit`` is a
block class here (built like ``Block``, called as ``block(tokens, frames)``) added to ``VIDEO_BLOCKS``
and to ``VideoViTSettings.attention``. The blocks are made of ``transformer``'s attention and MLP and
initialised by its ``init_weights``, as every tower and head we write: there is one attention
implementation in the library. The token output, ``VisionTokens``, is defined in ``vision_tokens``;
building and loading ``transformers`` models goes through ``hf``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlp.config import ConfigError, from_dict
from vlp.models.config import EncoderConfig
from vlp.models.encoders import IMAGE_ENCODERS, VIT_PRESETS, as_video, check_pooling
from vlp.models.hf import check_folder, hf_config
from vlp.models.masking import keep_to_mask
from vlp.models.transformer import MLP, Attention, Block, init_weights
from vlp.models.vision_tokens import VisionTokens


@dataclass(frozen=True)
class VideoViTSettings:
    """The shape of a ``VideoViT``: a preset, then ``EncoderConfig.options`` over it."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    patch_size: int
    attention: Literal["joint", "divided"] = "joint"
    dropout: float = 0.0
    layer_norm_eps: float = 1e-6
    # Scale of the temporal position embeddings at initialisation. At ViT's usual 0.02, a clip and its
    # time reversal start with features about 1% apart, and contrastive training from scratch finds
    # the order signal slowly; a larger start makes frame order visible from the first step.
    temporal_init_std: float = 0.02

    def __post_init__(self):
        sizes = (self.hidden_size, self.num_hidden_layers, self.num_attention_heads,
                 self.intermediate_size, self.patch_size)
        if min(sizes) < 1:
            raise ConfigError("video_vit: sizes, layers, heads and patch_size must be >= 1")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"video_vit: hidden_size {self.hidden_size} is not a multiple of "
                              f"num_attention_heads {self.num_attention_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("video_vit: dropout must be in [0, 1)")
        if self.temporal_init_std <= 0:
            raise ConfigError("video_vit: temporal_init_std must be > 0")


# The sizes of VIT_PRESETS (so a video tower matches the vit of the same name, plus its time modules).
VIDEO_VIT_PRESETS: dict[str, dict[str, int]] = {
    name: dict(VIT_PRESETS[name]) for name in ("tiny", "s-16", "b-16")}
VIDEOMAE_PRESETS: dict[str, dict[str, int]] = {
    name: dict(size, tubelet_size=2) for name, size in VIDEO_VIT_PRESETS.items()}


def video_vit_settings(cfg: EncoderConfig) -> VideoViTSettings:
    """The preset named by ``cfg.preset`` with ``cfg.options`` applied, names and types checked."""
    if cfg.preset not in VIDEO_VIT_PRESETS:
        raise ConfigError(f"unknown preset {cfg.preset!r} for encoder {cfg.name!r}; "
                          f"presets: {', '.join(VIDEO_VIT_PRESETS)}")
    known = [f.name for f in dataclasses.fields(VideoViTSettings)]
    unknown = sorted(set(cfg.options) - set(known))
    if unknown:
        raise ConfigError(f"encoder {cfg.name!r}: unknown option {unknown[0]!r} "
                          f"(options are: {', '.join(known)})")
    return from_dict(VideoViTSettings, {**VIDEO_VIT_PRESETS[cfg.preset], **cfg.options},
                     where=f"{cfg.name}.options")


class JointBlock(Block):
    """A ``Block`` whose attention spans every token of every frame (ViViT's joint space-time model;
    cost grows as (T*N)^2).

    It only adapts the call: both video blocks take ``(tokens, frames)``, so ``VideoViT`` runs either
    the same way (and tests may call a block directly with the frame count).
    """

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x)


class DividedBlock(nn.Module):
    """TimeSformer's divided space-time block: attention over time, then over space, then the MLP.

    Tokens are ``[CLS, frame 0 patches, frame 1 patches, ...]``. In the temporal step each patch
    position attends to itself across the T frames (the CLS token sits out); in the spatial step each
    frame's patches attend among themselves and to a copy of the CLS token, whose T updates are averaged.
    Cost grows as T*N^2 + N*T^2 instead of (T*N)^2.

    Made of ``Block``'s parts (``transformer.Attention`` and ``transformer.MLP``, pre-norm, residual),
    wired differently: the spatial step regroups tokens by frame and averages the CLS updates, which
    a ``Block`` cannot do between its attention and its MLP. Its parameter names are the ones it had
    before it shared ``Attention`` (saved checkpoints rely on them): the joint block's ``norm1``,
    ``attn``, ``norm2`` and ``mlp`` are this block's ``space_norm``, ``space_attn``, ``mlp_norm`` and
    ``mlp``.
    """

    def __init__(self, width: int, heads: int, mlp_width: int, dropout: float = 0.0, *,
                 eps: float = 1e-6):
        super().__init__()
        # Time, then space, then MLP: ``init_weights`` draws in this (registration) order, so a seed
        # gives the weights it gave before these blocks shared ``Attention`` with ``Block``.
        self.time_norm = nn.LayerNorm(width, eps=eps)
        self.time_attn = Attention(width, heads, dropout)
        self.space_norm = nn.LayerNorm(width, eps=eps)
        self.space_attn = Attention(width, heads, dropout)
        self.mlp_norm = nn.LayerNorm(width, eps=eps)
        self.mlp = MLP(width, mlp_width, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        b, length, width = x.shape
        n = (length - 1) // frames
        cls, patches = x[:, :1], x[:, 1:].view(b, frames, n, width)

        t = patches.transpose(1, 2).reshape(b * n, frames, width)
        t = t + self.drop(self.time_attn(self.time_norm(t)))
        patches = t.view(b, n, frames, width).transpose(1, 2)  # (B, T, N, D)

        s = torch.cat([cls.unsqueeze(1).expand(b, frames, 1, width), patches], dim=2)
        s = self.drop(self.space_attn(self.space_norm(s.reshape(b * frames, 1 + n, width))))
        s = s.view(b, frames, 1 + n, width)
        cls = cls + s[:, :, 0].mean(dim=1, keepdim=True)
        patches = (patches + s[:, :, 1:]).reshape(b, frames * n, width)

        x = torch.cat([cls, patches], dim=1)
        return x + self.mlp(self.mlp_norm(x))


VIDEO_BLOCKS: dict[str, type[nn.Module]] = {"joint": JointBlock, "divided": DividedBlock}


def _split_fused_qkv(module: nn.Module, state_dict: dict, prefix: str, *_: Any) -> None:
    """Load-state-dict pre-hook: a state dict written while the video blocks had their own attention
    (one fused ``qkv`` projection) loads into ``Attention``'s ``q`` and ``kv``, which hold the same
    rows in the same order (q, then k, then v), so saved ``video_vit`` weights keep loading."""
    for key in [k for k in state_dict if k.startswith(prefix) and ".qkv." in k]:
        head, leaf = key.rsplit(".qkv.", 1)
        fused = state_dict.pop(key)
        width = fused.shape[0] // 3
        state_dict[f"{head}.q.{leaf}"] = fused[:width]
        state_dict[f"{head}.kv.{leaf}"] = fused[width:]


@IMAGE_ENCODERS.register("video_vit")
class VideoViT(nn.Module):
    """A ViT over space and time: per-frame patch embeddings plus learned spatial and temporal positions.

    The temporal table has ``num_frames`` rows; a clip of T <= num_frames frames uses rows 0..T-1, and an
    image is a one-frame clip (row 0). ``pooling: cls`` takes the CLS token, ``mean`` averages the patch
    tokens, both after a final LayerNorm. Gradient checkpointing (one checkpoint per block) is switched
    on by ``gradient_checkpointing_enable()``, which ``build_encoder`` calls.

    ``encode_tokens(pixels, keep)`` is the masked form: with ``keep`` (a tube mask's kept patches) only
    the visible patches are embedded and encoded (MAC, VideoMAE: the cost falls with the mask ratio);
    with ``mask_token=True`` the masked patches are replaced by a learned mask token and every position
    is encoded (the SimMIM/BEiT form, the baseline the benchmark compares against).
    """

    poolings = ("cls", "mean")
    supports_masking = True

    def __init__(self, cfg: EncoderConfig, *, image_size: int, num_frames: int = 1,
                 mask_token: bool = False, **_: Any):
        super().__init__()
        check_pooling(type(self), cfg)
        if cfg.pretrained_path:
            raise ConfigError(f"encoder {cfg.name!r} has no pretrained weights to load; "
                              "leave pretrained_path unset")
        s = video_vit_settings(cfg)
        if image_size % s.patch_size:
            raise ConfigError(f"model.image_size {image_size} is not a multiple of the patch "
                              f"size {s.patch_size}")
        self.settings = s
        self.image_size = image_size
        self.num_frames = num_frames
        self.pooling = cfg.pooling
        self.width = s.hidden_size
        self.gradient_checkpointing = False

        patches = (image_size // s.patch_size) ** 2
        self.patch_embed = nn.Conv2d(3, s.hidden_size, s.patch_size, stride=s.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, s.hidden_size))
        self.space_pos = nn.Parameter(torch.zeros(1, 1, patches, s.hidden_size))
        self.time_pos = nn.Parameter(torch.zeros(1, num_frames, 1, s.hidden_size))
        # built only when asked for: a parameter that gets no gradient stalls DDP
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, s.hidden_size)) if mask_token else None
        self.embed_drop = nn.Dropout(s.dropout)
        block = VIDEO_BLOCKS[s.attention]
        self.blocks = nn.ModuleList(
            block(s.hidden_size, s.num_attention_heads, s.intermediate_size, s.dropout,
                  eps=s.layer_norm_eps)
            for _ in range(s.num_hidden_layers))
        self.norm = nn.LayerNorm(s.hidden_size, eps=s.layer_norm_eps)
        self.apply(init_weights)
        for p in (self.cls_token, self.space_pos, self.mask_token):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)
        nn.init.trunc_normal_(self.time_pos, std=s.temporal_init_std)
        self.register_load_state_dict_pre_hook(_split_fused_qkv)

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each block's activations in the backward pass instead of storing them."""
        self.gradient_checkpointing = True

    @property
    def patches(self) -> int:
        return self.space_pos.shape[2]

    def encode_tokens(self, pixels: torch.Tensor, keep: torch.Tensor | None = None,
                      mask_tokens: bool = False) -> VisionTokens:
        """Tokens of images or clips; ``keep`` ``(B, K)`` masks all other patches (see the class doc).

        ``mask_tokens=False``: only the kept patches are encoded; True: the others become the mask
        token (the tower must be built with ``mask_token=True``).
        """
        video = as_video(pixels)
        b, frames = video.shape[:2]
        if frames > self.num_frames:
            raise ConfigError(f"pixels have {frames} frames but encoder 'video_vit' was built for "
                              f"model.num_frames={self.num_frames}")
        masked = None if keep is None else keep_to_mask(keep, self.patches)
        if keep is not None and not mask_tokens:
            # visible patches only: embed just those (the embedding is per patch, its stride its size)
            x = self._embed_patches(video, keep) + self._gather(self.space_pos, keep) + \
                self.time_pos[:, :frames]  # (B, T, K, D)
        else:
            x = self.patch_embed(video.flatten(0, 1)).flatten(2).transpose(1, 2)  # (B*T, N, D)
            x = x.view(b, frames, -1, self.width)
            if keep is not None:
                if self.mask_token is None:
                    raise ConfigError("video_vit was built without a mask token (masking.vision.encode: "
                                      "mask_token builds one)")
                x = torch.where(masked[:, None, :, None], self.mask_token.to(x.dtype), x)
            x = x + self.space_pos + self.time_pos[:, :frames]
        x = torch.cat([self.cls_token.expand(b, 1, self.width), x.flatten(1, 2)], dim=1)
        x = self.embed_drop(x)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, frames, use_reentrant=False)
            else:
                x = block(x, frames)
        x = self.norm(x)
        return VisionTokens(x, frames, self.patches, self.settings.patch_size, self.pool(x),
                            keep=None if mask_tokens else keep, masked=masked)

    def _embed_patches(self, video: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The patch embedding of the kept patches only: ``(B, T, 3, H, W)`` -> ``(B, T, K, D)``, equal
        to the convolution's output at those positions (at a 90% mask it saves 90% of its FLOPs)."""
        b, frames, channels, height, width = video.shape
        p = self.settings.patch_size
        patches = video.reshape(b, frames, channels, height // p, p, width // p, p)
        patches = patches.permute(0, 1, 3, 5, 2, 4, 6).reshape(b, frames, self.patches, -1)
        index = keep[:, None, :, None].expand(b, frames, keep.shape[1], patches.shape[-1])
        kept = patches.gather(2, index)  # (B, T, K, 3 * p * p), in the conv weight's (c, y, x) order
        return F.linear(kept, self.patch_embed.weight.flatten(1), self.patch_embed.bias)

    @staticmethod
    def _gather(table: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Rows ``keep`` of a ``(1, 1, N, D)`` position table -> ``(B, 1, K, D)``."""
        index = keep[:, None, :, None].expand(keep.shape[0], 1, keep.shape[1], table.shape[-1])
        return table.expand(keep.shape[0], -1, -1, -1).gather(2, index)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, 1 + L, D)`` tokens -> ``(B, D)`` features by the configured pooling."""
        return tokens[:, 0] if self.pooling == "cls" else tokens[:, 1:].mean(dim=1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encode_tokens(pixels).pooled


@IMAGE_ENCODERS.register("videomae")
class VideoMAEEncoder(nn.Module):
    """``transformers``' VideoMAE, mean-pooled (it has no CLS token) and layer-normed as its classifier.

    Frames are cut into tubelets of ``tubelet_size`` frames, so a clip needs T divisible by it (and
    T <= the model's ``num_frames``: its fixed sin-cos positions cover that many); a shorter clip uses
    the leading positions. An image (4-D, or a one-frame clip) is repeated to ``tubelet_size`` frames.
    Built from a preset for ``model.num_frames`` frames (``tubelet_size`` of them for an image model),
    or loaded from a local folder, whose config then fixes ``num_frames`` and ``image_size``.
    """

    poolings = ("mean",)

    def __init__(self, cfg: EncoderConfig, *, image_size: int, num_frames: int = 1, **_: Any):
        super().__init__()
        from transformers import VideoMAEConfig, VideoMAEModel

        check_pooling(type(self), cfg)
        if cfg.pretrained_path:
            check_folder(cfg.pretrained_path)
            self.videomae = VideoMAEModel.from_pretrained(cfg.pretrained_path)
            hf = self.videomae.config
            if hf.image_size != image_size:
                raise ConfigError(f"{cfg.pretrained_path} expects {hf.image_size}px images; "
                                  f"set model.image_size to it")
            if num_frames > hf.num_frames:
                raise ConfigError(f"{cfg.pretrained_path} covers {hf.num_frames} frames; "
                                  f"model.num_frames {num_frames} exceeds it")
        else:
            fixed = sorted({"num_frames", "image_size"} & set(cfg.options))
            if fixed:
                raise ConfigError(f"encoder {cfg.name!r}: option {fixed[0]!r} comes from the model "
                                  f"config; set model.{fixed[0]} instead")
            hf = hf_config(VideoMAEConfig, VIDEOMAE_PRESETS, cfg, image_size=image_size)
            if image_size % hf.patch_size:
                raise ConfigError(f"model.image_size {image_size} is not a multiple of the patch "
                                  f"size {hf.patch_size}")
            hf.num_frames = hf.tubelet_size if num_frames == 1 else num_frames
            self.videomae = VideoMAEModel(hf)
        self.tubelet_size = hf.tubelet_size
        self.num_frames = hf.num_frames
        if num_frames > 1 and num_frames % self.tubelet_size:
            raise ConfigError(f"model.num_frames {num_frames} is not a multiple of videomae's "
                              f"tubelet_size {self.tubelet_size}")
        self.width = hf.hidden_size
        # with use_mean_pooling (the default) the model ends without a norm; its classifier adds this one
        self.fc_norm = (nn.LayerNorm(hf.hidden_size, eps=hf.layer_norm_eps)
                        if self.videomae.layernorm is None else None)

    def encode_tokens(self, pixels: torch.Tensor, keep=None, mask_tokens: bool = False) -> VisionTokens:
        """``VisionTokens``: the pooled feature as the leading token, then the tubelet tokens (one
        "frame" per tubelet)."""
        if keep is not None:
            raise ConfigError("encoder 'videomae' cannot encode masked patches here: use 'video_vit'")
        hidden = self._hidden(pixels)
        pooled = self._pool_hidden(hidden)
        patch = self.videomae.config.patch_size
        patches = (self.videomae.config.image_size // patch) ** 2
        return VisionTokens(torch.cat([pooled[:, None], hidden], dim=1), hidden.shape[1] // patches,
                            patches, patch, pooled)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._pool_hidden(self._hidden(pixels))

    def _pool_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.videomae.layernorm is not None:
            return self.videomae.layernorm(hidden).mean(dim=1)
        return self.fc_norm(hidden.mean(dim=1))

    def _hidden(self, pixels: torch.Tensor) -> torch.Tensor:
        video = as_video(pixels)
        frames = video.shape[1]
        if frames == 1:
            video = video.expand(-1, self.tubelet_size, -1, -1, -1)
        elif frames % self.tubelet_size or frames > self.num_frames:
            raise ConfigError(f"videomae needs a frame count divisible by its tubelet_size "
                              f"{self.tubelet_size} and at most {self.num_frames}; got {frames}")
        embeddings = self.videomae.embeddings
        tokens = embeddings.patch_embeddings(video)  # (B, T/tubelet * N, D), time-major
        # the model adds all num_frames positions; a shorter clip takes the leading ones
        positions = embeddings.position_embeddings[:, :tokens.shape[1]]
        tokens = tokens + positions.to(device=tokens.device, dtype=tokens.dtype)
        return self.videomae.encoder(tokens).last_hidden_state
