"""The dual encoder: two towers, linear projections, L2 normalisation, a learnable temperature.

``forward(batch)`` returns everything the objectives need in one pass (so one DDP forward covers every
parameter): normalised image and text embeddings, the exponentiated logit scale (clamped at
``max_logit_scale``, as in CLIP, so the temperature cannot collapse) and, for SigLIP, the logit bias.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlp.models.config import DualEncoderConfig
from vlp.models.encoders import IMAGE_ENCODERS, TEXT_ENCODERS, build_encoder


class DualEncoder(nn.Module):
    def __init__(self, cfg: DualEncoderConfig, *, vocab_size: int, pad_token_id: int = 0):
        super().__init__()
        self.cfg = cfg
        self.image_encoder = build_encoder(IMAGE_ENCODERS, cfg.image, image_size=cfg.image_size,
                                           num_frames=cfg.num_frames)
        self.text_encoder = build_encoder(TEXT_ENCODERS, cfg.text, vocab_size=vocab_size,
                                          pad_token_id=pad_token_id,
                                          max_text_length=cfg.max_text_length)
        self.image_proj = nn.Linear(self.image_encoder.width, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(self.text_encoder.width, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))
        self.logit_bias = (nn.Parameter(torch.tensor(float(cfg.init_logit_bias)))
                           if cfg.init_logit_bias is not None else None)

    def train(self, mode: bool = True):
        super().train(mode)
        # a locked tower keeps eval behaviour (no dropout) while the rest trains
        for tower, tower_cfg in ((self.image_encoder, self.cfg.image), (self.text_encoder, self.cfg.text)):
            if tower_cfg.locked:
                tower.eval()
        return self

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Unit embeddings of images ``(B, 3, H, W)`` or videos ``(B, T, 3, H, W)``."""
        return F.normalize(self.image_proj(self.image_encoder(pixels)), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(self.text_encoder(input_ids, attention_mask)), dim=-1)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=self.cfg.max_logit_scale)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {
            "image_embeds": self.encode_image(batch["pixels"]),
            "text_embeds": self.encode_text(batch["input_ids"], batch["attention_mask"]),
            "logit_scale": self.scale(),
        }
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out
