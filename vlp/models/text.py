"""Our own text tower: a BERT-sized transformer whose layers can also attend to video.

``transformer`` is the text encoder to pick for SNP-S3's shared network: built with cross-attention in
every layer (``cross=True``, which the model does when ``model.fusion.share_text_encoder`` is set), the
same weights encode text alone (the cross step is skipped) and text attending to visual tokens (the
fusion encoder), so no third network is needed. Otherwise it is a plain bidirectional encoder sized by
``BERT_PRESETS``; ``options`` may set ``dropout``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlp.config import ConfigError
from vlp.models.config import EncoderConfig
from vlp.models.encoders import BERT_PRESETS, TEXT_ENCODERS, check_pooling, pool_tokens
from vlp.models.transformer import Stack, init_weights

_OPTIONS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "dropout")


@TEXT_ENCODERS.register("transformer")
class TextTransformer(nn.Module):
    poolings = ("cls", "mean")

    def __init__(self, cfg: EncoderConfig, *, vocab_size: int, pad_token_id: int,
                 max_text_length: int, cross_width: int | None = None, **_: Any):
        super().__init__()
        check_pooling(type(self), cfg)
        if cfg.pretrained_path:
            raise ConfigError("text encoder 'transformer' has no pretrained weights to load")
        if cfg.preset not in BERT_PRESETS:
            raise ConfigError(f"unknown preset {cfg.preset!r} for encoder 'transformer'; presets: "
                              f"{', '.join(BERT_PRESETS)}")
        unknown = sorted(set(cfg.options) - set(_OPTIONS))
        if unknown:
            raise ConfigError(f"encoder 'transformer': unknown option {unknown[0]!r} (options are: "
                              f"{', '.join(_OPTIONS)})")
        s = {**BERT_PRESETS[cfg.preset], "dropout": 0.0, **cfg.options}
        self.width = int(s["hidden_size"])
        self.pooling = cfg.pooling
        self.pad_token_id = pad_token_id
        self.token_embed = nn.Embedding(vocab_size, self.width, padding_idx=pad_token_id)
        self.pos_embed = nn.Parameter(torch.zeros(1, max_text_length, self.width))
        self.embed_norm = nn.LayerNorm(self.width, eps=1e-6)
        self.stack = Stack(self.width, int(s["num_hidden_layers"]), int(s["num_attention_heads"]),
                           int(s["intermediate_size"]), float(s["dropout"]),
                           cross=cross_width is not None, context_width=cross_width)
        self.apply(init_weights)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def encode_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                      context: torch.Tensor | None = None,
                      context_valid: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, L, width)`` token states; with ``context`` (visual tokens) every layer also attends
        to it (only when built with cross-attention)."""
        length = input_ids.shape[1]
        if length > self.pos_embed.shape[1]:
            raise ConfigError(f"text of {length} tokens exceeds model.max_text_length "
                              f"{self.pos_embed.shape[1]}")
        x = self.embed_norm(self.token_embed(input_ids) + self.pos_embed[:, :length])
        return self.stack(x, attention_mask, context=context, context_valid=context_valid)

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return pool_tokens(hidden, attention_mask, self.pooling)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.pool(self.encode_tokens(input_ids, attention_mask), attention_mask)
