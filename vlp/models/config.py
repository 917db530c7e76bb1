"""Typed configs of the models: one per encoder tower, one for the dual encoder that joins them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from vlp.config import ConfigError
from vlp.models.hf_folder import read_dual_folder


@dataclass(frozen=True)
class EncoderConfig:
    """One tower. ``name`` picks a registered encoder class; ``preset`` a size of it.

    ``pretrained_path`` loads a local Hugging Face folder instead of building from the preset (no hub
    access at run time); ``options`` overrides fields of the underlying ``transformers`` config
    (for example ``{num_hidden_layers: 4}``), checked against that config's own fields.
    """

    name: str = "vit"
    preset: str = "tiny"
    pretrained_path: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    pooling: Literal["cls", "mean"] = "cls"
    gradient_checkpointing: bool = False
    # Locked tower (LiT): its weights stay as loaded and it runs in eval mode; its projection still trains.
    locked: bool = False


@dataclass(frozen=True)
class FusionConfig:
    """The fusion encoder, which reads text and visual tokens together (matching, conditioned MLM,
    SimVTP's joint reconstruction). Built when ``layers`` > 0 or ``share_text_encoder`` is set.

    Attributes:
        layers: its own transformer layers (0 with ``share_text_encoder``: it has none of its own).
        mode: ``cross`` (ALBEF: text tokens self-attend and cross-attend to visual tokens) or
            ``joint`` (SimVTP's unified encoder: one self-attention over visual and text tokens
            together; both come out, each informed by the other).
        share_text_encoder: SNP-S3's shared network: the text tower itself (encoder ``transformer``,
            built with cross-attention in every layer) is the fusion encoder; ``cross`` mode only.
        heads, mlp_ratio: of its own layers; its width is the text tower's.
    """

    layers: int = 0
    mode: Literal["cross", "joint"] = "cross"
    share_text_encoder: bool = False
    heads: int = 4
    mlp_ratio: float = 2.0
    dropout: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.layers > 0 or self.share_text_encoder

    def __post_init__(self):
        if self.layers < 0 or self.heads < 1 or self.mlp_ratio <= 0:
            raise ConfigError("model.fusion: layers >= 0, heads >= 1, mlp_ratio > 0")
        if self.share_text_encoder and (self.layers or self.mode != "cross"):
            raise ConfigError("model.fusion.share_text_encoder reuses the text tower's layers in cross "
                              "mode: leave fusion.layers at 0 and mode at cross")


@dataclass(frozen=True)
class DualEncoderConfig:
    image: EncoderConfig = field(default_factory=EncoderConfig)
    text: EncoderConfig = field(default_factory=lambda: EncoderConfig(name="bert"))
    image_size: int = 64
    # Frames per sample the visual tower is built for (1: an image model). Towers with temporal
    # position embeddings size them by this; pixels are then (B, T, 3, H, W) with T <= num_frames.
    num_frames: int = 1
    max_text_length: int = 32
    embed_dim: int = 128
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0
    # SigLIP's learnable bias (its paper starts at -10); None for the softmax losses, which ignore it.
    init_logit_bias: float | None = None
    fusion: FusionConfig = field(default_factory=FusionConfig)
    # A local Hugging Face folder of a whole dual encoder (CLIPModel, ChineseCLIPModel, SiglipModel,
    # VisionTextDualEncoderModel) to start from; empty: build from the fields here. The folder
    # decides the towers (``hf_vision`` / ``hf_text`` over it), image_size, embed_dim, projection,
    # the pixel normalisation, SigLIP's bias, and caps max_text_length at the model's positions
    # (SigLIP: exactly them); max_logit_scale is raised to the trained scale if below it. Tower
    # ``locked`` and ``gradient_checkpointing`` stay yours. The DualEncoder loads the weights.
    pretrained: str = ""
    # linear: projections from the towers' widths to embed_dim; none: the towers' features are the
    # embeddings (both as wide as embed_dim), as in SigLIP, whose towers end in their own heads.
    projection: Literal["linear", "none"] = "linear"
    # The normalisation the visual tower expects, for pixels scaled to [0, 1]; None: the project's
    # (vlp.data.transforms.PIXEL_MEAN / PIXEL_STD). A DualEncoder fed pixels normalised otherwise
    # converts them (its ``input_pixel_norm``).
    pixel_mean: tuple[float, ...] | None = None
    pixel_std: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.pretrained:
            self._take_from_pretrained()
        if self.image_size < 8 or self.max_text_length < 4 or self.embed_dim < 1:
            raise ConfigError("model: image_size >= 8, max_text_length >= 4 and embed_dim >= 1")
        if self.num_frames < 1:
            raise ConfigError(f"model.num_frames must be >= 1, got {self.num_frames}")
        if not 0 < self.init_temperature < 1:
            raise ConfigError("model.init_temperature must be in (0, 1)")
        if self.max_logit_scale <= 1.0 / self.init_temperature - 1e-6:
            # the clamp would cut the initial scale: almost certainly a typo
            raise ConfigError("model.max_logit_scale must exceed 1 / init_temperature")
        if self.fusion.share_text_encoder and self.text.name != "transformer":
            raise ConfigError("model.fusion.share_text_encoder needs model.text.name: transformer (our "
                              "text tower, which can attend to visual tokens)")
        norm = (self.pixel_mean, self.pixel_std)
        if norm != (None, None) and (None in norm or len(norm[0]) != 3 or len(norm[1]) != 3
                                     or min(norm[1]) <= 0):
            raise ConfigError("model.pixel_mean and model.pixel_std: both unset, or three numbers each "
                              "(std > 0)")

    def _take_from_pretrained(self) -> None:
        """Fill the fields ``pretrained`` decides from the folder (idempotent: a config that was filled
        in, as a checkpoint stores it, comes out the same)."""
        folder = read_dual_folder(self.pretrained)
        towers = {}
        for key, tower, own, default in (("image", self.image, "hf_vision", "vit"),
                                         ("text", self.text, "hf_text", "bert")):
            if (tower.name not in (own, default) or tower.options
                    or (tower.pretrained_path and tower.pretrained_path != folder.path)):
                raise ConfigError(f"model.pretrained brings its own {key} tower: leave "
                                  f"model.{key}.name, options and pretrained_path unset")
            towers[key] = replace(tower, name=own, pretrained_path=folder.path, options={})
        family = folder.family
        bias = self.init_logit_bias
        if family.logit_bias and bias is None:  # the trained value where known; overwritten anyway
            bias = folder.logit_bias if folder.logit_bias is not None else -10.0
        max_scale = self.max_logit_scale
        if folder.logit_scale is not None:
            max_scale = max(max_scale, math.exp(folder.logit_scale))  # the clamp must not cut it
        filled = dict(
            pretrained=folder.path, image=towers["image"], text=towers["text"],
            image_size=folder.image_size,
            max_text_length=(folder.max_text_length if folder.fixed_text_length
                             else min(self.max_text_length, folder.max_text_length)),
            embed_dim=folder.embed_dim, projection="linear" if family.projections else "none",
            init_logit_bias=bias, max_logit_scale=max_scale,
            pixel_mean=folder.pixel_mean, pixel_std=folder.pixel_std)
        for name, value in filled.items():
            object.__setattr__(self, name, value)
