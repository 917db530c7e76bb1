"""One loader for every dual encoder used outside a training run: ``load_dual_encoder``.

A path is either a ``vlp train`` checkpoint folder (``model.pt``; or a sharded one, consolidated on
load) or a local Hugging Face folder of a whole dual encoder (``CLIPModel``, ``ChineseCLIPModel``,
``SiglipModel``, ``VisionTextDualEncoderModel``; see ``vlp.models.hf_folder``), read offline. Either
way the caller gets a ``LoadedDualEncoder``: the ``DualEncoder`` in eval mode, its tokenizer, the image
preprocessing that feeds it, the caption length it takes and where it came from, so that scoring,
evaluation and scripts treat both alike. It lives in ``vlp.train`` because a checkpoint is read with
``vlp.train.checkpoint`` (and ``vlp.models`` may not import upwards).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from vlp.data.preprocess import ImagePreprocess
from vlp.data.tokenizer import load_tokenizer
from vlp.models import DualEncoder, DualEncoderConfig
from vlp.models.hf_folder import check_files, read_dual_folder
from vlp.train.checkpoint import is_checkpoint, load_trained_model


@dataclass
class LoadedDualEncoder:
    """A dual encoder ready to embed.

    Attributes:
        model: the ``DualEncoder``, in eval mode: ``model.encode_image(preprocess(images))`` and
            ``model.encode_text(input_ids, attention_mask)`` give unit embeddings; ``model.scale()``
            (and ``model.logit_bias``) the trained temperature (and SigLIP's bias).
        tokenizer: a ``transformers`` tokenizer; pad captions to ``max_text_length``
            (``vlp.data.tokenizer.tokenize_captions`` does).
        preprocess: images (bytes or decoded RGB arrays) -> the model's pixels.
        max_text_length: tokens per caption the model takes (SigLIP: exactly this many).
        source: ``kind`` (``hf`` or ``checkpoint``), ``model_class`` (the ``transformers`` class, or
            ``DualEncoder``), ``path`` (absolute).
    """

    model: DualEncoder
    tokenizer: Any
    preprocess: ImagePreprocess
    max_text_length: int
    source: dict[str, str]


def load_dual_encoder(path: str, device: str | torch.device = "cpu") -> LoadedDualEncoder:
    """A checkpoint folder or a Hugging Face dual-encoder folder -> ``LoadedDualEncoder``.

    Raises:
        ConfigError: one line saying why the folder cannot be loaded (not a folder, an unsupported
            class, a missing file: weights, ``preprocessor_config.json``, tokenizer).
    """
    path = os.path.abspath(path)
    if is_checkpoint(path):
        model, tokenizer, config = load_trained_model(path, device)
        return LoadedDualEncoder(model=model, tokenizer=tokenizer,
                                 preprocess=ImagePreprocess.for_vlp(config.model.image_size),
                                 max_text_length=config.model.max_text_length,
                                 source={"kind": "checkpoint", "model_class": "DualEncoder",
                                         "path": path})
    folder = read_dual_folder(path)
    check_files(path, tokenizer=True)
    tokenizer = load_tokenizer(path)
    length = folder.max_text_length
    if not folder.fixed_text_length and tokenizer.model_max_length:
        length = min(length, int(tokenizer.model_max_length))
    # no input_pixel_norm: ``preprocess`` normalises as the model's own processor does
    model = DualEncoder(DualEncoderConfig(pretrained=path, max_text_length=length),
                        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id or 0)
    return LoadedDualEncoder(model=model.to(device).eval(), tokenizer=tokenizer,
                             preprocess=ImagePreprocess.from_hf_folder(path),
                             max_text_length=model.cfg.max_text_length,
                             source={"kind": "hf", "model_class": folder.family.model_class,
                                     "path": path})
