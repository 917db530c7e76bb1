"""The pretraining module: the model, its objectives and the masking, as one ``nn.Module``.

This is what DDP wraps and what a checkpoint holds. ``forward(batch)`` runs one shared pass: it draws
the masks (only in training mode), encodes what the configured objectives declared they need (the
union of their ``needs``: one visual pass, at most one pass per text form, at most one fusion pass of
the masked caption), then calls every objective on those outputs. The trainer sums the weighted losses;
it never knows which objectives ran. Masks are drawn with torch's RNG, so re-running a batch after
restoring the RNG state (the feature cache step does) draws the same masks.

Config (``masking:`` in the experiment config):

- ``vision.ratio``: share of patches masked (tubes for videos, patches for images; 0 = no mask). The
  contrastive embedding is then taken from the visible tokens only: MAC.
- ``vision.encode``: ``visible`` (drop masked patches: cost falls with the ratio) or ``mask_token``
  (encode every position, masked ones as a learned token: the baseline).
- ``text.ratio``, ``text.strategy``: how the caption is masked for the objectives that read a masked
  caption (``random``: BERT; ``significant``: SNP-S3, significant words first).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from vlp.batch import ATTENTION_MASK, INPUT_IDS, PIXELS, SIGNIFICANT
from vlp.config import ConfigError
from vlp.models.encoders import IMAGE_ENCODERS
from vlp.models.masking import mask_text, tube_mask
from vlp.objectives.base import OBJECTIVES, ObjectiveOutput, build_objectives, parse_objectives


@dataclass(frozen=True)
class VisionMaskConfig:
    ratio: float = 0.0
    encode: Literal["visible", "mask_token"] = "visible"

    def __post_init__(self):
        if not 0.0 <= self.ratio < 1.0:
            raise ConfigError(f"masking.vision.ratio must be in [0, 1), got {self.ratio}")


@dataclass(frozen=True)
class TextMaskConfig:
    ratio: float = 0.15
    strategy: Literal["random", "significant"] = "random"

    def __post_init__(self):
        if not 0.0 < self.ratio < 1.0:
            raise ConfigError(f"masking.text.ratio must be in (0, 1), got {self.ratio}")


@dataclass(frozen=True)
class MaskingConfig:
    vision: VisionMaskConfig = field(default_factory=VisionMaskConfig)
    text: TextMaskConfig = field(default_factory=TextMaskConfig)


@dataclass(frozen=True)
class Plan:
    """What one forward computes, worked out once from the objectives' declarations."""

    needs: frozenset[str]
    uses_fusion: bool

    @property
    def needs_significant(self) -> bool:
        return "significant" in self.needs


def plan_pass(objectives: dict[str, Any], masking: MaskingConfig) -> Plan:
    """The union of the objectives' needs, closed over dependencies, checked against the masking.

    Args:
        objectives: ``{name: typed config}`` (from ``parse_objectives``).

    Raises:
        ConfigError: an objective that needs a visual mask runs without one.
    """
    needs: set[str] = set()
    uses_fusion = False
    for name, cfg in objectives.items():
        cls = OBJECTIVES.get(name)
        wanted, fusion = cls.requirements(cfg)
        needs |= wanted
        uses_fusion |= fusion
        if cls.needs_vision_mask and masking.vision.ratio <= 0:
            raise ConfigError(f"objective {name!r} reconstructs masked patches: set "
                              "masking.vision.ratio (e.g. 0.9 as in VideoMAE)")
    if "fused_masked" in needs:
        needs |= {"masked_text", "vision"}
        uses_fusion = True
    if "masked_text_hidden" in needs:
        needs.add("masked_text")
    if masking.text.strategy == "significant" and "masked_text" in needs:
        needs.add("significant")
    return Plan(frozenset(needs), uses_fusion)


def check_plan(plan: Plan, model_cfg, masking: MaskingConfig) -> None:
    """Model config against the plan: the fusion encoder exists exactly when something uses it (an
    unused one would get no gradient, which stalls DDP)."""
    if plan.uses_fusion and not model_cfg.fusion.enabled:
        raise ConfigError("the objectives need a fusion encoder: set model.fusion.layers (e.g. 2) or "
                          "model.fusion.share_text_encoder")
    if model_cfg.fusion.enabled and not plan.uses_fusion:
        raise ConfigError("model.fusion is set but no objective uses it (matching, or mlm/mae with "
                          "conditioned: true): drop it or add one")
    if masking.vision.encode == "mask_token" and masking.vision.ratio <= 0:
        raise ConfigError("masking.vision.encode: mask_token needs masking.vision.ratio > 0")


def check_objectives(objectives: dict[str, Any], model_cfg, masking: MaskingConfig) -> Plan:
    """Every check of the objectives against the model and masking configs; the plan of the pass.

    Runs when the experiment config loads (``TrainConfig``) and when ``PretrainingModel`` is built,
    so a combination that cannot train fails on the driver, naming the key, not on the workers.

    Args:
        objectives: ``{name: typed config}`` (from ``parse_objectives``).
        model_cfg: the ``DualEncoderConfig``.

    Raises:
        ConfigError: the first rule broken: the plan's (``plan_pass``, ``check_plan``), a visual mask
            for a tower that cannot drop patches, then each objective's own ``check``.
    """
    plan = plan_pass(objectives, masking)
    check_plan(plan, model_cfg, masking)
    if masking.vision.ratio > 0 and not getattr(IMAGE_ENCODERS.get(model_cfg.image.name),
                                                "supports_masking", False):
        raise ConfigError(f"masking.vision needs a tower that encodes visible patches; "
                          f"{model_cfg.image.name!r} does not (use video_vit)")
    for name, cfg in objectives.items():
        OBJECTIVES.get(name).check(cfg, model_cfg, masking)
    return plan


class PretrainingModel(nn.Module):
    """Model + objectives + masking.

    Args:
        model: the ``DualEncoder`` (built with ``vision_mask_token`` when masks are encoded as tokens).
        objectives: ``{name: typed config}`` (``TrainConfig.objectives``), or the section in its
            plain form (parsed here by ``parse_objectives``).
        masking: the masking config.
        special_ids: token ids never masked ([CLS], [SEP], [PAD]); ``mask_id`` the [MASK] id.
        context: passed to the objectives' constructors (e.g. ``local_world_size``, ``tokenizer``).
    """

    def __init__(self, model: nn.Module, objectives: dict[str, Any], masking: MaskingConfig, *,
                 special_ids: list[int], mask_id: int, **context: Any):
        super().__init__()
        self.model = model
        self.masking = masking
        objectives = parse_objectives(objectives)
        self.plan = check_objectives(objectives, model.cfg, masking)
        self.objectives = nn.ModuleDict(build_objectives(objectives, model=model, **context))
        self.register_buffer("special_ids", torch.tensor(sorted(set(special_ids)), dtype=torch.long),
                             persistent=False)
        self.mask_id = mask_id

    # ---- the shared pass ----------------------------------------------------------------------
    def encode(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Everything the objectives declared, from one pass (masks only in training mode)."""
        model, needs = self.model, self.plan.needs
        pixels, ids, attn = batch[PIXELS], batch[INPUT_IDS], batch[ATTENTION_MASK]
        vision_ratio = self.masking.vision.ratio if self.training else 0.0
        out: dict[str, Any] = {"logit_scale": model.scale()}
        if model.logit_bias is not None:
            out["logit_bias"] = model.logit_bias

        if "vision" in needs or vision_ratio > 0:
            keep = (tube_mask(pixels.shape[0], model.image_encoder.patches, vision_ratio,
                              device=pixels.device) if vision_ratio > 0 else None)
            vision = model.encode_vision_tokens(pixels, keep,
                                                mask_tokens=self.masking.vision.encode == "mask_token")
            out["vision"] = vision
            out["image_embeds"] = model.embed_vision(vision.pooled)
        else:
            out["image_embeds"] = model.encode_image(pixels)

        if "text_hidden" in needs:
            out["text_hidden"] = model.encode_text_tokens(ids, attn)
            out["text_embeds"] = model.embed_text(out["text_hidden"], attn)
        else:
            out["text_embeds"] = model.encode_text(ids, attn)

        if "masked_text" in needs:
            significant = batch.get(SIGNIFICANT) if self.masking.text.strategy == "significant" else None
            if self.masking.text.strategy == "significant" and significant is None:
                raise ConfigError("masking.text.strategy: significant needs the batch's significant "
                                  "words (run `vlp significant-words --shards DIR`)")
            masked = mask_text(ids, attn, self.masking.text.ratio, special_ids=self.special_ids,
                               mask_id=self.mask_id, vocab_size=model.vocab_size, priority=significant)
            out["masked_text"] = masked
            shared = model.cfg.fusion.share_text_encoder
            if "masked_text_hidden" in needs or ("fused_masked" in needs and not shared):
                out["masked_text_hidden"] = model.encode_text_tokens(masked.input_ids, attn)
            if "fused_masked" in needs:
                out["fused_masked"] = model.fuse(out["vision"].tokens, masked.input_ids, attn,
                                                 text_hidden=out.get("masked_text_hidden"))
        return out

    def forward(self, batch: dict[str, torch.Tensor], encode_only: bool = False):
        """``(outputs, {objective name: ObjectiveOutput})``, or the outputs alone with ``encode_only``
        (the feature cache step's re-encoding, which must not run the objectives' collectives)."""
        outputs = self.encode(batch)
        if encode_only:
            return outputs
        results: dict[str, ObjectiveOutput] = {
            name: objective(outputs, batch, self.model) for name, objective in self.objectives.items()}
        return outputs, results


def build_pretraining(config, tokenizer, **context: Any) -> PretrainingModel:
    """The ``PretrainingModel`` of an experiment config (``TrainConfig``) for ``tokenizer``.

    The model is fed the input pipeline's pixels (``pixels_to_model``: the project's ``PIXEL_MEAN`` /
    ``PIXEL_STD``) and converts them where its visual tower was trained otherwise
    (``model.pretrained``); with ``model.pretrained`` it starts from that folder's weights.
    """
    from vlp.data.transforms import PIXEL_MEAN, PIXEL_STD
    from vlp.models import DualEncoder

    if tokenizer.mask_token_id is None and "masked_text" in plan_pass(
            parse_objectives(config.objectives), config.masking).needs:
        raise ConfigError("the tokenizer has no [MASK] token; masked objectives cannot run")
    model = DualEncoder(config.model, vocab_size=len(tokenizer),
                        pad_token_id=tokenizer.pad_token_id or 0,
                        vision_mask_token=config.masking.vision.encode == "mask_token",
                        input_pixel_norm=(PIXEL_MEAN, PIXEL_STD))
    special = [t for t in (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id)
               if t is not None]
    return PretrainingModel(model, config.objectives, config.masking, special_ids=special,
                            mask_id=tokenizer.mask_token_id, tokenizer=tokenizer, **context)
