"""The dual encoder: two towers, linear projections, L2 normalisation, a learnable temperature, and
optionally a fusion encoder that reads both modalities (``model.fusion``).

Built with ``model.pretrained`` (a whole Hugging Face dual encoder), it loads that model's weights
(``hf_dual.load_hf_weights``); its projections are identities where that model has none (SigLIP).
Pixels arrive normalised as the caller says (``input_pixel_norm``); where that is not how the visual
tower was trained (``cfg.pixel_mean``/``pixel_std``), they are converted on the way in.

``forward(batch)`` returns the contrastive outputs: normalised image and text embeddings, the
exponentiated logit scale (clamped at ``max_logit_scale``, as in CLIP, so the temperature cannot
collapse) and, for SigLIP, the logit bias. The token-level methods (``encode_vision_tokens``,
``encode_text_tokens``, ``fuse``) serve the masked, matching and generative objectives; the
pretraining module (``vlp.objectives.pretraining``) calls them in one pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlp.batch import ATTENTION_MASK, INPUT_IDS, PIXELS
from vlp.models.config import DualEncoderConfig
from vlp.config import ConfigError
from vlp.models.encoders import IMAGE_ENCODERS, TEXT_ENCODERS, build_encoder
from vlp.models.fusion import FusedTokens, FusionEncoder
from vlp.models.hf_dual import load_hf_weights


class DualEncoder(nn.Module):
    """Args:
        vision_mask_token: build the visual tower's learned mask token (needed only to encode masked
            patches as mask tokens rather than dropping them).
        input_pixel_norm: ``(mean, std)`` (for pixels in [0, 1]) that the callers normalise pixels
            with; None: the visual tower's own. Training and ``vlp eval`` feed the project's
            ``pixels_to_model`` output and say so; a tower trained with other statistics
            (``cfg.pixel_mean``/``pixel_std``, e.g. SigLIP's 0.5) then gets its own, converted exactly
            per channel. ``LoadedDualEncoder.preprocess`` of a Hugging Face folder normalises as the
            tower does, so its model is built without it.
    """

    def __init__(self, cfg: DualEncoderConfig, *, vocab_size: int, pad_token_id: int = 0,
                 vision_mask_token: bool = False,
                 input_pixel_norm: tuple[Sequence[float], Sequence[float]] | None = None):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        vision_context = {"mask_token": True} if vision_mask_token else {}
        self.image_encoder = build_encoder(IMAGE_ENCODERS, cfg.image, image_size=cfg.image_size,
                                           num_frames=cfg.num_frames, **vision_context)
        shared = cfg.fusion.share_text_encoder
        self.text_encoder = build_encoder(TEXT_ENCODERS, cfg.text, vocab_size=vocab_size,
                                          pad_token_id=pad_token_id,
                                          max_text_length=cfg.max_text_length,
                                          cross_width=self.image_encoder.width if shared else None)
        self.fusion = (FusionEncoder(cfg.fusion, text_width=self.text_encoder.width,
                                     vision_width=self.image_encoder.width)
                       if cfg.fusion.layers > 0 else None)
        if cfg.projection == "none":
            widths = (self.image_encoder.width, self.text_encoder.width)
            if widths != (cfg.embed_dim, cfg.embed_dim):
                raise ConfigError(f"model.projection none needs both towers as wide as model.embed_dim "
                                  f"{cfg.embed_dim}; they are {widths[0]} and {widths[1]}")
            self.image_proj, self.text_proj = nn.Identity(), nn.Identity()
        else:
            self.image_proj = nn.Linear(self.image_encoder.width, cfg.embed_dim, bias=False)
            self.text_proj = nn.Linear(self.text_encoder.width, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))
        self.logit_bias = (nn.Parameter(torch.tensor(float(cfg.init_logit_bias)))
                           if cfg.init_logit_bias is not None else None)
        self._pixel_conversion(input_pixel_norm)
        if cfg.pretrained:
            load_hf_weights(self, cfg.pretrained)

    def _pixel_conversion(self, fed: tuple[Sequence[float], Sequence[float]] | None) -> None:
        """``pixel_scale``/``pixel_shift`` buffers (not saved) mapping the fed normalisation to the
        tower's: ``(p - m_in) / s_in`` becomes ``(p - m) / s``; None where they agree."""
        own = (self.cfg.pixel_mean, self.cfg.pixel_std)
        scale = shift = None
        if fed is not None and own[0] is not None:
            m_in, s_in = (torch.tensor(v, dtype=torch.float64) for v in fed)
            m, s = (torch.tensor(v, dtype=torch.float64) for v in own)
            if not (torch.equal(m_in, m) and torch.equal(s_in, s)):
                scale = (s_in / s).float().view(3, 1, 1)
                shift = ((m_in - m) / s).float().view(3, 1, 1)
        self.register_buffer("pixel_scale", scale, persistent=False)
        self.register_buffer("pixel_shift", shift, persistent=False)

    def _tower_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.pixel_scale is None:
            return pixels
        return pixels * self.pixel_scale.to(pixels.dtype) + self.pixel_shift.to(pixels.dtype)

    def train(self, mode: bool = True):
        super().train(mode)
        # a locked tower keeps eval behaviour (no dropout) while the rest trains
        for tower, tower_cfg in ((self.image_encoder, self.cfg.image), (self.text_encoder, self.cfg.text)):
            if tower_cfg.locked:
                tower.eval()
        return self

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Unit embeddings of images ``(B, 3, H, W)`` or videos ``(B, T, 3, H, W)``."""
        return F.normalize(self.image_proj(self.image_encoder(self._tower_pixels(pixels))), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(self.text_encoder(input_ids, attention_mask)), dim=-1)

    # ---- token level (masked, matching and generative objectives) -------------------------------
    def encode_vision_tokens(self, pixels: torch.Tensor, keep: torch.Tensor | None = None,
                             mask_tokens: bool = False):
        """The visual tower's ``VisionTokens`` (``keep``: a tube mask's kept patches)."""
        if not hasattr(self.image_encoder, "encode_tokens"):
            raise ConfigError(f"image encoder {self.cfg.image.name!r} gives no tokens")
        return self.image_encoder.encode_tokens(self._tower_pixels(pixels), keep, mask_tokens)

    def embed_vision(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(pooled), dim=-1)

    def encode_text_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.text_encoder.encode_tokens(input_ids, attention_mask)

    def embed_text(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(self.text_encoder.pool(hidden, attention_mask)), dim=-1)

    @property
    def fusion_width(self) -> int:
        return self.text_encoder.width

    def fuse(self, vision_tokens: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
             text_hidden: torch.Tensor | None = None) -> FusedTokens:
        """Text read with the visual tokens ``(B, Lv, Dv)``. ``text_hidden`` (the text tower's states
        of ``input_ids``) saves re-encoding when the caller has it; the shared network ignores it."""
        if self.cfg.fusion.share_text_encoder:
            return FusedTokens(self.text_encoder.encode_tokens(input_ids, attention_mask,
                                                               context=vision_tokens))
        if self.fusion is None:
            raise ConfigError("this objective needs a fusion encoder: set model.fusion.layers (or "
                              "model.fusion.share_text_encoder)")
        if text_hidden is None:
            text_hidden = self.encode_text_tokens(input_ids, attention_mask)
        return self.fusion(text_hidden, attention_mask, vision_tokens)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=self.cfg.max_logit_scale)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {
            "image_embeds": self.encode_image(batch[PIXELS]),
            "text_embeds": self.encode_text(batch[INPUT_IDS], batch[ATTENTION_MASK]),
            "logit_scale": self.scale(),
        }
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out
