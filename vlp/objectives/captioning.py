"""CoCa's captioning objective: a caption decoder reading the visual tokens of the shared visual pass.

CoCa trains a contrastive loss and a captioning loss from one forward pass: the visual tokens that give
the image embedding also feed a decoder that predicts the caption word by word (teacher forcing), and
the two losses are weighed 1 : 2 (``weight: 2.0`` here, the contrastive objective's 1.0 beside it).

One difference from CoCa, on purpose: CoCa's text side is a *causal* unimodal decoder whose last token
gives the contrastive text embedding, and whose states feed the multimodal decoder layers. Here the text
tower stays the bidirectional encoder the contrastive embedding (and the other objectives) use, and the
caption decoder is a separate multimodal decoder with its own token embedding: causal self-attention
over the caption prefix, cross-attention to the visual tokens. So adding captioning changes nothing of
the text tower, costs one small decoder pass per step, and the decoder needs only ``vision``.

With a visual mask (``masking.vision.ratio`` > 0, MAC) the decoder reads the visible tokens only, as the
contrastive embedding does; evaluation decodes from unmasked tokens (masks are drawn only in training).

Captions are tokenized as ``[CLS] words [SEP] [PAD]...`` (the tokenizer's template, right padding):
``[CLS]`` is the start token, ``[SEP]`` the end token. Teacher forcing feeds ``input_ids[:, :-1]`` and
predicts ``input_ids[:, 1:]``; targets at padding are ignored. Because padding only ever follows the
caption, causal attention alone keeps real positions from seeing it: no padding mask is needed.

Bilingual captions: the image does not say which language to caption in, so with
``language_prompt`` (the default) the decoder's start token gets a learned language embedding (the
caption's ``lang``: en, zh, or other), and evaluation decodes in each reference's language, as a user
would ask for a caption in Chinese. Without it a decoder trained on both languages mixes them.

``generate`` decodes captions for evaluation through ``vlp.models.decoding`` (greedy or beam search). It
recomputes the whole prefix at every step (no key/value cache): captions are a few dozen tokens and
the decoder a few layers, so that costs little next to the visual tower. Other decoders (an attentional
pooler over the visual tokens as in CoCa, a KV cache) would go here as options of this objective.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlp.batch import ATTENTION_MASK, INPUT_IDS, LANG
from vlp.config import ConfigError
from vlp.data.transforms import LANGUAGE_CODES
from vlp.models.decoding import beam_search, greedy_decode
from vlp.models.encoders import BERT_PRESETS
from vlp.models.masking import IGNORE_INDEX
from vlp.models.transformer import Stack, init_weights
from vlp.objectives.base import Objective, ObjectiveOutput, register_objective


@register_objective("captioning")
class CaptioningObjective(Objective):
    """Teacher-forced next-token cross-entropy of a caption decoder over the visual tokens.

    Metrics: ``token_accuracy``, the share of (non-padding) target tokens the decoder ranks first.
    """

    @dataclass(frozen=True)
    class Config:
        """Attributes:
            weight: CoCa weighs captioning 2 : contrastive 1.
            decoder_layers, decoder_heads: of the caption decoder (each layer: causal self-attention,
                cross-attention to the visual tokens, MLP).
            decoder_width: 0 for the text tower's width.
            decoder_mlp_ratio: MLP width over decoder width.
            label_smoothing: of the cross-entropy (0: plain).
            language_prompt: add a learned embedding of the caption's language to the start token.
        """

        weight: float = 2.0
        decoder_layers: int = 2
        decoder_heads: int = 4
        decoder_width: int = 0
        decoder_mlp_ratio: float = 4.0
        label_smoothing: float = 0.0
        language_prompt: bool = True

        def __post_init__(self):
            if self.decoder_layers < 1 or self.decoder_heads < 1 or self.decoder_width < 0:
                raise ConfigError("objectives.captioning: decoder_layers >= 1, decoder_heads >= 1, "
                                  "decoder_width >= 0 (0: the text tower's width)")
            if self.decoder_mlp_ratio <= 0:
                raise ConfigError("objectives.captioning.decoder_mlp_ratio must be > 0")
            if not 0.0 <= self.label_smoothing < 1.0:
                raise ConfigError("objectives.captioning.label_smoothing must be in [0, 1)")
            if self.decoder_width:
                _check_width(self.decoder_width, self.decoder_heads)

    needs = frozenset({"vision"})

    @classmethod
    def check(cls, cfg: Config, model, masking) -> None:
        if not cfg.decoder_width:  # the text tower's width, where its config says it
            width = _configured_text_width(model.text)
            if width is not None:
                _check_width(width, cfg.decoder_heads)

    def __init__(self, cfg: Config, *, model: nn.Module, **context: Any):
        super().__init__(cfg)
        width = cfg.decoder_width or model.text_encoder.width
        _check_width(width, cfg.decoder_heads)  # a pretrained tower's width is known only now
        self.width = width
        self.max_length = model.cfg.max_text_length
        self.token_embed = nn.Embedding(model.vocab_size, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.max_length, width))
        # Stack ends with the final LayerNorm
        self.decoder = Stack(width, cfg.decoder_layers, cfg.decoder_heads,
                             int(width * cfg.decoder_mlp_ratio), cross=True,
                             context_width=model.image_encoder.width)
        self.head = nn.Linear(width, model.vocab_size)
        self.lang_embed = (nn.Embedding(len(LANGUAGE_CODES) + 1, width)
                           if cfg.language_prompt else None)
        self.apply(init_weights)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    # ---- the decoder ----------------------------------------------------------------------------
    def logits(self, vision_tokens: torch.Tensor, input_ids: torch.Tensor,
               lang: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits ``(B, t, vocab)`` at every position of ``input_ids`` ``(B, t)``, each
        position seeing only itself and earlier tokens, plus all visual tokens ``(B, Lv, Dv)``;
        ``lang`` ``(B,)``: language codes (``LANGUAGE_CODES``; None: unspecified)."""
        length = input_ids.shape[1]
        if length > self.max_length:
            raise ConfigError(f"caption prefix of {length} tokens exceeds model.max_text_length "
                              f"{self.max_length}")
        x = self.token_embed(input_ids) + self.pos_embed[:, :length]
        if self.lang_embed is not None:
            if lang is None:
                lang = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
            prompt = torch.zeros_like(x)
            prompt[:, 0] = self.lang_embed(lang).to(x.dtype)
            x = x + prompt  # on the start token only
        return self.head(self.decoder(x, context=vision_tokens, causal=True))

    def next_token_logits(self, vision_tokens: torch.Tensor, prefix: torch.Tensor,
                          lang: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(N, vocab)`` of the token after each prefix ``(N, t)``, given visual tokens
        ``(N, Lv, Dv)`` (or ``VisionTokens``)."""
        return self.logits(_tokens(vision_tokens), prefix, lang)[:, -1]

    @torch.no_grad()
    def generate(self, vision_tokens: torch.Tensor, *, start_id: int, eos_id: int, max_length: int,
                 beam_size: int = 1, length_penalty: float = 0.0,
                 lang: torch.Tensor | None = None) -> torch.Tensor:
        """Captions for visual tokens ``(B, Lv, Dv)`` (or ``VisionTokens``), in languages ``lang``
        ``(B,)`` (codes; None: unspecified): greedy when ``beam_size`` is 1, else beam search
        (``length_penalty`` as in ``vlp.models.decoding``).

        Returns:
            ``(B, T)`` token ids, ``T <= max_length``: ``start_id``, the caption, ``eos_id`` (absent when
            a caption runs to ``max_length``), then ``eos_id`` padding. Call in eval mode.
        """
        if max_length > self.max_length:
            raise ConfigError(f"max_length {max_length} exceeds the decoder's positions "
                              f"(model.max_text_length {self.max_length})")
        tokens = _tokens(vision_tokens)
        start = torch.full((tokens.shape[0], 1), start_id, dtype=torch.long, device=tokens.device)
        if beam_size == 1:
            return greedy_decode(lambda prefix: self.logits(tokens, prefix, lang)[:, -1], start,
                                 eos_id, max_length)
        # beams of a sample are consecutive rows: repeat its visual tokens (and language) the same way
        beams = tokens.repeat_interleave(beam_size, dim=0)
        beam_lang = None if lang is None else lang.repeat_interleave(beam_size, dim=0)
        sequences, _ = beam_search(lambda prefix: self.logits(beams, prefix, beam_lang)[:, -1], start,
                                   eos_id, max_length, beam_size, length_penalty)
        return sequences

    # ---- the loss -------------------------------------------------------------------------------
    def forward(self, outputs: dict[str, Any], batch: dict[str, torch.Tensor],
                model: nn.Module | None = None) -> ObjectiveOutput:
        ids, attn = batch[INPUT_IDS], batch[ATTENTION_MASK]
        logits = self.logits(outputs["vision"].tokens, ids[:, :-1], batch.get(LANG))
        targets = ids[:, 1:].masked_fill(attn[:, 1:] == 0, IGNORE_INDEX)
        # float32: a softmax over the vocabulary in bf16 loses the small probabilities
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                               ignore_index=IGNORE_INDEX, label_smoothing=self.cfg.label_smoothing)
        with torch.no_grad():
            real = targets != IGNORE_INDEX
            correct = (logits.argmax(dim=-1) == targets) & real
            accuracy = correct.sum() / real.sum().clamp(min=1)
        return ObjectiveOutput(loss=loss, metrics={"token_accuracy": float(accuracy)})


def _check_width(width: int, heads: int) -> None:
    if width % heads:
        raise ConfigError(f"objectives.captioning: decoder width {width} is not a multiple of "
                          f"decoder_heads {heads}")


# Text towers sized by BERT_PRESETS (a preset, then a ``hidden_size`` option), by registered name.
_PRESET_SIZED_TEXT_TOWERS = ("bert", "transformer")


def _configured_text_width(text) -> int | None:
    """The width of the text tower an ``EncoderConfig`` describes, or None where only the built tower
    knows it (pretrained weights, a tower sized otherwise, a preset the tower will refuse)."""
    if (text.name not in _PRESET_SIZED_TEXT_TOWERS or text.pretrained_path
            or text.preset not in BERT_PRESETS):
        return None
    width = {**BERT_PRESETS[text.preset], **text.options}["hidden_size"]
    return width if isinstance(width, int) else None


def _tokens(vision) -> torch.Tensor:
    """A ``VisionTokens``' token tensor, or the tensor itself."""
    return vision.tokens if hasattr(vision, "tokens") else vision
