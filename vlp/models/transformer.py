"""Transformer building blocks shared by the towers and heads we write ourselves.

``Block`` is a pre-norm transformer layer: self-attention (optionally causal, optionally with a key
padding mask), an optional cross-attention to a context (the other modality's tokens), and an MLP. Our
text tower, the fusion encoder, the MAE decoder and the caption decoder are stacks of it; the video
tower's joint block is a ``Block`` and its divided space-time block is made of the same ``Attention``
and ``MLP`` (``video.py``). ``init_weights`` initialises all of them. Attention runs through
``scaled_dot_product_attention`` (fused kernels where the device has them).

This is the one attention implementation of the library: a new kind of layer is composed from these
parts (a subclass of ``Block``, or a module of ``Attention`` and ``MLP`` wired differently) in the module
of the model that needs it, and a change to how attention is computed goes here.

Masks follow one convention everywhere: ``pad`` masks are ``(B, L)`` with True (or 1) for a real token
and False (0) for padding, as tokenizers return ``attention_mask``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _attention_bias(valid: torch.Tensor | None, queries: int, dtype: torch.dtype) -> torch.Tensor | None:
    """``(B, Lk)`` validity -> an additive ``(B, 1, Lq, Lk)`` mask (0 where attended, -inf-ish not)."""
    if valid is None:
        return None
    blocked = ~valid.bool()
    bias = torch.zeros(blocked.shape, dtype=dtype, device=valid.device)
    bias = bias.masked_fill(blocked, torch.finfo(dtype).min)
    return bias[:, None, None, :].expand(-1, 1, queries, -1)


class Attention(nn.Module):
    """Multi-head attention of ``x`` over itself (``context=None``) or over ``context``."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0, context_width: int | None = None):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(context_width or width, 2 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                valid: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        b, length, width = x.shape
        source = x if context is None else context
        head = width // self.heads
        q = self.q(x).view(b, length, self.heads, head).transpose(1, 2)
        k, v = self.kv(source).view(b, source.shape[1], 2, self.heads, head).permute(2, 0, 3, 1, 4)
        bias = _attention_bias(valid, length, q.dtype)
        if causal and bias is not None:
            future = torch.ones(length, source.shape[1], dtype=torch.bool, device=x.device).triu(1)
            bias = bias.masked_fill(future, torch.finfo(q.dtype).min)
            causal = False
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=causal,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(b, length, width))


class MLP(nn.Sequential):
    def __init__(self, width: int, hidden: int, dropout: float = 0.0):
        super().__init__(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width),
                         nn.Dropout(dropout))


class Block(nn.Module):
    """Pre-norm layer: self-attention, then (when built with ``cross``) cross-attention, then MLP.

    A block built with cross-attention can still run without a context (``context=None``): the cross
    step is skipped. That is how SNP-S3's shared network uses one stack for text alone and for text
    attending to video.
    """

    def __init__(self, width: int, heads: int, mlp_width: int, dropout: float = 0.0, *,
                 cross: bool = False, context_width: int | None = None, eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads, dropout)
        self.cross_norm = nn.LayerNorm(width, eps=eps) if cross else None
        self.cross_attn = Attention(width, heads, dropout, context_width) if cross else None
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = MLP(width, mlp_width, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None, *,
                context: torch.Tensor | None = None, context_valid: torch.Tensor | None = None,
                causal: bool = False) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), valid=valid, causal=causal))
        if context is not None:
            if self.cross_attn is None:
                raise ValueError("this block was built without cross-attention")
            x = x + self.drop(self.cross_attn(self.cross_norm(x), context, valid=context_valid))
        return x + self.mlp(self.norm2(x))


def init_weights(module: nn.Module) -> None:
    """ViT/BERT initialisation: truncated normal (std 0.02) weights, zero biases, unit LayerNorms.

    For ``model.apply(init_weights)``: every tower and head we write is initialised by it, and then
    sets its own position tables and special tokens.
    """
    if isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv3d)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.trunc_normal_(module.weight, std=0.02)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class Stack(nn.Module):
    """``layers`` blocks of one width, a final LayerNorm; the common body of our encoders and heads."""

    def __init__(self, width: int, layers: int, heads: int, mlp_width: int, dropout: float = 0.0, *,
                 cross: bool = False, context_width: int | None = None):
        super().__init__()
        self.width = width
        self.blocks = nn.ModuleList(
            Block(width, heads, mlp_width, dropout, cross=cross, context_width=context_width)
            for _ in range(layers))
        self.norm = nn.LayerNorm(width, eps=1e-6)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None, *,
                context: torch.Tensor | None = None, context_valid: torch.Tensor | None = None,
                causal: bool = False) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, valid, context=context, context_valid=context_valid, causal=causal)
        return self.norm(x)
