"""Masked language modelling: predict the masked words of the caption, with the video's help or not.

``conditioned: true`` (the default) reads the fusion encoder's text states of the masked caption
(``fused_masked``), so the visual tokens help fill the blanks: SimVTP's unified encoder
(``model.fusion.mode: joint``), ALBEF's and LAVENDER's cross-attention fusion (``mode: cross``),
SNP-S3's shared network (``model.fusion.share_text_encoder``). ``conditioned: false`` reads the text
tower alone (``masked_text_hidden``): BERT's MLM, no fusion encoder needed.

Which tokens are masked, and how many, is the pretraining module's business (``masking.text``:
``ratio`` 0.15 as in BERT, 0.75 as in SimVTP; ``strategy: significant`` for SNP-S3's masked
significant semantic modelling); this objective only scores the predictions at the chosen positions
(``MaskedText.labels``, -100 elsewhere). Its head also serves evaluation by filling masks
(``vlp.eval.video_qa``) through ``logits``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlp.models.masking import IGNORE_INDEX
from vlp.models.transformer import init_weights
from vlp.objectives.base import Objective, ObjectiveOutput, register_objective


class MLMHead(nn.Sequential):
    """BERT's prediction head: transform (Linear, GELU, LayerNorm), then scores over the vocabulary."""

    def __init__(self, width: int, vocab_size: int):
        super().__init__(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width, eps=1e-6),
                         nn.Linear(width, vocab_size))
        self.apply(init_weights)


@register_objective("mlm")
class MaskedLanguageModelling(Objective):
    @dataclass(frozen=True)
    class Config:
        weight: float = 1.0
        # True: predict from the fusion encoder's text output (the video helps); False: from the
        # text tower alone (BERT).
        conditioned: bool = True

    @classmethod
    def requirements(cls, cfg: Config) -> tuple[frozenset[str], bool]:
        if cfg.conditioned:
            return frozenset({"fused_masked"}), True
        return frozenset({"masked_text_hidden"}), False

    def __init__(self, cfg: Config, *, model: nn.Module, **context):
        super().__init__(cfg)
        width = model.fusion_width if cfg.conditioned else model.text_encoder.width
        self.head = MLMHead(width, model.vocab_size)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores over the vocabulary ``(..., vocab)`` of token states ``(..., width)``."""
        return self.head(hidden)

    def hidden(self, outputs: dict) -> torch.Tensor:
        """The token states this objective predicts from, ``(B, L, width)``."""
        return outputs["fused_masked"].text if self.cfg.conditioned else outputs["masked_text_hidden"]

    def forward(self, outputs: dict, batch: dict[str, torch.Tensor], model=None) -> ObjectiveOutput:
        labels = outputs["masked_text"].labels
        chosen = labels != IGNORE_INDEX
        # Only the masked positions go through the vocabulary projection: scoring every token would
        # cost (B, L, vocab) activations to throw most of them away (85% at BERT's ratio).
        logits = self.logits(self.hidden(outputs)[chosen]).float()
        target = labels[chosen]
        if target.numel() == 0:
            # nothing masked (every caption empty): a zero that still reaches every parameter, so
            # DDP sees the same parameters used on every rank
            return ObjectiveOutput(loss=logits.sum() * 0.0, metrics={"accuracy": 0.0})
        loss = F.cross_entropy(logits, target)
        accuracy = (logits.detach().argmax(dim=-1) == target).float().mean()
        return ObjectiveOutput(loss=loss, metrics={"accuracy": float(accuracy)})
