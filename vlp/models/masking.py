"""Masks for masked pretraining: visual patches and tubes, text tokens (random or significant words).

Pure tensor functions (no parameters), drawn on the training device with torch's generator so that a
re-run with the same RNG state draws the same masks (the feature cache step relies on that).

- ``tube_mask``: one spatial mask per sample shared by every frame (VideoMAE's tube masking), as the
  sorted indices of the *kept* patches; an image is a one-frame video, so this is also random patch
  masking for images. Every sample keeps the same number of patches, so visible tokens stack into one
  tensor and divided space-time attention (which needs the same patches in every frame) still works.
- ``mask_text``: BERT's recipe (of the chosen tokens 80% become [MASK], 10% a random token, 10% stay)
  at any ratio (15% as in BERT, 75% as in SimVTP), choosing either uniformly among the caption's
  tokens or, for SNP-S3's masked significant semantic modelling, significant-word tokens first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100  # cross_entropy's default ignore_index: labels of tokens that are not predicted


def kept_count(patches: int, ratio: float) -> int:
    """Patches kept of ``patches`` at mask ``ratio``: at least one, at most all."""
    return min(patches, max(1, round(patches * (1.0 - ratio))))


def tube_mask(batch: int, patches: int, ratio: float, *, device: torch.device | str = "cpu",
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices ``(batch, K)`` (sorted, int64) of the spatial patches each sample keeps.

    ``K = kept_count(patches, ratio)``; the same indices are kept in every frame (a tube).
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    noise = torch.rand(batch, patches, device=device, generator=generator)
    keep = noise.argsort(dim=1)[:, :kept_count(patches, ratio)]
    return keep.sort(dim=1).values


def keep_to_mask(keep: torch.Tensor, patches: int) -> torch.Tensor:
    """Kept indices ``(B, K)`` -> a boolean ``(B, patches)`` mask, True where a patch is *masked*."""
    masked = torch.ones(keep.shape[0], patches, dtype=torch.bool, device=keep.device)
    return masked.scatter(1, keep, False)


@dataclass
class MaskedText:
    """Text after masking. ``labels`` hold the original id where a token was chosen, else -100."""

    input_ids: torch.Tensor
    labels: torch.Tensor


def mask_text(input_ids: torch.Tensor, attention_mask: torch.Tensor, ratio: float, *,
              special_ids: torch.Tensor, mask_id: int, vocab_size: int,
              priority: torch.Tensor | None = None,
              generator: torch.Generator | None = None) -> MaskedText:
    """Choose ``ratio`` of each caption's maskable tokens (at least one) and corrupt them as BERT does.

    Args:
        input_ids, attention_mask: ``(B, L)``.
        ratio: share of maskable tokens (not padding, not special tokens) chosen per caption.
        special_ids: ids never chosen ([CLS], [SEP], [PAD], ...), a 1-D tensor.
        mask_id, vocab_size: the [MASK] id and the range of random replacement ids.
        priority: ``(B, L)``, nonzero for tokens chosen first (SNP-S3's significant words): those are
            taken, in random order, before any other token; the ratio still caps the count.
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"text mask ratio must be in (0, 1), got {ratio}")
    device = input_ids.device
    maskable = attention_mask.bool() & ~torch.isin(input_ids, special_ids.to(device))
    count = maskable.sum(dim=1)
    wanted = torch.where(count > 0, (count.float() * ratio).round().long().clamp(min=1), count)
    # Rank tokens by a random score; unmaskable ones last, priority ones first.
    score = torch.rand(input_ids.shape, device=device, generator=generator)
    if priority is not None:
        score = score + 1.0 * (priority.to(device) != 0)
    score = score.masked_fill(~maskable, -1.0)
    order = score.argsort(dim=1, descending=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(
        input_ids.shape[1], device=device).expand_as(order))
    chosen = (rank < wanted[:, None]) & maskable
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    roll = torch.rand(input_ids.shape, device=device, generator=generator)
    random_ids = torch.randint(0, vocab_size, input_ids.shape, device=device, generator=generator)
    corrupted = torch.where(roll < 0.8, torch.full_like(input_ids, mask_id),
                            torch.where(roll < 0.9, random_ids, input_ids))
    return MaskedText(torch.where(chosen, corrupted, input_ids), labels)
