"""``VisionTokens``: what every visual tower's ``encode_tokens`` returns.

The masked objectives (MAE, MLM over fused tokens), the fusion encoder and the caption decoder read a
visual tower through this one record, whichever tower made it (``encoders``' meanP ``vit``, ``video``'s
``video_vit`` and ``videomae``). It sits in its own module, below the towers, so that every tower can
import it without importing another tower. A field that a new tower or objective needs is added here,
with a default, so the towers that do not fill it keep working.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class VisionTokens:
    """A visual tower's token output, as the masked objectives and the heads need it.

    Attributes:
        tokens: ``(B, 1 + T * K, D)`` after the final norm: the CLS token, then frame by frame the K
            tokens of each frame (K = all patches, or the kept ones of a tube mask).
        frames: T.
        patches: patches per frame of the full grid (``(image_size / patch_size) ** 2``).
        patch_size: pixels per patch side.
        keep: ``(B, K)`` indices of the kept patches (the same in every frame), or None (all kept, or
            masked patches were encoded as mask tokens: then ``masked`` says which).
        masked: ``(B, patches)`` True where a patch is masked, or None when nothing is masked.
        pooled: ``(B, D)`` the tower's feature (what ``forward`` returns), from these tokens.
    """

    tokens: torch.Tensor
    frames: int
    patches: int
    patch_size: int
    pooled: torch.Tensor
    keep: torch.Tensor | None = None
    masked: torch.Tensor | None = None
