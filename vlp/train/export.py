"""Export a trained dual encoder as a Hugging Face folder that ``transformers`` loads with its own
classes and no project code (``vlp export --checkpoint CKPT --format hf --output DIR``).

``export_hf`` reads a training checkpoint (``vlp.train.checkpoint``), maps the towers onto
``transformers`` classes, saves model, tokenizer and image processor with ``save_pretrained``, then
reloads the folder with ``transformers`` alone and checks that it embeds as the checkpoint does (to
``CHECK_TOLERANCE``) before the folder appears at ``output``. Two exporters:

- our ``vit`` + ``bert`` towers -> ``VisionTextDualEncoderModel``:

    ours                                     exported
    image_encoder.vit (ViTModel, no pooler)  vision_model: ViTModel, pooler dense = identity, bias 0,
                                             pooler_act "linear" (the identity): its pooler_output is
                                             the CLS state, which is our ``cls`` pooling
    text_encoder.bert (BertModel, no pooler) text_model: BertModel, whose pooler is dense + tanh (fixed
                                             in code): dense = eps * I, bias 0, and text_projection =
                                             ours / eps, so tanh(eps x) / eps = x (1 - d) with
                                             0 <= d <= (eps B)^2 / 3, B a bound on the CLS state
                                             (``_state_bound``); eps = 2^-12 / B makes d <= 2e-8,
                                             below float32's resolution (float16 cannot hold the
                                             weights / eps: the README says so)
    image_proj, text_proj                    visual_projection, text_projection (/ eps, above)
    logit_scale (clamped at max_logit_scale) logit_scale, the clamp applied
    logit_bias (SigLIP loss)                 no field in the class: kept in config.json (``vlp_export``)

- the ``hf_vision`` + ``hf_text`` towers of a model started from a Hugging Face dual encoder
  (``model.pretrained``: ``CLIPModel``, ``ChineseCLIPModel``, ``SiglipModel``,
  ``VisionTextDualEncoderModel``) -> that class again, the inverse of ``vlp.models.hf_dual``'s
  ``load_hf_weights``: the towers are the class's own sub-models and read as it reads them.

The image processor (``ViTImageProcessor``, saved with the tokenizer as one
``VisionTextDualEncoderProcessor``, so that ``AutoProcessor`` loads both) does the evaluation path of
``vlp.data.transforms``: the whole image resized to ``image_size`` square with PIL's bilinear filter,
/255, normalised by the visual tower's statistics (``PIXEL_MEAN`` / ``PIXEL_STD`` unless the model
says otherwise). It is exact with the PIL backend (``backend="pil"``, the default where torchvision
is not installed). Our decoder also lets libjpeg decode a JPEG at a reduced scale (``Image.draft``);
a caller reproduces it by calling ``im.draft("RGB", (size, size))`` before the processor (the
exported README says so).

Refused (``ConfigError``, each reason named; ``export_refusals``): video models (``num_frames`` > 1,
the ``video_vit`` and ``videomae`` towers), our own ``transformer`` text tower, ``mean`` pooling (the
classes' poolers read the first token only) and a fusion encoder: no ``transformers`` class holds them.
A new pair of towers gets an exporter in ``_EXPORTERS`` (keyed by their registered names); a tower
that no ``transformers`` class can hold gets its reason in ``_NO_HF_CLASS``.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlp.batch import ATTENTION_MASK, INPUT_IDS
from vlp.config import ConfigError, from_dict
from vlp.data.tokenizer import tokenize_captions
from vlp.data.transforms import PIXEL_MEAN, PIXEL_STD, decode_images, pixels_to_model
from vlp.models.config import DualEncoderConfig
from vlp.train.checkpoint import is_checkpoint, load_state, load_trained_pretraining

# Largest |eps * x| fed to the BERT pooler's tanh: tanh(y) / y >= 1 - y^2 / 3 = 1 - 2e-8 there.
TANH_LINEAR_LIMIT = 2.0 ** -12
# The reloaded export must embed as the checkpoint does to this (max abs difference, unit vectors).
CHECK_TOLERANCE = 1e-5

_NO_HF_CLASS = {
    "video_vit": ("image tower 'video_vit' is this project's space-time ViT, which no transformers "
                  "class holds"),
    "videomae": ("image tower 'videomae' is a video encoder, and transformers' dual-encoder classes "
                 "embed single images"),
    "transformer": ("text tower 'transformer' is this project's own text encoder, which no "
                    "transformers class holds"),
}
# The export's own check: English, Chinese, and a caption longer than any text limit.
_PROBE_CAPTIONS = ("a photo of a cat sitting on a red mat", "一只猫坐在红色的垫子上",
                   " ".join(["a long caption that runs past the text limit"] * 40))


@dataclass
class _Exported:
    """An exporter's result.

    Attributes:
        model: the ``transformers`` model.
        notes: what it records in config.json (``vlp_export``) and returns: ``model_class``,
            ``vision_model``, ``text_model``, and the mapping's own facts.
        mapping: README lines, one per part, saying how that part reproduces ours.
        text_inputs: what ``get_text_features`` is given (SigLIP: ``input_ids`` alone).
        holds_logit_bias: the class holds SigLIP's bias.
    """

    model: Any
    notes: dict[str, Any]
    mapping: list[str] = field(default_factory=list)
    text_inputs: tuple[str, ...] = ("input_ids", "attention_mask")
    holds_logit_bias: bool = False


def export_refusals(model_cfg: DualEncoderConfig) -> list[str]:
    """Why a model of this config cannot leave as a Hugging Face folder (empty: it can)."""
    reasons = []
    if model_cfg.num_frames > 1:
        reasons.append(f"model.num_frames is {model_cfg.num_frames}: a video model, and transformers' "
                       "dual-encoder classes embed single images")
    pair = (model_cfg.image.name, model_cfg.text.name)
    known = [name for name in pair if name in _NO_HF_CLASS]
    reasons += [_NO_HF_CLASS[name] for name in known]
    if not known and pair not in _EXPORTERS:
        reasons.append(f"towers {' + '.join(pair)} have no Hugging Face export (exported: "
                       f"{', '.join(' + '.join(p) for p in _EXPORTERS)})")
    for role, tower in (("image", model_cfg.image), ("text", model_cfg.text)):
        if tower.pooling != "cls" and tower.name not in _NO_HF_CLASS:
            reasons.append(f"model.{role}.pooling is {tower.pooling!r}: the exported {role} model's "
                           "pooler reads the first token only, so it has no transformers equivalent")
    if model_cfg.fusion.enabled:
        reasons.append("model.fusion: the fusion encoder has no transformers class, and a dual-encoder "
                       "export would drop it")
    return reasons


def _clamped_logit_scale(model) -> float:
    """The temperature the checkpoint applies: its ``logit_scale`` with the training clamp."""
    return min(model.logit_scale.item(), math.log(model.cfg.max_logit_scale))


def _copy_config(config):
    return type(config).from_dict(config.to_dict())


def _load_tower(target: nn.Module, source: nn.Module, new_prefix: str = "") -> None:
    """``source``'s weights into ``target``, which has them all (and, with ``new_prefix``, a pooler)."""
    missing, unexpected = target.load_state_dict(source.state_dict(), strict=False)
    if unexpected or any(not (new_prefix and key.startswith(new_prefix)) for key in missing):
        raise RuntimeError(f"{type(target).__name__} does not hold the tower's weights: missing "
                           f"{missing}, unexpected {unexpected}")


def _state_bound(model: nn.Module) -> float:
    """A bound on |last_hidden_state| of a post-LayerNorm encoder: its last LayerNorm gives zero-mean
    vectors z with sum z_i^2 <= H, so |z_i| <= sqrt(H - 1) and
    |y_i| <= |gamma_i| sqrt(H - 1) + |beta_i|."""
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    if not norms:
        raise ConfigError(f"text tower {type(model).__name__} has no LayerNorm to bound its output by")
    norm = norms[-1]
    width = norm.normalized_shape[-1]
    gamma = norm.weight.detach().abs() if norm.weight is not None else torch.ones(width)
    beta = norm.bias.detach().abs() if norm.bias is not None else torch.zeros(width)
    return float((gamma * math.sqrt(max(width - 1, 1)) + beta).max())


def _projection(module: nn.Module, width: int) -> torch.Tensor:
    """A projection's weight; the identity where the model has none (``model.projection: none``)."""
    return module.weight if isinstance(module, nn.Linear) else torch.eye(width)


def _vit_bert(model) -> _Exported:
    """``vit`` + ``bert`` -> ``VisionTextDualEncoderModel`` (the mapping in the module docstring)."""
    from transformers import VisionTextDualEncoderConfig, VisionTextDualEncoderModel, ViTModel

    vit, bert = model.image_encoder.vit, model.text_encoder.bert
    vision_cfg = _copy_config(vit.config)
    vision_cfg.pooler_act = "linear"
    vision_cfg.pooler_output_size = vision_cfg.hidden_size
    text_cls = type(bert)
    try:
        text = text_cls(_copy_config(bert.config), add_pooling_layer=True)
    except TypeError:  # a text model without the option has no pooler to read
        text = None
    pooler = getattr(text, "pooler", None)
    if not (isinstance(getattr(pooler, "dense", None), nn.Linear)
            and isinstance(getattr(pooler, "activation", None), nn.Tanh)):
        raise ConfigError(f"the text tower's {text_cls.__name__} has no first-token dense + tanh "
                          "pooler for VisionTextDualEncoderModel to read")
    bound = _state_bound(bert)
    eps = TANH_LINEAR_LIMIT / bound
    vision = ViTModel(vision_cfg, add_pooling_layer=True,
                      use_mask_token=getattr(vit.embeddings, "mask_token", None) is not None)
    cfg = VisionTextDualEncoderConfig.from_vision_text_configs(
        vision.config, text.config, projection_dim=model.cfg.embed_dim,
        logit_scale_init_value=_clamped_logit_scale(model))
    hf = VisionTextDualEncoderModel(config=cfg, vision_model=vision, text_model=text)
    # weights go in after the wrapper is built: its post_init may initialise its submodules
    with torch.no_grad():
        _load_tower(hf.vision_model, vit, "pooler.")
        _load_tower(hf.text_model, bert, "pooler.")
        hf.vision_model.pooler.dense.weight.copy_(torch.eye(vision_cfg.hidden_size))
        hf.vision_model.pooler.dense.bias.zero_()
        hf.text_model.pooler.dense.weight.copy_(torch.eye(bert.config.hidden_size) * eps)
        hf.text_model.pooler.dense.bias.zero_()
        hf.visual_projection.weight.copy_(_projection(model.image_proj, model.cfg.embed_dim))
        hf.text_projection.weight.copy_(_projection(model.text_proj, model.cfg.embed_dim) / eps)
        hf.logit_scale.fill_(cfg.logit_scale_init_value)
    notes = {
        "model_class": type(hf).__name__, "vision_model": type(vision).__name__,
        "text_model": text_cls.__name__,
        "vision_pooler": "dense = identity, bias 0, pooler_act linear: pooler_output is the CLS state",
        "text_pooler": ("dense = eps * identity, bias 0, tanh (fixed in the class); text_projection = "
                        "the trained one / eps, so tanh(eps x) / eps = x (1 - d), 0 <= d <= "
                        "(eps B)^2 / 3 <= 2e-8, B (text_state_bound) bounding the CLS state by the "
                        "last LayerNorm"),
        "text_pooler_eps": eps, "text_state_bound": bound,
    }
    mapping = [
        "**Vision pooler**: identity dense, `pooler_act: linear`: `pooler_output` is the CLS state.",
        (f"**Text pooler**: {text_cls.__name__}'s pooler applies tanh (fixed in code), so it runs in "
         f"its linear range: its dense is eps * identity (eps = {eps:.4g}) and `text_projection` is "
         "the trained projection / eps; tanh(eps x) / eps equals x to a relative 2e-8 for every CLS "
         f"state the model can produce (at most {bound:.4g}, bounded by its last LayerNorm). Run the "
         "model in float32 (exact) or bfloat16 (as close as the project's own bfloat16), not "
         "float16: the text projection's weights / eps pass float16's range."),
    ]
    return _Exported(hf, notes, mapping)


def _hf_family(vision: nn.Module, text: nn.Module):
    """The registered dual-encoder family whose tower classes these are (``AutoModel``-built towers:
    ``VisionTextDualEncoderModel``'s, whose classes the registry leaves empty)."""
    from vlp.models.hf_folder import HF_DUAL_ENCODERS

    families = [HF_DUAL_ENCODERS.get(name) for name in HF_DUAL_ENCODERS.names()]
    classes = (type(vision).__name__, type(text).__name__)
    found = ([f for f in families if (f.vision_class, f.text_class) == classes]
             or [f for f in families if (f.vision_class, f.text_class) == ("", "")])
    if len(found) != 1:
        raise ConfigError(f"towers {' + '.join(classes)} match no single Hugging Face dual-encoder "
                          "class")
    return found[0]


# How each family's text feature is read (``DualFamily.text_pooling``), for the README.
_TEXT_POOLING = {"eos": "the end token's state", "first": "the first token's state",
                 "last": "the last position, through the tower's head", "pooler": "its pooler's output"}


def _hf_dual(model) -> _Exported:
    """``hf_vision`` + ``hf_text`` -> the class they were loaded from, parts where it keeps them."""
    import transformers

    vision, text = model.image_encoder.model, model.text_encoder.model
    family = _hf_family(vision, text)
    model_class = getattr(transformers, family.model_class)
    kwargs = {"vision_config": vision.config.to_dict(), "text_config": text.config.to_dict()}
    if family.projections:
        kwargs["projection_dim"] = model.cfg.embed_dim
    hf = model_class(model_class.config_class(**kwargs))
    with torch.no_grad():
        _load_tower(hf.vision_model, vision)
        _load_tower(hf.text_model, text)
        if family.projections:
            hf.visual_projection.load_state_dict(model.image_proj.state_dict())
            hf.text_projection.load_state_dict(model.text_proj.state_dict())
        hf.logit_scale.fill_(_clamped_logit_scale(model))
        if family.logit_bias:
            hf.logit_bias.fill_(model.logit_bias.item())
    notes = {"model_class": family.model_class, "vision_model": type(hf.vision_model).__name__,
             "text_model": type(hf.text_model).__name__}
    parts = ["its projections" if family.projections else "no projections (the towers end in "
             "their own heads)"] + (["its logit bias"] if family.logit_bias else [])
    mapping = [(f"**Towers**: the class's own sub-models, read as it reads them (the text feature: "
                f"{_TEXT_POOLING[family.text_pooling]}), with {' and '.join(parts)}.")]
    inputs = ("input_ids", "attention_mask") if family.text_attention_mask else ("input_ids",)
    if not family.text_attention_mask:
        mapping.append("**Text inputs**: `input_ids` alone, padded to `max_length` (the model "
                       "attends to its padding and pools at the last position, as trained).")
    return _Exported(hf, notes, mapping, inputs, holds_logit_bias=family.logit_bias)


# (image tower, text tower), by registered name -> exporter.
_EXPORTERS: dict[tuple[str, str], Callable[[Any], _Exported]] = {
    ("vit", "bert"): _vit_bert,
    ("hf_vision", "hf_text"): _hf_dual,
}


def _pixel_norm(model_cfg: DualEncoderConfig) -> tuple[list[float], list[float]]:
    """The visual tower's normalisation (for pixels in [0, 1]), which the processor applies."""
    if model_cfg.pixel_mean is not None:
        return list(model_cfg.pixel_mean), list(model_cfg.pixel_std)
    return list(PIXEL_MEAN), list(PIXEL_STD)


def _image_processor(model_cfg: DualEncoderConfig):
    from transformers import ViTImageProcessorPil
    from transformers.image_utils import PILImageResampling

    mean, std = _pixel_norm(model_cfg)
    size = model_cfg.image_size
    return ViTImageProcessorPil(
        do_resize=True, size={"height": size, "width": size}, resample=PILImageResampling.BILINEAR,
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=mean, image_std=std,
        do_convert_rgb=True)


def _probe_image(image_size: int) -> bytes:
    """A PNG larger than the model's input and not square, so that the resize is checked too."""
    from PIL import Image

    rng = np.random.default_rng(0)
    h, w = image_size * 3 // 2 + 3, image_size * 2 + 5
    blocks = rng.integers(0, 256, size=(h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
    pixels = np.repeat(np.repeat(blocks, 4, axis=0), 4, axis=1)[:h, :w]
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _unit(features) -> torch.Tensor:
    """``get_*_features`` output (a tensor in transformers 4; in 5 an output whose ``pooler_output``
    is projected) as unit vectors."""
    tensor = features if torch.is_tensor(features) else features.pooler_output
    return F.normalize(tensor, dim=-1)


@torch.no_grad()
def _check(folder: str, model, tokenizer, model_cfg: DualEncoderConfig,
           text_inputs: tuple[str, ...]) -> dict[str, float]:
    """Reload ``folder`` with ``transformers`` alone; the largest differences of its processor's pixels
    (from the visual tower's input) and of its unit embeddings from the checkpoint's, on a probe image
    and captions.

    Raises:
        RuntimeError: one of them exceeds ``CHECK_TOLERANCE``.
    """
    from PIL import Image
    from transformers import AutoModel, AutoProcessor, AutoTokenizer

    hf = AutoModel.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder, backend="pil")
    hf_tokenizer = AutoTokenizer.from_pretrained(folder)
    png = _probe_image(model_cfg.image_size)
    decoded = torch.from_numpy(decode_images([png], model_cfg.image_size))
    ours_pixels = pixels_to_model(decoded)  # what vlp eval feeds the model
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in _pixel_norm(model_cfg))
    tower_pixels = (decoded.movedim(-1, -3).float() / 255.0 - mean) / std  # what its tower sees
    captions = list(_PROBE_CAPTIONS)
    with Image.open(io.BytesIO(png)) as im:
        inputs = processor(text=captions, images=[im.convert("RGB")], padding="max_length",
                           truncation=True, return_tensors="pt")
    tok = tokenize_captions(tokenizer, captions, model_cfg.max_text_length)
    ours_text = model.encode_text(torch.from_numpy(tok[INPUT_IDS]),
                                  torch.from_numpy(tok[ATTENTION_MASK]))
    # the tokenizer alone, and through the processor (which takes other call defaults)
    texts = [hf_tokenizer(captions, padding="max_length", truncation=True, return_tensors="pt"),
             inputs]
    diffs = {
        "pixels": (inputs["pixel_values"] - tower_pixels).abs().max().item(),
        "image": (_unit(hf.get_image_features(pixel_values=inputs["pixel_values"]))
                  - model.encode_image(ours_pixels)).abs().max().item(),
        "text": max((_unit(hf.get_text_features(**{k: enc[k] for k in text_inputs}))
                     - ours_text).abs().max().item() for enc in texts),
    }
    worst = max(diffs, key=diffs.get)
    if not diffs[worst] <= CHECK_TOLERANCE:  # also catches NaN
        raise RuntimeError(f"the exported model does not reproduce the checkpoint: {worst} differs by "
                           f"{diffs[worst]:.3g} (tolerance {CHECK_TOLERANCE:g})")
    return diffs


def _readme(model_cfg: DualEncoderConfig, exported: _Exported, logit_bias: float | None) -> str:
    notes, size = exported.notes, model_cfg.image_size
    mean, std = _pixel_norm(model_cfg)
    args = ", ".join(f"{k}=text[{k!r}]" for k in exported.text_inputs)
    lines = [
        (f"**Images**: the whole image resized to {size}x{size} with PIL's bilinear filter, /255, "
         f"normalised by mean {mean} and std {std}. Exact with the processor's PIL backend "
         "(`backend=\"pil\"`; the torchvision backend resizes differently). The project lets "
         "libjpeg decode a JPEG at a reduced scale first (`Image.draft`, above). Transparent images: "
         "the project drops alpha, the processor composites onto white."),
        *exported.mapping,
        (f"**Text**: the tokenizer truncates at {model_cfg.max_text_length} tokens "
         "(`model_max_length`), as in training."),
        "**Temperature**: `logit_scale` holds the trained one, clamped at the training maximum.",
    ]
    if logit_bias is not None and not exported.holds_logit_bias:
        lines.append(f"**Logit bias** (SigLIP's loss): {logit_bias:.6g}, which this class does not "
                     "apply: add it to the logits yourself (config.json: `vlp_export.logit_bias`).")
    bullets = "\n".join(f"- {line}" for line in lines)
    return f"""# Dual encoder exported from vlp

A `{notes['model_class']}` ({notes['vision_model']} + {notes['text_model']}, {model_cfg.embed_dim}-d
embeddings) with its tokenizer and image processor; it loads with `transformers` alone:

```python
import torch, torch.nn.functional as F
from PIL import Image
from transformers import AutoModel, AutoProcessor

model = AutoModel.from_pretrained(DIR).eval()
processor = AutoProcessor.from_pretrained(DIR, backend="pil")
im = Image.open(PATH)
im.draft("RGB", ({size}, {size}))  # as the project's decoder does (JPEG only; a no-op otherwise)
pixels = processor(images=[im.convert("RGB")], return_tensors="pt")["pixel_values"]
text = processor(text=["a photo of a cat", "一只猫"], padding="max_length", truncation=True,
                 return_tensors="pt")
with torch.no_grad():
    image_embeds = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
    text_embeds = F.normalize(model.get_text_features({args}).pooler_output, dim=-1)
```

These unit embeddings equal the project's (`DualEncoder.encode_image` / `encode_text` after its
evaluation preprocessing) to {CHECK_TOLERANCE:g}, checked when this folder was written
(`vlp_export.max_abs_diff` in config.json). What makes them equal:

{bullets}
"""


def _truncate_as_trained(tokenizer, max_length: int) -> None:
    """Make ``tokenizer(texts, truncation=True)`` and a processor's call cut (and pad to
    ``max_length``) where training did.

    A processor takes its call defaults from the tokenizer's init kwargs, which hold any truncation and
    padding baked into tokenizer.json (MiniLM's: truncate and pad to 128); those go too.
    """
    tokenizer.model_max_length = max_length
    tokenizer.init_kwargs.update(model_max_length=max_length, max_length=max_length)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        if backend.truncation is not None:
            backend.enable_truncation(max_length=max_length)
        if backend.padding is not None:
            backend.no_padding()


def _write(folder: str, exported: _Exported, tokenizer, model_cfg: DualEncoderConfig,
           record: dict[str, Any]) -> None:
    """Model, tokenizer and image processor (one ``VisionTextDualEncoderProcessor``, and the image
    processor's own preprocessor_config.json, which older readers look for), README."""
    from transformers import VisionTextDualEncoderProcessor

    image_processor = _image_processor(model_cfg)
    VisionTextDualEncoderProcessor(image_processor=image_processor,
                                   tokenizer=tokenizer).save_pretrained(folder)
    image_processor.save_pretrained(folder)
    exported.model.config.vlp_export = record  # config.json: what was exported, and how
    exported.model.save_pretrained(folder)
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:
        f.write(_readme(model_cfg, exported, record.get("logit_bias")))


@contextlib.contextmanager
def _no_progress_bars():
    """``transformers``' progress bars (writing and loading weights) off during the export."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _read_config(checkpoint: str):
    from vlp.train.config import TrainConfig

    path = os.path.join(checkpoint, "config.json")
    if not (is_checkpoint(checkpoint) and os.path.isfile(path)):
        raise ConfigError(f"{checkpoint} is not a training checkpoint (no model.pt or checkpoint.json, "
                          "and config.json)")
    with open(path) as f:
        return from_dict(TrainConfig, json.load(f))


def _check_output(output: str) -> None:
    if "://" in output:
        raise ConfigError(f"--output {output}: the export writes a local folder")
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        raise ConfigError(f"--output {output} exists and is not an empty folder: an export never "
                          "overwrites; remove it or choose another")


def export_hf(checkpoint: str, output: str) -> dict[str, Any]:
    """Write a ``vlp train`` checkpoint as a Hugging Face folder (model, tokenizer, image processor,
    README) that ``transformers`` loads with its own classes, and check that it embeds as the
    checkpoint does.

    The folder is built beside ``output`` and renamed into place once checked, so ``output`` is either
    absent or complete. ``output`` must not exist, or be an empty folder: an export never overwrites.

    Returns:
        ``output``, the classes, embedding size, the mapping's facts (``vit`` + ``bert``:
        ``text_pooler_eps``), ``max_abs_diff`` (the check's largest differences: ``pixels``,
        ``image``, ``text``), ``left_out`` (what the folder does not carry) and ``summary``, one line
        to print.

    Raises:
        ConfigError: not a checkpoint, a model that no ``transformers`` class holds (each reason
            named), or ``output`` in the way.
        RuntimeError: the reloaded export does not reproduce the checkpoint (an export bug).
    """
    config = _read_config(checkpoint)
    reasons = export_refusals(config.model)
    if reasons:
        raise ConfigError(f"cannot export {checkpoint} as a Hugging Face model: {'; '.join(reasons)}")
    _check_output(output)
    pretraining, tokenizer, config = load_trained_pretraining(checkpoint)
    model, model_cfg = pretraining.model, config.model
    exported = _EXPORTERS[(model_cfg.image.name, model_cfg.text.name)](model)
    notes = exported.notes
    left_out = []
    if model.logit_bias is not None:
        notes["logit_bias"] = model.logit_bias.item()
        if not exported.holds_logit_bias:
            left_out.append("logit_bias (kept in config.json: vlp_export.logit_bias)")
    heads = sorted({key.split(".")[0] for key in pretraining.objectives.state_dict()})
    if heads:
        left_out.append(f"the heads of objectives {', '.join(heads)} (training heads, not the dual "
                        "encoder)")
    has_state = os.path.isfile(os.path.join(checkpoint, "state.json"))
    step = load_state(checkpoint).step if has_state else None
    _truncate_as_trained(tokenizer, model_cfg.max_text_length)

    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(output))}.", dir=parent)
    try:
        with _no_progress_bars():
            _write(staging, exported, tokenizer, model_cfg, {
                **notes, "text_inputs": list(exported.text_inputs),
                "checkpoint": os.path.basename(os.path.normpath(checkpoint)), "step": step})
            diffs = _check(staging, model, tokenizer, model_cfg, exported.text_inputs)
        exported.model.config.vlp_export["max_abs_diff"] = diffs
        exported.model.config.save_pretrained(staging)
        os.chmod(staging, 0o755)  # mkdtemp's 0700 would hide the folder from other users
        os.replace(staging, output)  # over an empty folder too; atomic on one filesystem
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    worst = max(diffs["image"], diffs["text"])
    return {
        "output": output, "format": "hf", "checkpoint": checkpoint, "step": step, **notes,
        "text_inputs": list(exported.text_inputs), "embed_dim": model_cfg.embed_dim,
        "image_size": model_cfg.image_size, "max_text_length": model_cfg.max_text_length,
        "max_abs_diff": diffs, "left_out": left_out,
        "summary": (f"exported {checkpoint} to {output} as {notes['model_class']} "
                    f"({notes['vision_model']} + {notes['text_model']}, {model_cfg.embed_dim}-d); "
                    f"reloaded embeddings match to {worst:.1e}"
                    + (f"; left out: {'; '.join(left_out)}" if left_out else "")),
    }
