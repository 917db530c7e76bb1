"""Encoder towers: a registry of visual and text encoders with one interface each.

Visual encoders (``IMAGE_ENCODERS``) map images ``(B, 3, H, W)`` or videos ``(B, T, 3, H, W)``
(normalised floats) to features ``(B, width)``; an image is a one-frame video. Each declares the
poolings it supports in ``poolings``. Text encoders map ``input_ids`` and ``attention_mask`` ``(B, L)``
to features ``(B, width)``. Each class registers itself in ``IMAGE_ENCODERS`` or ``TEXT_ENCODERS`` and
is built from an ``EncoderConfig`` plus context from the model config (``image_size``, ``num_frames``;
``vocab_size``, ``pad_token_id``, ``max_text_length``); a new tower is a new class plus a registration
(the registry-wide tests then cover it).

This module holds the registries, the presets, the shared input and pooling helpers (``as_video``,
``check_pooling``, ``pool_tokens``) and the towers that wrap ``transformers`` models without a notion of
time (``vit``, ``bert``). Towers that model time go in ``video.py``, our own text tower is in
``text.py``; both import from here, never the reverse. What the towers share below this module lives in
``vision_tokens`` (the visual towers' token output), ``hf`` (building and loading ``transformers``
models) and ``transformer`` (the blocks of the towers we write ourselves).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlp.config import ConfigError
from vlp.models.config import EncoderConfig
from vlp.models.hf import check_folder, hf_config
from vlp.models.vision_tokens import VisionTokens
from vlp.registry import Registry

IMAGE_ENCODERS: Registry[type[nn.Module]] = Registry("image encoder")
TEXT_ENCODERS: Registry[type[nn.Module]] = Registry("text encoder")

# Sizes of the standard ViTs (tiny is ours: small enough to learn on 2 CPU cores in minutes).
VIT_PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=4, intermediate_size=256,
                 patch_size=8),
    "s-16": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                 patch_size=16),
    "b-16": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, patch_size=16),
    "l-14": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                 intermediate_size=4096, patch_size=14),
}
BERT_PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256),
    "small": dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, intermediate_size=2048),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072),
}


def as_video(pixels: torch.Tensor) -> torch.Tensor:
    """Images ``(B, 3, H, W)`` as one-frame videos ``(B, 1, 3, H, W)``; videos pass unchanged."""
    if pixels.dim() == 4:
        return pixels.unsqueeze(1)
    if pixels.dim() == 5:
        return pixels
    raise ValueError(f"pixels must be (B, 3, H, W) or (B, T, 3, H, W), got {tuple(pixels.shape)}")


def check_pooling(cls: type[nn.Module], cfg: EncoderConfig) -> None:
    if cfg.pooling not in cls.poolings:
        raise ConfigError(f"encoder {cfg.name!r} cannot pool by {cfg.pooling!r}; "
                          f"pooling: {' | '.join(cls.poolings)}")


def pool_tokens(hidden: torch.Tensor, mask: torch.Tensor | None, how: str) -> torch.Tensor:
    if how == "cls" or mask is None:
        return hidden[:, 0] if how == "cls" else hidden.mean(dim=1)
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


@IMAGE_ENCODERS.register("vit")
class ViTImageEncoder(nn.Module):
    """A ViT from ``transformers`` (built from a preset, or loaded from a local folder).

    A video is encoded frame by frame and the frame features are averaged: CLIP4Clip's "meanP"
    baseline. It is blind to frame order (a video and its reversal give the same features), so it
    serves as the time-blind reference for the towers in ``video.py``; any number of frames works.
    """

    poolings = ("cls", "mean")
    supports_masking = False  # HF's ViT has no visible-only path here: use video_vit to mask

    def __init__(self, cfg: EncoderConfig, *, image_size: int, **_: Any):
        super().__init__()
        check_pooling(type(self), cfg)
        from transformers import ViTConfig, ViTModel

        if cfg.pretrained_path:
            check_folder(cfg.pretrained_path)
            self.vit = ViTModel.from_pretrained(cfg.pretrained_path, add_pooling_layer=False)
            if self.vit.config.image_size != image_size:
                raise ConfigError(f"{cfg.pretrained_path} expects {self.vit.config.image_size}px "
                                  f"images; set model.image_size to it")
        else:
            hf = hf_config(ViTConfig, VIT_PRESETS, cfg, image_size=image_size)
            if image_size % hf.patch_size:
                raise ConfigError(f"model.image_size {image_size} is not a multiple of the patch "
                                  f"size {hf.patch_size}")
            self.vit = ViTModel(hf, add_pooling_layer=False)
        self.pooling = cfg.pooling
        self.width = self.vit.config.hidden_size

    def _frames(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-frame hidden states ``(B, T, 1 + N, D)`` and the meanP features ``(B, D)``."""
        video = as_video(pixels)
        hidden = self.vit(pixel_values=video.flatten(0, 1)).last_hidden_state
        frames = pool_tokens(hidden, None, self.pooling)
        return hidden.view(*video.shape[:2], *hidden.shape[1:]), frames.view(*video.shape[:2], -1).mean(dim=1)

    def encode_tokens(self, pixels: torch.Tensor, keep=None, mask_tokens: bool = False) -> VisionTokens:
        """``VisionTokens``: the meanP feature as the leading token, then every frame's patch tokens."""
        if keep is not None:
            raise ConfigError("encoder 'vit' cannot encode masked patches: use 'video_vit' for masking")
        hidden, pooled = self._frames(pixels)
        tokens = torch.cat([pooled[:, None], hidden[:, :, 1:].flatten(1, 2)], dim=1)
        patch = self.vit.config.patch_size
        return VisionTokens(tokens, hidden.shape[1], hidden.shape[2] - 1, patch, pooled)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._frames(pixels)[1]


@TEXT_ENCODERS.register("bert")
class BertTextEncoder(nn.Module):
    """A BERT-style encoder (built from a preset for our tokenizer, or any local HF text folder)."""

    def __init__(self, cfg: EncoderConfig, *, vocab_size: int, pad_token_id: int,
                 max_text_length: int, **_: Any):
        super().__init__()
        from transformers import AutoModel, BertConfig, BertModel

        if cfg.pretrained_path:
            check_folder(cfg.pretrained_path)
            self.bert = AutoModel.from_pretrained(cfg.pretrained_path, add_pooling_layer=False)
            if self.bert.config.vocab_size < vocab_size:
                raise ConfigError(
                    f"the tokenizer has {vocab_size} entries but {cfg.pretrained_path} embeds only "
                    f"{self.bert.config.vocab_size}: use the tokenizer saved with that model")
        else:
            hf = hf_config(BertConfig, BERT_PRESETS, cfg, vocab_size=vocab_size,
                           pad_token_id=pad_token_id,
                           max_position_embeddings=max(64, max_text_length))
            self.bert = BertModel(hf, add_pooling_layer=False)
        self.pooling = cfg.pooling
        self.width = self.bert.config.hidden_size

    def encode_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(B, L, width)`` token states (what the fusion encoder and the MLM head read)."""
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return pool_tokens(hidden, attention_mask, self.pooling)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.pool(self.encode_tokens(input_ids, attention_mask), attention_mask)


def _checkpointing_switch(encoder: nn.Module):
    """The tower's own switch if it has one, else that of the first ``transformers`` model inside."""
    for module in encoder.modules():  # the tower itself comes first
        # transformers 5 renamed it (the old name still works, with a deprecation warning)
        enable = (getattr(module, "activation_checkpointing_enable", None)
                  or getattr(module, "gradient_checkpointing_enable", None))
        if enable is not None:
            return enable
    return None


def build_encoder(registry: Registry, cfg: EncoderConfig, **context: Any) -> nn.Module:
    """Build a registered tower; apply gradient checkpointing and locking as the config asks.

    A tower supports ``gradient_checkpointing`` by exposing ``gradient_checkpointing_enable()`` (or
    ``activation_checkpointing_enable()``) itself or on a submodule; asking it of a tower that has
    neither is a ``ConfigError`` rather than a silent no-op.
    """
    encoder = registry.get(cfg.name)(cfg, **context)
    if cfg.gradient_checkpointing:
        enable = _checkpointing_switch(encoder)
        if enable is None:
            raise ConfigError(f"encoder {cfg.name!r} does not support gradient_checkpointing")
        enable()
    if cfg.locked:
        encoder.requires_grad_(False)
    return encoder
