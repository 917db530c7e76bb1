"""Video-text / image-text matching (ITM, VTM; ALBEF, BLIP) with negatives mined across ranks.

Each rank scores 3B pairs with the fusion encoder (``model.fuse``: cross, joint or SNP-S3's shared
network) and a 2-way head on the fused text [CLS]: its B positive pairs (video i, caption i), for each
video a negative caption (video i, caption n_t(i)) and for each caption a negative video (video
n_v(i), caption i). The loss is the cross-entropy over those pairs (match / no match).

Negatives are mined from the contrastive similarities (``image_embeds``, ``text_embeds``), read
without gradient:

- ``hard`` (ALBEF): sampled with probability ``softmax(logit_scale * similarity)`` over the candidates;
- ``hardest``: the most similar candidate;
- ``random``: uniform over the candidates.

A candidate is any sample of the job's batch (``gather: true``) or of this rank's (``gather: false``)
whose caption is not token-for-token the positive's (the positive itself included): an identical
caption describes the video as well as its own, so it is no negative. A row with no candidate left
(a batch of one, or every caption the same) keeps its positive pair and drops that negative pair from
the loss.

Gradients and traffic (``gather: true``). Every rank's contrastive embeddings, input ids and masks,
visual tokens and, unless the text tower is the fusion encoder, text token states are all-gathered
once (``vlp.distributed.collectives.gather_with_grad`` under ``no_grad``; shapes must match across
ranks, which the fixed-length caption padding and the equal per-rank batch give). The gathered copies
carry no gradient: a negative taken from another rank trains this rank's fusion encoder and head, but
its encoders' share of the gradient is dropped. Keeping it (as BLIP's gathered image embeddings do)
would send the whole gathered token tensor back in the backward (a reduce-scatter as large as the
gather) for the 2B of N rows used; we do not pay that. Negatives drawn from this rank's own samples
use the local tensors, so they do carry gradients to the local encoders. Bytes are counted in the
returned ``CommCounter`` (forward only: nothing is sent in backward).

The mining reads the contrastive embeddings and the temperature detached; so that a run with
matching alone still gives the projections, the temperature (and SigLIP's bias) a gradient, which DDP
needs, the loss adds them multiplied by zero. Matching is normally run with ``contrastive`` (ALBEF,
BLIP), which trains them.

A new way to choose negatives is a branch of :func:`mine_negatives` plus its name in ``negatives``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vlp.batch import ATTENTION_MASK, INPUT_IDS
from vlp.distributed.collectives import CommCounter, gather_with_grad, group_rank, world_size
from vlp.objectives.base import Objective, ObjectiveOutput, register_objective


def mine_negatives(similarity: torch.Tensor, allowed: torch.Tensor, how: str,
                   scale: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One negative per row of ``similarity``.

    Args:
        similarity: ``(B, N)`` similarities of each query to the N candidates.
        allowed: ``(B, N)`` bool, True where a candidate may be the row's negative.
        how: ``hard`` (sample by ``softmax(scale * similarity)`` over the allowed candidates),
            ``hardest`` (the allowed argmax) or ``random`` (uniform over the allowed ones).
        scale: the contrastive logit scale (1 / temperature), for ``hard``.

    Returns:
        ``(index, valid)``: ``(B,)`` candidate indices and ``(B,)`` bool, False for rows with no
        allowed candidate (their index is meaningless and must be ignored).
    """
    valid = allowed.any(dim=1)
    if how == "hardest":
        return similarity.masked_fill(~allowed, float("-inf")).argmax(dim=1), valid
    if how == "hard":
        weights = (similarity.float() * scale).masked_fill(~allowed, float("-inf")).softmax(dim=1)
    elif how == "random":
        weights = allowed.float()
    else:
        raise ValueError(f"unknown negative mining {how!r} (hard, hardest, random)")
    # rows with nothing allowed (NaN or all-zero weights) draw anything; ``valid`` drops them
    weights = torch.where(valid[:, None], weights, torch.ones_like(weights))
    return torch.multinomial(weights, 1).squeeze(1), valid


def similarity_rank(similarity: torch.Tensor, allowed: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``(B,)`` how many allowed candidates are more similar than the chosen one (0: the hardest)."""
    chosen = similarity.gather(1, index[:, None])
    return ((similarity > chosen) & allowed).sum(dim=1)


def caption_keys(input_ids: torch.Tensor) -> torch.Tensor:
    """``(B,)`` int64 keys, equal for token-for-token identical captions: a random linear hash that
    wraps around in int64 (exact and order-free, so equal rows always get equal keys; a collision of
    different captions, about 2^-64 per pair, only drops one candidate). Comparing keys costs B x N
    instead of the B x N x L of comparing the ids."""
    weights = torch.randint(1, 2 ** 62, (input_ids.shape[1],), generator=torch.Generator().manual_seed(0))
    return (input_ids.long() * weights.to(input_ids.device)).sum(dim=1)


def _gather_no_grad(tensor: torch.Tensor, counter: CommCounter) -> torch.Tensor:
    with torch.no_grad():
        return gather_with_grad(tensor.detach(), counter=counter)


def _pick(local: torch.Tensor, gathered: torch.Tensor | None, index: torch.Tensor,
          offset: int) -> torch.Tensor:
    """Rows ``index`` of the job's batch: from ``local`` (with its gradient) where they are this
    rank's rows ``[offset, offset + B)``, else from the no-grad ``gathered`` copy."""
    b = local.shape[0]
    from_local = local[(index - offset).clamp(0, b - 1)]
    if gathered is None:
        return from_local
    mine = ((index >= offset) & (index < offset + b)).view(-1, *([1] * (local.dim() - 1)))
    return torch.where(mine, from_local, gathered[index].to(local.dtype))


@register_objective("matching")
class MatchingObjective(Objective):
    """Matching head and loss; see the module docstring for the negatives and the traffic."""

    @dataclass(frozen=True)
    class Config:
        weight: float = 1.0
        negatives: Literal["hard", "hardest", "random"] = "hard"
        gather: bool = True  # candidates from every rank's batch (else this rank's only)

    needs = frozenset({"vision", "text_hidden"})
    uses_fusion = True

    def __init__(self, cfg: Config, *, model: nn.Module, **context):
        super().__init__(cfg)
        self.head = nn.Linear(model.fusion_width, 2)

    def forward(self, outputs, batch, model=None) -> ObjectiveOutput:
        vision, hidden = outputs["vision"].tokens, outputs["text_hidden"]
        ids, attn = batch[INPUT_IDS], batch[ATTENTION_MASK]
        b = ids.shape[0]
        shared = model.cfg.fusion.share_text_encoder  # the shared network re-reads the ids itself
        counter = CommCounter()
        gather = self.cfg.gather and world_size() > 1
        offset = group_rank() * b if gather else 0

        # ---- candidates and mining (no gradient) ----
        embeds = torch.cat([outputs["image_embeds"], outputs["text_embeds"]], dim=1).detach().float()
        texts = torch.stack([ids, attn.to(ids.dtype)], dim=1)
        if gather:
            all_embeds, all_texts = _gather_no_grad(embeds, counter), _gather_no_grad(texts, counter)
        else:
            all_embeds, all_texts = embeds, texts
        dim = outputs["image_embeds"].shape[1]
        all_ids, all_attn = all_texts[:, 0], all_texts[:, 1].to(attn.dtype)
        with torch.no_grad():
            sim_i2t = embeds[:, :dim] @ all_embeds[:, dim:].T  # (B, N): my videos x all captions
            sim_t2i = embeds[:, dim:] @ all_embeds[:, :dim].T  # my captions x all videos
            same = caption_keys(ids)[:, None] == caption_keys(all_ids)[None, :]
            same[torch.arange(b, device=ids.device), offset + torch.arange(b, device=ids.device)] = True
            allowed = ~same  # symmetric: a video whose caption is mine is a positive for my caption
            scale = outputs["logit_scale"].detach().float()
            neg_text, valid_text = mine_negatives(sim_i2t, allowed, self.cfg.negatives, scale)
            neg_video, valid_video = mine_negatives(sim_t2i, allowed, self.cfg.negatives, scale)

        # ---- the 3B pairs: positives, (video, negative caption), (negative video, caption) ----
        all_vision = _gather_no_grad(vision, counter) if gather else None
        fuse_vision = torch.cat([vision, vision, _pick(vision, all_vision, neg_video, offset)])
        fuse_ids = torch.cat([ids, all_ids[neg_text], ids])
        fuse_attn = torch.cat([attn, all_attn[neg_text], attn])
        fuse_hidden = None
        if not shared:
            all_hidden = _gather_no_grad(hidden, counter) if gather else None
            fuse_hidden = torch.cat([hidden, _pick(hidden, all_hidden, neg_text, offset), hidden])
        fused = model.fuse(fuse_vision, fuse_ids, fuse_attn, text_hidden=fuse_hidden)
        logits = self.head(fused.text[:, 0]).float()

        labels = torch.cat([torch.ones(b, dtype=torch.long, device=ids.device),
                            torch.zeros(2 * b, dtype=torch.long, device=ids.device)])
        counted = torch.cat([torch.ones_like(valid_text), valid_text, valid_video]).float()
        per_pair = F.cross_entropy(logits, labels, reduction="none")
        loss = (per_pair * counted).sum() / counted.sum()
        untouched = outputs["image_embeds"].sum() + outputs["text_embeds"].sum() + outputs["logit_scale"]
        if outputs.get("logit_bias") is not None:
            untouched = untouched + outputs["logit_bias"]
        loss = loss + 0.0 * untouched

        with torch.no_grad():
            accuracy = ((logits.argmax(dim=1) == labels).float() * counted).sum() / counted.sum()
            ranks = torch.cat([similarity_rank(sim_i2t, allowed, neg_text),
                               similarity_rank(sim_t2i, allowed, neg_video)]).float()
            rank = (ranks * counted[b:]).sum() / counted[b:].sum().clamp(min=1)
            numbers = torch.stack([accuracy, rank, counted[b:].mean()]).tolist()
        metrics = {"accuracy": numbers[0], "negative_rank": numbers[1], "negatives_found": numbers[2],
                   "candidates": float(all_ids.shape[0])}
        return ObjectiveOutput(loss=loss, metrics=metrics, comm=counter)
