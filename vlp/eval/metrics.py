"""Retrieval and zero-shot classification metrics: plain functions over embedding matrices.

Embeddings are L2-normalised rows; row ``i`` of the image matrix and row ``i`` of the text matrix are
a pair. Recall@K counts a query as found when its own pair ranks among the top K (ties broken against
the query, so a degenerate model that scores everything alike gets chance, not 100%).
"""

from __future__ import annotations

from typing import Sequence

import torch


def _rank_of_match(sim: torch.Tensor) -> torch.Tensor:
    """For each row i, how many columns score strictly higher or equal (excluding i) than column i."""
    own = sim.diagonal().unsqueeze(1)
    ahead = (sim >= own).sum(dim=1) - 1  # ties count against the query
    return ahead


def retrieval_recall(image_emb: torch.Tensor, text_emb: torch.Tensor,
                     ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K image->text and text->image, and their mean over both directions and all K."""
    if image_emb.shape != text_emb.shape:
        raise ValueError(f"image and text embeddings differ in shape: {tuple(image_emb.shape)} vs "
                         f"{tuple(text_emb.shape)}")
    sim = image_emb.float() @ text_emb.float().T
    ranks = {"i2t": _rank_of_match(sim), "t2i": _rank_of_match(sim.T)}
    out: dict[str, float] = {}
    for direction, rank in ranks.items():
        for k in ks:
            out[f"{direction}_R{k}"] = 100.0 * (rank < k).float().mean().item()
    out["mean_recall"] = sum(out.values()) / len(out)
    out["num_pairs"] = float(sim.shape[0])
    return out


def chance_recall(n: int, k: int) -> float:
    """Recall@K of random scores over ``n`` candidates, in percent."""
    return 100.0 * min(k, n) / n


def classifier_weights(text_emb_per_template: torch.Tensor) -> torch.Tensor:
    """``(C, T, D)`` embeddings of every class under every prompt template -> ``(C, D)`` prototypes
    (mean over templates, renormalised, as in CLIP's prompt ensembling)."""
    w = text_emb_per_template.float().mean(dim=1)
    return w / w.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def zero_shot_accuracy(image_emb: torch.Tensor, class_weights: torch.Tensor, labels: torch.Tensor,
                       ks: Sequence[int] = (1,)) -> dict[str, float]:
    """Top-K accuracy (percent) of classifying images by their nearest class prototype."""
    logits = image_emb.float() @ class_weights.float().T
    topk = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hit = topk == labels.view(-1, 1)
    return {f"top{k}": 100.0 * hit[:, :k].any(dim=1).float().mean().item() for k in ks}
