"""Whole Hugging Face dual encoders in local folders: which classes load, and what a folder says.

``HF_DUAL_ENCODERS`` registers, under the ``model_type`` of a folder's ``config.json``, each
``transformers`` dual-encoder class the project loads as a ``DualEncoder``, with what differs between
them: the classes of its two towers, whether linear projections follow them, SigLIP's logit bias, how
the text tower pools. ``read_dual_folder`` checks a folder and reads the facts a ``DualEncoderConfig``
is built from (``model.pretrained``); the towers that run these models are ``hf_dual``'s ``hf_vision``
and ``hf_text``. A new class is a new registration here (plus a text pooling in ``hf_dual`` if it pools
text in a new way).

This module sits at the bottom of ``vlp.models``: it imports no other module of the package and no
torch; ``transformers`` is imported only when a folder is read.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Literal

from vlp.config import ConfigError
from vlp.registry import Registry

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
PROCESSOR_FILE = "preprocessor_config.json"


@dataclass(frozen=True)
class DualFamily:
    """One ``transformers`` dual-encoder class and how its parts map onto a ``DualEncoder``.

    Attributes:
        model_class: the whole model's class (``CLIPModel``); its ``vision_model`` and ``text_model``
            become the towers, ``visual_projection`` / ``text_projection`` the projections.
        vision_class, text_class: the towers' classes, built from the sub-configs (empty: whatever
            ``AutoModel`` builds for the sub-config, as ``VisionTextDualEncoderModel`` itself does).
        vision_config_class, text_config_class: the sub-config classes, for towers of this kind built
            from a preset without a folder (empty: not offered).
        projections: linear projections follow the towers (SigLIP's towers end in their own heads).
        logit_bias: the model has SigLIP's learned logit bias.
        text_pooling: where the text feature is read: ``eos`` (CLIP: the end token, the last one the
            attention mask keeps), ``first`` (Chinese-CLIP: the [CLS] state), ``last`` (SigLIP: the
            last position, through the tower's head), ``pooler`` (the text model's own pooler, e.g.
            BERT's dense + tanh over [CLS]).
        text_attention_mask: the text tower reads the attention mask. SigLIP was trained attending to
            its padding (its pad token is its end token) and pools at the last position, so its
            captions are padded to ``max_position_embeddings`` and the mask is not passed.
        text_without_pooler: the text tower is built without a pooling layer (Chinese-CLIP).
    """

    model_class: str
    vision_class: str
    text_class: str
    vision_config_class: str
    text_config_class: str
    projections: bool
    logit_bias: bool
    text_pooling: Literal["eos", "first", "last", "pooler"]
    text_attention_mask: bool = True
    text_without_pooler: bool = False


HF_DUAL_ENCODERS: Registry[DualFamily] = Registry("Hugging Face dual encoder")
HF_DUAL_ENCODERS.register("clip")(DualFamily(
    "CLIPModel", "CLIPVisionModel", "CLIPTextModel", "CLIPVisionConfig", "CLIPTextConfig",
    projections=True, logit_bias=False, text_pooling="eos"))
HF_DUAL_ENCODERS.register("chinese_clip")(DualFamily(
    "ChineseCLIPModel", "ChineseCLIPVisionModel", "ChineseCLIPTextModel", "ChineseCLIPVisionConfig",
    "ChineseCLIPTextConfig", projections=True, logit_bias=False, text_pooling="first",
    text_without_pooler=True))
HF_DUAL_ENCODERS.register("siglip")(DualFamily(
    "SiglipModel", "SiglipVisionModel", "SiglipTextModel", "SiglipVisionConfig", "SiglipTextConfig",
    projections=False, logit_bias=True, text_pooling="last", text_attention_mask=False))
HF_DUAL_ENCODERS.register("vision-text-dual-encoder")(DualFamily(
    "VisionTextDualEncoderModel", "", "", "", "", projections=True, logit_bias=False,
    text_pooling="pooler"))


@dataclass(frozen=True)
class DualFolder:
    """What a dual-encoder folder says, as plain values.

    Attributes:
        path: the folder, absolute.
        model_type: its ``config.json`` ``model_type`` (the ``HF_DUAL_ENCODERS`` name).
        image_size: the side of the square images the visual tower takes.
        max_text_length: the text tower's positions (SigLIP pads every caption to exactly this).
        embed_dim: the shared embedding width (the projections' width, or the towers' own).
        pixel_mean, pixel_std: the image processor's normalisation, expressed for pixels scaled to
            [0, 1] (the processor's ``rescale_factor`` folded in), as the model's input expects it.
        logit_scale, logit_bias: the trained values, where the weights file can be read cheaply
            (safetensors), else None.
    """

    path: str
    model_type: str
    family: DualFamily
    image_size: int
    max_text_length: int
    embed_dim: int
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]
    logit_scale: float | None
    logit_bias: float | None

    @property
    def fixed_text_length(self) -> bool:
        """Captions must be padded to ``max_text_length`` exactly (the model pools at the last one)."""
        return self.family.text_pooling == "last"


def read_family(path: str) -> tuple[str, DualFamily]:
    """``(model_type, family)`` of a folder, or a one-line ``ConfigError`` saying why not."""
    config_file = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise ConfigError(f"{path} is not a folder (a local Hugging Face dual-encoder folder is needed)")
    if os.path.isfile(os.path.join(path, "model.pt")):
        raise ConfigError(f"{path} is a vlp training checkpoint (model.pt), not a Hugging Face folder")
    if not os.path.isfile(config_file):
        raise ConfigError(f"{path} is not a Hugging Face model folder (no config.json in it)")
    with open(config_file, encoding="utf-8") as f:
        raw = json.load(f)
    model_type = str(raw.get("model_type", ""))
    if model_type not in HF_DUAL_ENCODERS:
        held = (raw.get("architectures") or [model_type or "model without a model_type"])[0]
        loadable = ", ".join(HF_DUAL_ENCODERS.get(n).model_class for n in HF_DUAL_ENCODERS.names())
        raise ConfigError(f"{path} holds a {held}, not a dual encoder this project loads ({loadable})")
    return model_type, HF_DUAL_ENCODERS.get(model_type)


def check_files(path: str, *, tokenizer: bool = False) -> None:
    """Raise a one-line ``ConfigError`` naming what a dual-encoder folder lacks: weights, the image
    processor's config, and (with ``tokenizer``) a tokenizer."""
    if not any(os.path.isfile(os.path.join(path, f)) for f in WEIGHT_FILES):
        raise ConfigError(f"{path} has no weights ({' or '.join(WEIGHT_FILES[::2])})")
    if not os.path.isfile(os.path.join(path, PROCESSOR_FILE)):
        raise ConfigError(f"{path} has no {PROCESSOR_FILE} (the model's image preprocessing)")
    if tokenizer and not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise ConfigError(f"{path} has no tokenizer ({' or '.join(TOKENIZER_FILES)})")


def hf_image_processor(path: str):
    """The folder's ``transformers`` image processor, the PIL one (the reference the torchvision
    variant approximates, and the one ``ImagePreprocess`` reproduces)."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(path, backend="pil", local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{path}: its {PROCESSOR_FILE} does not load "
                          f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def pixel_normalisation(processor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The processor's mean and std for pixels in [0, 1]: ``(p * r - m) / s`` is ``(p / 255 - m') / s'``
    with ``m' = m / (255 r)`` and ``s' = s / (255 r)`` (``r``: its rescale factor, 1 if it does not
    rescale; mean 0 and std 1 if it does not normalise)."""
    r = float(processor.rescale_factor) if processor.do_rescale else 1.0
    if processor.do_normalize:
        mean, std = processor.image_mean, processor.image_std
        mean = [float(mean)] * 3 if isinstance(mean, (int, float)) else [float(v) for v in mean]
        std = [float(std)] * 3 if isinstance(std, (int, float)) else [float(v) for v in std]
    else:
        mean, std = [0.0] * 3, [1.0] * 3
    k = 255.0 * r
    return tuple(m / k for m in mean), tuple(s / k for s in std)


def _trained_scalars(path: str, names: tuple[str, ...]) -> dict[str, float]:
    """Scalars (``logit_scale``...) read from the safetensors weights without loading the rest."""
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    files: dict[str, str] = {}
    if os.path.isfile(single):
        files = {name: single for name in names}
    elif os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map", {})
        files = {name: os.path.join(path, weight_map[name]) for name in names if name in weight_map}
    if not files:
        return {}
    from safetensors import safe_open

    out = {}
    for name, file in files.items():
        with safe_open(file, framework="pt") as f:
            if name in set(f.keys()):
                out[name] = float(f.get_tensor(name).float().reshape(-1)[0])
    return out


def read_dual_folder(path: str) -> DualFolder:
    """Check a local dual-encoder folder and read what the model config is built from.

    Raises:
        ConfigError: one line: not a folder, a vlp checkpoint, not a supported class, a missing
            file, or towers that do not fit together.
    """
    path = os.path.abspath(path)
    model_type, family = read_family(path)
    check_files(path)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    vision, text = config.vision_config, config.text_config
    if family.projections:
        embed_dim = int(config.projection_dim)
    else:
        embed_dim = int(vision.hidden_size)
        text_out = int(getattr(text, "projection_size", None) or text.hidden_size)
        if text_out != embed_dim:
            raise ConfigError(f"{path}: the towers' features differ in width ({embed_dim} and "
                              f"{text_out}) and the model has no projections")
    mean, std = pixel_normalisation(hf_image_processor(path))
    names = ("logit_scale", "logit_bias") if family.logit_bias else ("logit_scale",)
    scalars = _trained_scalars(path, names)
    return DualFolder(path=path, model_type=model_type, family=family,
                      image_size=int(vision.image_size),
                      max_text_length=int(text.max_position_embeddings), embed_dim=embed_dim,
                      pixel_mean=mean, pixel_std=std, logit_scale=scalars.get("logit_scale"),
                      logit_bias=scalars.get("logit_bias"))

