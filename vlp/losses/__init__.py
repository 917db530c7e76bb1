"""Training losses. Contrastive strategies register in :mod:`vlp.losses.contrastive`."""

from vlp.losses.contrastive import (
    CONTRASTIVE_LOSSES,
    ContrastiveLoss,
    ContrastiveLossConfig,
    ContrastiveOutput,
    GlobalClipLoss,
    GroupedContrastiveLoss,
    LocalClipLoss,
    SigmoidContrastiveLoss,
    build_contrastive_loss,
    negnce_loss,
    register_contrastive_loss,
)
from vlp.losses.reference import (
    reference_clip_loss,
    reference_grouped_clip_loss,
    reference_grouped_negnce_clip_loss,
    reference_negnce_clip_loss,
    reference_sigmoid_loss,
)

__all__ = [
    "CONTRASTIVE_LOSSES",
    "ContrastiveLoss",
    "ContrastiveLossConfig",
    "ContrastiveOutput",
    "GlobalClipLoss",
    "GroupedContrastiveLoss",
    "LocalClipLoss",
    "SigmoidContrastiveLoss",
    "build_contrastive_loss",
    "negnce_loss",
    "reference_clip_loss",
    "reference_grouped_clip_loss",
    "reference_grouped_negnce_clip_loss",
    "reference_negnce_clip_loss",
    "reference_sigmoid_loss",
    "register_contrastive_loss",
]
