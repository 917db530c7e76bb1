"""Masked autoencoding of video: rebuild the pixels of masked tubes (VideoMAE; SimVTP's joint form).

The shared pass encodes a tube-masked clip (``masking.vision``); this objective owns a light decoder
that reads those tokens, puts a learned mask token at every masked patch of every frame, adds its own
position embeddings and predicts each patch's pixels. The loss is the mean squared error over masked
patches only (every frame), against the patch's pixels, per-patch normalised by default
(``norm_pix_loss``, as VideoMAE and MAE do). Images are one-frame clips.

``source`` picks what the decoder reads:

- ``vision``: the visual tower's tokens (VideoMAE);
- ``fused``: the visual half of the joint fusion encoder's output over those tokens and the masked
  caption (``outputs["fused_masked"].vision``, SimVTP's unified autoencoder), so visible words help
  rebuild masked tubes; needs ``model.fusion.mode: joint``.

Decoder layout: the encoder's CLS token is kept (at its own learned position), as MAE's decoder does: it
costs one token and hands the decoder a summary of the whole visible clip. Positions are factorised like
the encoder's: a learned spatial table (one row per patch of the grid) plus a learned temporal table
(``model.num_frames`` rows; a clip of T frames uses the first T). When the tower encoded masked patches
as mask tokens (``masking.vision.encode: mask_token``) every position is already there and is decoded
as is; the decoder's own mask token is then not built (it would get no gradient, which stalls DDP).

Other reconstruction targets (HOG, features of a teacher: VIOLET's study) would be new ``target``
options here; another decoder is a new objective file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from vlp.batch import PIXELS
from vlp.config import ConfigError
from vlp.models.encoders import IMAGE_ENCODERS, as_video
from vlp.models.transformer import Stack, init_weights
from vlp.objectives.base import Objective, ObjectiveOutput, register_objective

NORM_PIX_EPS = 1e-6  # VideoMAE's and MAE's epsilon in the per-patch normalisation
MIN_DECODER_WIDTH = 32


def patchify(pixels: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Images ``(B, 3, H, W)`` or clips ``(B, T, 3, H, W)`` -> patches ``(B, T, N, p * p * 3)``.

    Patches are numbered row by row over the grid (as the patch embedding's tokens are); inside a patch
    the values run over (row, column, channel), channel fastest.
    """
    video = as_video(pixels)
    b, t, c, h, w = video.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"pixels {h}x{w} are not a whole number of {p}px patches")
    x = video.reshape(b, t, c, h // p, p, w // p, p)
    x = x.permute(0, 1, 3, 5, 4, 6, 2)  # (B, T, rows, cols, p_row, p_col, C)
    return x.reshape(b, t, (h // p) * (w // p), p * p * c)


def normalise_patches(patches: torch.Tensor, eps: float = NORM_PIX_EPS) -> torch.Tensor:
    """Each patch minus its mean, over ``sqrt(var + eps)`` (MAE's ``norm_pix_loss``: mean and unbiased
    variance over the patch's p * p * 3 values)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True, unbiased=True)
    return (patches - mean) / (var + eps).sqrt()


def masked_patch_loss(predictions: torch.Tensor, targets: torch.Tensor,
                      masked: torch.Tensor) -> torch.Tensor:
    """Mean over masked patches of each patch's mean squared error.

    Args:
        predictions, targets: ``(B, T, N, P)``.
        masked: ``(B, N)``, True where a patch is masked (the same in every frame: a tube).
    """
    error = (predictions.float() - targets.float()).pow(2).mean(dim=-1)  # (B, T, N)
    weight = masked[:, None, :].expand_as(error).to(error.dtype)
    return (error * weight).sum() / weight.sum().clamp(min=1.0)


def default_decoder_width(source_width: int, heads: int) -> int:
    """Half the width the decoder reads (VideoMAE: a 384-wide decoder on ViT-B's 768), at least
    ``MIN_DECODER_WIDTH``, rounded up to a multiple of ``heads``."""
    width = max(MIN_DECODER_WIDTH, source_width // 2)
    return heads * math.ceil(width / heads)


@register_objective("mae")
class MaskedAutoencoder(Objective):
    """Pixel reconstruction of masked tubes with a light transformer decoder (see the module doc)."""

    @dataclass(frozen=True)
    class Config:
        """Attributes:
            weight: of this loss in the sum.
            decoder_width: 0 = ``default_decoder_width``: half the width of the tokens it reads
                (the visual tower's, or the fusion encoder's for ``fused``), at least 32, a multiple of
                ``decoder_heads``.
            decoder_layers, decoder_heads: of the decoder's transformer (MLP 4x its width). VideoMAE
                uses 4 layers; one is enough for the light default and keeps the head cheap.
            norm_pix_loss: targets are per-patch normalised pixels (VideoMAE); else the pixels as the
                batch holds them (already normalised per channel by the data pipeline).
            source: ``vision`` (the tower's tokens) or ``fused`` (the joint fusion encoder's visual
                tokens, SimVTP).
        """

        weight: float = 1.0
        decoder_width: int = 0
        decoder_layers: int = 1
        decoder_heads: int = 4
        norm_pix_loss: bool = True
        source: Literal["vision", "fused"] = "vision"

        def __post_init__(self):
            if self.decoder_width < 0 or self.decoder_layers < 1 or self.decoder_heads < 1:
                raise ConfigError("objectives.mae: decoder_width >= 0 (0: default), decoder_layers >= 1, "
                                  "decoder_heads >= 1")
            if self.decoder_width and self.decoder_width % self.decoder_heads:
                raise ConfigError(f"objectives.mae.decoder_width {self.decoder_width} is not a multiple "
                                  f"of decoder_heads {self.decoder_heads}")

    needs_vision_mask = True

    @classmethod
    def requirements(cls, cfg: Config) -> tuple[frozenset[str], bool]:
        if cfg.source == "fused":
            return frozenset({"vision", "fused_masked"}), True
        return frozenset({"vision"}), False

    @classmethod
    def check(cls, cfg: Config, model, masking) -> None:
        if not getattr(IMAGE_ENCODERS.get(model.image.name), "supports_masking", False):
            raise ConfigError(f"objective 'mae' needs a visual tower that encodes tube-masked clips; "
                              f"{model.image.name!r} does not (use video_vit)")
        if cfg.source == "fused" and (model.fusion.mode != "joint" or model.fusion.layers < 1):
            raise ConfigError("objectives.mae.source: fused reads the visual tokens of the joint "
                              "fusion encoder: set model.fusion.mode: joint and model.fusion.layers")

    def __init__(self, cfg: Config, *, model: nn.Module, **context):
        """Built for ``model`` (a config ``check`` accepted: a masking tower, the joint fusion encoder
        for ``fused``)."""
        super().__init__(cfg)
        tower = model.image_encoder
        source_width = model.fusion_width if cfg.source == "fused" else tower.width
        self.patches = tower.patches
        grid = math.isqrt(self.patches)
        if grid * grid != self.patches or model.cfg.image_size % grid:
            raise ConfigError(f"objective 'mae' needs a square patch grid; the tower has {self.patches} "
                              f"patches for {model.cfg.image_size}px images")
        self.patch_size = model.cfg.image_size // grid
        width = cfg.decoder_width or default_decoder_width(source_width, cfg.decoder_heads)
        self.width = width

        self.embed = nn.Linear(source_width, width)
        # Masked patches are dropped by the tower unless it was built to encode them as its own mask
        # token (masking.vision.encode: mask_token); then this one would never be used.
        encodes_mask_tokens = getattr(tower, "mask_token", None) is not None
        self.mask_token = None if encodes_mask_tokens else nn.Parameter(torch.zeros(1, 1, 1, width))
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, width))
        self.space_pos = nn.Parameter(torch.zeros(1, 1, self.patches, width))
        self.time_pos = nn.Parameter(torch.zeros(1, model.cfg.num_frames, 1, width))
        self.decoder = Stack(width, cfg.decoder_layers, cfg.decoder_heads, 4 * width)
        self.head = nn.Linear(width, self.patch_size * self.patch_size * 3)
        self.apply(init_weights)
        for p in (self.mask_token, self.cls_pos, self.space_pos, self.time_pos):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)

    def decode(self, tokens: torch.Tensor, frames: int, keep: torch.Tensor | None) -> torch.Tensor:
        """Pixel predictions ``(B, T, N, p * p * 3)`` for every patch of every frame.

        Args:
            tokens: ``(B, 1 + T * K, D)``: CLS, then frame by frame the K kept patches (``keep``
                ``(B, K)``), or all N patches when ``keep`` is None.
        """
        b = tokens.shape[0]
        x = self.embed(tokens)
        cls, body = x[:, :1], x[:, 1:]
        if keep is not None:
            if self.mask_token is None:
                raise ConfigError("objective 'mae' was built for a tower that encodes mask tokens but got "
                                  "visible-only tokens")
            k = keep.shape[1]
            body = body.reshape(b, frames, k, self.width)
            index = keep[:, None, :, None].expand(b, frames, k, self.width)
            full = self.mask_token.to(body.dtype).expand(b, frames, self.patches, self.width)
            body = full.scatter(2, index, body)
        else:
            body = body.reshape(b, frames, self.patches, self.width)
        body = body + self.space_pos + self.time_pos[:, :frames]
        x = torch.cat([cls + self.cls_pos, body.flatten(1, 2)], dim=1)
        x = self.decoder(x)
        return self.head(x[:, 1:]).view(b, frames, self.patches, -1)

    def targets(self, pixels: torch.Tensor) -> torch.Tensor:
        """The batch's pixels as reconstruction targets ``(B, T, N, p * p * 3)``."""
        target = patchify(pixels.float(), self.patch_size)
        return normalise_patches(target) if self.cfg.norm_pix_loss else target

    def forward(self, outputs, batch, model=None) -> ObjectiveOutput:
        vision = outputs["vision"]
        if vision.masked is None:  # evaluation: masks are drawn only in training mode
            return ObjectiveOutput(loss=vision.tokens.new_zeros(()), metrics={"masked_fraction": 0.0})
        if vision.patch_size != self.patch_size or vision.patches != self.patches:
            raise ConfigError(f"objective 'mae' was built for {self.patches} patches of "
                              f"{self.patch_size}px, the tower gave {vision.patches} of "
                              f"{vision.patch_size}px")
        tokens = vision.tokens if self.cfg.source == "vision" else outputs["fused_masked"].vision
        predictions = self.decode(tokens, vision.frames, vision.keep)
        loss = masked_patch_loss(predictions, self.targets(batch[PIXELS]), vision.masked)
        # from the shapes where they say it (no device sync); every sample masks as many patches
        fraction = (1.0 - vision.keep.shape[1] / self.patches if vision.keep is not None
                    else float(vision.masked.float().mean()))
        return ObjectiveOutput(loss=loss, metrics={"masked_fraction": fraction})
