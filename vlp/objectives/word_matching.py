"""SNP-S3's local vision-word matching: each video against the significant words of each caption.

For caption j, its first ``words_per_caption`` significant words (tokens with ``significant == k``,
k = 1..K; a word's state is the mean of its tokens' states) are projected with the text projection
and L2-normalised, so they live in the contrastive space. Video i (``image_embeds``) scores caption j
by ``S_ij = logsumexp_k(logit_scale * cos(v_i, w_jk))`` over the caption's words, and MIL-NCE treats
the words of its own caption as the positive bag:

    video -> text:  loss_i = -log( sum_k exp(s_iik) / sum_j sum_k exp(s_ijk) ) = lse_j S_ij - S_ii

``symmetric`` (the default) averages it with the text -> video direction, defined on the same bag
scores: caption j against every video, ``loss_j = lse_i S_ij - S_jj`` (its bag must beat its bag
against the other videos), as CLIP averages its two directions.

A caption with no significant word has no words (they are masked out, not scored) and no positive
term in either direction; the mean runs over the captions that have one. A batch with none at all
gives a zero loss that is still a function of every parameter (the masked terms times zero), so DDP
sees every gradient.

Local batch only: the words of other ranks are not gathered (each rank's loss uses its own B videos
and B captions as the negatives), which keeps this objective free of communication.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlp.batch import ATTENTION_MASK, SIGNIFICANT
from vlp.config import ConfigError
from vlp.objectives.base import Objective, ObjectiveOutput, register_objective


def significant_word_states(hidden: torch.Tensor, significant: torch.Tensor,
                            attention_mask: torch.Tensor, words: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean token state of each caption's significant words 1..``words``.

    Args:
        hidden: ``(B, L, D)`` token states.
        significant: ``(B, L)``: 0, or the 1-based index of the significant word the token belongs to.
        attention_mask: ``(B, L)``; padding never counts.

    Returns:
        ``(states, present)``: ``(B, words, D)`` (zeros for a missing word) and ``(B, words)`` bool.
    """
    k = torch.arange(1, words + 1, device=significant.device)
    member = (significant[:, :, None] == k) & attention_mask.bool()[:, :, None]  # (B, L, K)
    member = member.to(hidden.dtype)
    counts = member.sum(dim=1)  # (B, K)
    states = torch.einsum("blk,bld->bkd", member, hidden) / counts.clamp(min=1)[:, :, None]
    return states, counts > 0


def mil_nce_loss(videos: torch.Tensor, words: torch.Tensor, present: torch.Tensor,
                 logit_scale: torch.Tensor, symmetric: bool = True) -> tuple[torch.Tensor, dict]:
    """MIL-NCE over bags of words (see the module docstring for the formula).

    Args:
        videos: ``(B, E)`` unit embeddings.
        words: ``(B, K, E)`` unit word embeddings of each caption.
        present: ``(B, K)`` bool, which words exist.
        logit_scale: the contrastive scale (1 / temperature).

    Returns:
        The loss and detached tensors ``accuracy`` (video -> caption argmax of the bag scores over
        captions with words) and ``captions`` (how many captions have a word).
    """
    logits = logit_scale * torch.einsum("ie,jke->ijk", videos.float(), words.float())
    # A finite fill rather than -inf: rows that are all absent must stay finite (and their gradients
    # NaN-free), since they are multiplied by zero, not removed.
    logits = logits.masked_fill(~present[None], torch.finfo(logits.dtype).min)
    bags = torch.logsumexp(logits, dim=2)  # (B videos, B captions)
    positive = bags.diagonal()
    has_words = present.any(dim=1).to(bags.dtype)
    count = has_words.sum().clamp(min=1)
    # captions without words get the fill in their column: exp(fill - x) == 0 in the sums
    video_to_text = ((torch.logsumexp(bags, dim=1) - positive) * has_words).sum() / count
    loss = video_to_text
    if symmetric:
        text_to_video = ((torch.logsumexp(bags, dim=0) - positive) * has_words).sum() / count
        loss = (video_to_text + text_to_video) / 2
    with torch.no_grad():
        hits = (bags.argmax(dim=1) == torch.arange(bags.shape[0], device=bags.device)).to(bags.dtype)
        accuracy = (hits * has_words).sum() / count
    return loss, {"accuracy": accuracy, "captions": has_words.sum()}


@register_objective("word_matching")
class WordMatchingObjective(Objective):
    @dataclass(frozen=True)
    class Config:
        weight: float = 1.0
        words_per_caption: int = 3
        symmetric: bool = True  # also the text -> video direction (see the module docstring)

        def __post_init__(self):
            if self.words_per_caption < 1:
                raise ConfigError("objectives.word_matching.words_per_caption must be >= 1")

    needs = frozenset({"text_hidden", "significant"})

    def forward(self, outputs, batch, model=None) -> ObjectiveOutput:
        significant = batch.get(SIGNIFICANT)
        if significant is None:
            raise ConfigError("word_matching needs the batch's significant words (run `vlp "
                              "significant-words --shards DIR`)")
        states, present = significant_word_states(outputs["text_hidden"], significant,
                                                  batch[ATTENTION_MASK], self.cfg.words_per_caption)
        words = F.normalize(model.text_proj(states).float(), dim=-1)
        loss, numbers = mil_nce_loss(outputs["image_embeds"], words, present, outputs["logit_scale"],
                                     self.cfg.symmetric)
        accuracy, captions, found = torch.stack(
            [numbers["accuracy"], numbers["captions"], present.sum().to(numbers["captions"])]).tolist()
        metrics = {"accuracy": accuracy, "captions_with_words": captions,
                   "words_per_caption": found / max(1, present.shape[0])}
        return ObjectiveOutput(loss=loss, metrics=metrics)
