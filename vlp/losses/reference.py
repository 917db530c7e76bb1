"""Plain single-process definitions of the contrastive losses, for tests, benchmarks and reading.

Each function takes the whole batch (every rank's samples concatenated in rank order) and computes the
loss that the distributed strategies in :mod:`vlp.losses.contrastive` must reproduce: the mean over
ranks of their per-rank loss terms. No communication, no tricks: the full logit matrix, written the
way the papers write it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_clip_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                        logit_scale: torch.Tensor | float) -> torch.Tensor:
    """CLIP's symmetric InfoNCE over the full ``(N, N)`` logit matrix.

    Args:
        image_features, text_features: ``(N, D)``, L2-normalised; row i of each is a positive pair.
        logit_scale: the exponentiated temperature.

    Returns:
        The mean of image-to-text and text-to-image cross entropy, each averaged over the N rows.
    """
    logits = logit_scale * image_features @ text_features.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def reference_grouped_clip_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                                logit_scale: torch.Tensor | float, num_groups: int) -> torch.Tensor:
    """M2-Encoder's grouped aggregation: the mean over groups of each group's own CLIP loss.

    The batch is split into ``num_groups`` contiguous, equal parts (group g holds the samples of ranks
    ``[g * k, (g + 1) * k)``); a sample's negatives are only the other samples of its group. With one
    group this is :func:`reference_clip_loss`.
    """
    if image_features.shape[0] % num_groups:
        raise ValueError(f"batch of {image_features.shape[0]} does not split into {num_groups} groups")
    losses = [reference_clip_loss(i, t, logit_scale)
              for i, t in zip(image_features.chunk(num_groups), text_features.chunk(num_groups))]
    return torch.stack(losses).mean()


def reference_negnce_clip_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                               logit_scale: torch.Tensor | float, weight: float,
                               margin: float) -> torch.Tensor:
    """CLIP's InfoNCE plus DMAE's NegNCE over the full ``(N, N)`` logit matrix (our reconstruction).

    In each direction, row i's hard negatives are the columns ``j != i`` with
    ``logit_ij > logit_ii - margin * logit_scale`` (chosen without gradient); the row's NegNCE term is
    ``-log(exp(logit_ii) / (exp(logit_ii) + sum_{j hard} exp(logit_ij)))``, written here as
    ``log(1 + sum_{j hard} exp(logit_ij - logit_ii))``. NegNCE is the mean over rows, averaged over the
    two directions.

    Returns:
        ``reference_clip_loss + weight * NegNCE``.
    """
    logits = logit_scale * image_features @ text_features.T
    negnce = (_reference_negnce_rows(logits, logit_scale, margin)
              + _reference_negnce_rows(logits.T, logit_scale, margin)) / 2
    return reference_clip_loss(image_features, text_features, logit_scale) + weight * negnce


def reference_grouped_negnce_clip_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                                       logit_scale: torch.Tensor | float, weight: float,
                                       margin: float, num_groups: int) -> torch.Tensor:
    """:func:`reference_negnce_clip_loss` inside each group, then the mean over groups.

    Groups as in :func:`reference_grouped_clip_loss`: hard negatives are sought only among a sample's
    own group. With one group this is :func:`reference_negnce_clip_loss`.
    """
    if image_features.shape[0] % num_groups:
        raise ValueError(f"batch of {image_features.shape[0]} does not split into {num_groups} groups")
    losses = [reference_negnce_clip_loss(i, t, logit_scale, weight, margin)
              for i, t in zip(image_features.chunk(num_groups), text_features.chunk(num_groups))]
    return torch.stack(losses).mean()


def _reference_negnce_rows(logits: torch.Tensor, logit_scale: torch.Tensor | float,
                           margin: float) -> torch.Tensor:
    """Mean over the rows of a square logit matrix (positives on the diagonal) of NegNCE's term."""
    positives = logits.diagonal()[:, None]
    off_diagonal = ~torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device)
    hard = (logits > positives - margin * logit_scale).detach() & off_diagonal
    # Masked before exp, not after: exp of a far-off unselected entry may overflow, and inf * 0 is NaN.
    excess = (logits - positives).masked_fill(~hard, float("-inf")).exp()
    return torch.log1p(excess.sum(dim=1)).mean()


def reference_sigmoid_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                           logit_scale: torch.Tensor | float,
                           logit_bias: torch.Tensor | float) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss over the full ``(N, N)`` matrix.

    Every pair is an independent binary problem: label +1 on the diagonal, -1 elsewhere;
    ``loss = -sum(log sigmoid(label * (scale * <i, t> + bias))) / N``. The per-rank SigLIP loss divides
    by the local batch ``B = N / W`` instead, so the mean over the W ranks equals this for any W.
    """
    logits = logit_scale * image_features @ text_features.T + logit_bias
    n = logits.shape[0]
    labels = 2 * torch.eye(n, device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / n
