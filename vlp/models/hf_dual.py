"""Whole Hugging Face dual encoders as towers, ``hf_vision`` and ``hf_text``; ``load_hf_weights``.

Each tower holds one ``transformers`` sub-model of a dual encoder that ``hf_folder`` registers in
``HF_DUAL_ENCODERS`` (CLIP's ``vision_model``, SigLIP's ``text_model``...), built from the folder's
config (``EncoderConfig.pretrained_path``: the whole model's folder, which ``model.pretrained`` sets)
and read the way the whole model reads it:

- visual feature: the vision model's ``pooler_output`` (CLIP's and Chinese-CLIP's class token after
  the last norm, SigLIP's attention-pooling head, ViT's pooler); a video's frames are averaged (meanP);
- text feature: pooled as ``DualFamily.text_pooling`` says (CLIP: the end token; Chinese-CLIP: the
  [CLS] state; SigLIP: the last position through its head, without the attention mask, as trained;
  a ``VisionTextDualEncoderModel``'s text model: its own pooler).

``EncoderConfig.pooling`` accepts only ``cls``, which stands for that pooling of the model's own.
Without a folder a tower of ``options.model_type`` (``clip`` by default, or ``chinese_clip``,
``siglip``) is built from our presets, randomly initialised.

The towers build the architecture only. ``load_hf_weights`` fills a ``DualEncoder`` over them from one
load of the whole model (towers, projections, temperature, SigLIP's bias), so the parts cannot come
from different files, and a checkpoint's ``model.pt`` can replace them all.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from vlp.config import ConfigError
from vlp.models.config import EncoderConfig
from vlp.models.encoders import (
    BERT_PRESETS,
    IMAGE_ENCODERS,
    TEXT_ENCODERS,
    VIT_PRESETS,
    as_video,
    check_pooling,
)
from vlp.models.hf import hf_config
from vlp.models.hf_folder import HF_DUAL_ENCODERS, DualFamily, read_family
from vlp.models.vision_tokens import VisionTokens


def _transformers(name: str):
    import transformers

    return getattr(transformers, name)


def _sub_config(cfg: EncoderConfig, which: str, presets: dict, **fixed: Any) -> tuple[DualFamily, Any]:
    """The family and the ``vision_config`` / ``text_config`` of a tower: the folder's, or one built
    from ``cfg.preset`` and ``fixed`` for ``options.model_type``."""
    if cfg.pretrained_path:
        from transformers import AutoConfig

        _, family = read_family(cfg.pretrained_path)
        full = AutoConfig.from_pretrained(cfg.pretrained_path, local_files_only=True)
        return family, getattr(full, f"{which}_config")
    model_type = cfg.options.get("model_type", "clip")
    family = HF_DUAL_ENCODERS.get(model_type)
    config_class = family.vision_config_class if which == "vision" else family.text_config_class
    if not config_class:
        raise ConfigError(f"encoder {cfg.name!r}: {model_type!r} towers load only from a folder "
                          "(pretrained_path); from scratch use vit and bert")
    options = {k: v for k, v in cfg.options.items() if k != "model_type"}
    sub = hf_config(_transformers(config_class), presets,
                    EncoderConfig(name=cfg.name, preset=cfg.preset, options=options), **fixed)
    return family, sub


def _build(class_name: str, sub_config, **kwargs: Any) -> nn.Module:
    """A sub-model from its config, in float32 whatever dtype the folder was saved in."""
    if class_name:
        return _transformers(class_name)._from_config(sub_config, dtype=torch.float32, **kwargs)
    from transformers import AutoModel  # what VisionTextDualEncoderModel builds for a sub-config

    return AutoModel.from_config(sub_config, dtype=torch.float32, **kwargs)


@IMAGE_ENCODERS.register("hf_vision")
class HFVisionTower(nn.Module):
    """The vision model of a Hugging Face dual encoder (module docstring)."""

    poolings = ("cls",)
    supports_masking = False

    def __init__(self, cfg: EncoderConfig, *, image_size: int, **_: Any):
        super().__init__()
        check_pooling(type(self), cfg)
        family, sub = _sub_config(cfg, "vision", VIT_PRESETS, image_size=image_size)
        if int(sub.image_size) != image_size:
            raise ConfigError(f"{cfg.pretrained_path} expects {sub.image_size}px images; set "
                              "model.image_size to it")
        if image_size % int(sub.patch_size):
            raise ConfigError(f"model.image_size {image_size} is not a multiple of the patch size "
                              f"{sub.patch_size}")
        self.model = _build(family.vision_class, sub)
        self.width = int(sub.hidden_size)
        self.patch_size = int(sub.patch_size)
        self.patches = (image_size // self.patch_size) ** 2

    def _frames(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-frame last hidden states ``(B, T, L, D)`` and the meanP features ``(B, D)``."""
        video = as_video(pixels)
        out = self.model(pixel_values=video.flatten(0, 1))
        if out.pooler_output is None:
            raise ConfigError("this vision model has no pooled output (e.g. SigLIP without its head)")
        hidden, pooled = out.last_hidden_state, out.pooler_output
        return (hidden.view(*video.shape[:2], *hidden.shape[1:]),
                pooled.view(*video.shape[:2], -1).mean(dim=1))

    def encode_tokens(self, pixels: torch.Tensor, keep=None, mask_tokens: bool = False) -> VisionTokens:
        """``VisionTokens``: the pooled feature as the leading token, then every frame's patch tokens
        (the model's last hidden states; a class token, where the model has one, is dropped)."""
        if keep is not None:
            raise ConfigError("encoder 'hf_vision' cannot encode masked patches: use 'video_vit' for "
                              "masking")
        hidden, pooled = self._frames(pixels)
        patch_tokens = hidden[:, :, hidden.shape[2] - self.patches:]
        tokens = torch.cat([pooled[:, None], patch_tokens.flatten(1, 2)], dim=1)
        return VisionTokens(tokens, hidden.shape[1], self.patches, self.patch_size, pooled)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._frames(pixels)[1]


@TEXT_ENCODERS.register("hf_text")
class HFTextTower(nn.Module):
    """The text model of a Hugging Face dual encoder (module docstring)."""

    poolings = ("cls",)

    def __init__(self, cfg: EncoderConfig, *, vocab_size: int, pad_token_id: int,
                 max_text_length: int, **_: Any):
        super().__init__()
        check_pooling(type(self), cfg)
        family, sub = _sub_config(cfg, "text", BERT_PRESETS, vocab_size=vocab_size,
                                  pad_token_id=pad_token_id,
                                  max_position_embeddings=max(64, max_text_length))
        where = cfg.pretrained_path or f"encoder {cfg.name!r}"
        if vocab_size > int(sub.vocab_size):
            raise ConfigError(f"the tokenizer has {vocab_size} entries but {where} embeds only "
                              f"{sub.vocab_size}: use the tokenizer saved with that model")
        if max_text_length > int(sub.max_position_embeddings):
            raise ConfigError(f"model.max_text_length {max_text_length} exceeds the "
                              f"{sub.max_position_embeddings} positions of {where}")
        kwargs = {"add_pooling_layer": False} if family.text_without_pooler else {}
        self.model = _build(family.text_class, sub, **kwargs)
        self.text_pooling = family.text_pooling
        self.reads_mask = family.text_attention_mask
        self.pretrained = bool(cfg.pretrained_path)
        if self.text_pooling == "pooler" and getattr(self.model, "pooler", None) is None:
            raise ConfigError(f"{where}: the text model has no pooler, which the dual encoder reads")
        self.width = int(getattr(sub, "projection_size", None) or sub.hidden_size) \
            if self.text_pooling == "last" else int(sub.hidden_size)

    def encode_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(B, L, hidden)`` token states (the model's last hidden states)."""
        mask = attention_mask if self.reads_mask else None
        return self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.text_pooling == "first":
            return hidden[:, 0]
        if self.text_pooling == "last":
            return self.model.head(hidden[:, -1])
        if self.text_pooling == "pooler":
            return self.model.pooler(hidden)
        # eos: CLIP's tokenizer ends every caption with its end token, the last one the mask keeps
        last = (attention_mask.sum(dim=1) - 1).clamp(min=0)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """A loaded model's feature as the model computes it (CLIP finds its end token by id, which
        ``pool``, given states alone, takes as the last kept token: the same for every caption its
        tokenizer makes). A tower built from a preset pools with ``pool``: its config's end-token id
        is not our tokenizer's."""
        if not self.pretrained:
            return self.pool(self.encode_tokens(input_ids, attention_mask), attention_mask)
        mask = attention_mask if self.reads_mask else None
        out = self.model(input_ids=input_ids, attention_mask=mask)
        return out.last_hidden_state[:, 0] if self.text_pooling == "first" else out.pooler_output


@torch.no_grad()
def load_hf_weights(model: nn.Module, path: str) -> None:
    """Fill ``model`` (a ``DualEncoder`` built with ``pretrained=path``) with the folder's weights: the
    towers, the projections (where the model has them), ``logit_scale`` and SigLIP's ``logit_bias``.

    Raises:
        ConfigError: the folder's weights lack some of the model's tensors, or ``max_logit_scale``
            would cut the trained temperature.
    """
    _, family = read_family(path)
    full, info = _transformers(family.model_class).from_pretrained(
        path, local_files_only=True, output_loading_info=True)
    missing = sorted(info.get("missing_keys", ()))
    if missing:
        raise ConfigError(f"{path}: its weights lack {len(missing)} of the model's tensors "
                          f"(e.g. {missing[0]})")
    model.image_encoder.model.load_state_dict(full.vision_model.state_dict())
    model.text_encoder.model.load_state_dict(full.text_model.state_dict())
    if family.projections:
        model.image_proj.load_state_dict(full.visual_projection.state_dict())
        model.text_proj.load_state_dict(full.text_projection.state_dict())
    model.logit_scale.copy_(full.logit_scale.reshape(()))
    if family.logit_bias:
        model.logit_bias.copy_(full.logit_bias.reshape(()))
    scale = math.exp(float(full.logit_scale.reshape(())))
    if scale > model.cfg.max_logit_scale * (1 + 1e-6):
        raise ConfigError(f"{path} was trained with a logit scale of {scale:.6g}; model.max_logit_scale "
                          f"{model.cfg.max_logit_scale} would cut it: set it at least that high")
