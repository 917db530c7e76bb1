"""The fusion encoder: text and visual tokens read together (see ``FusionConfig`` for the modes).

- ``cross`` (ALBEF, BLIP's ITM encoder): the text tower's token states, then layers whose text tokens
  attend to themselves and to the visual tokens. Out comes text only.
- ``joint`` (SimVTP's unified encoder, ViLT-style): visual and text tokens, each with a type embedding,
  go through one self-attention stack together; both come out, so visible video tokens can help
  rebuild masked words and visible words masked video.
- shared (SNP-S3): no layers here; the model runs its text tower with cross-attention switched on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vlp.models.config import FusionConfig
from vlp.models.transformer import Stack, init_weights


@dataclass
class FusedTokens:
    """``text`` ``(B, L, W)``; ``vision`` ``(B, Lv, W)`` in joint mode, else None."""

    text: torch.Tensor
    vision: torch.Tensor | None = None


class FusionEncoder(nn.Module):
    def __init__(self, cfg: FusionConfig, *, text_width: int, vision_width: int):
        super().__init__()
        self.mode = cfg.mode
        self.width = text_width
        joint = cfg.mode == "joint"
        self.stack = Stack(text_width, cfg.layers, cfg.heads, int(text_width * cfg.mlp_ratio),
                           cfg.dropout, cross=not joint, context_width=vision_width)
        self.vision_in = nn.Linear(vision_width, text_width) if joint else None
        self.type_embed = nn.Parameter(torch.zeros(2, text_width)) if joint else None
        self.apply(init_weights)

    def forward(self, text_hidden: torch.Tensor, attention_mask: torch.Tensor,
                vision_tokens: torch.Tensor) -> FusedTokens:
        if self.mode == "cross":
            return FusedTokens(self.stack(text_hidden, attention_mask, context=vision_tokens))
        vision = self.vision_in(vision_tokens) + self.type_embed[0]
        text = text_hidden + self.type_embed[1]
        valid = torch.cat([torch.ones(vision.shape[:2], dtype=torch.bool, device=vision.device),
                           attention_mask.bool()], dim=1)
        out = self.stack(torch.cat([vision, text], dim=1), valid)
        return FusedTokens(out[:, vision.shape[1]:], out[:, :vision.shape[1]])
