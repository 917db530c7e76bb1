"""The image-text contrastive objective: the model's embeddings into the configured loss strategy.

Which negatives and which communication (``global``, ``local``, ``grouped``, ``sigmoid``) is the
loss config's business (``vlp.losses``); this objective only wires model outputs to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlp.config import ConfigError
from vlp.losses import ContrastiveLossConfig, build_contrastive_loss
from vlp.losses.contrastive import CONTRASTIVE_LOSSES
from vlp.objectives.base import Objective, ObjectiveOutput, register_objective


@register_objective("contrastive")
class ContrastiveObjective(Objective):
    @dataclass(frozen=True)
    class Config:
        weight: float = 1.0
        loss: ContrastiveLossConfig = field(default_factory=ContrastiveLossConfig)

    @classmethod
    def check(cls, cfg: Config, model, masking) -> None:
        if getattr(CONTRASTIVE_LOSSES.get(cfg.loss.mode), "uses_logit_bias", False) \
                and model.init_logit_bias is None:
            raise ConfigError(f"the {cfg.loss.mode} loss needs a learnable bias: set "
                              "model.init_logit_bias (SigLIP uses -10)")

    def __init__(self, cfg: Config, *, local_world_size: int | None = None, **context):
        super().__init__(cfg)
        self.loss = build_contrastive_loss(cfg.loss, local_world_size=local_world_size)

    def forward(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor],
                model=None) -> ObjectiveOutput:
        # a loss that needs the bias and gets none raises (``check`` refuses that config at load)
        out = self.loss(outputs["image_embeds"], outputs["text_embeds"], outputs["logit_scale"],
                        logit_bias=outputs.get("logit_bias"))
        metrics = {"negatives": float(out.num_negatives)}
        if out.hard_negatives is not None:  # NegNCE: hard negatives per row (logged, never synced)
            metrics["hard_negatives"] = out.hard_negatives
        return ObjectiveOutput(loss=out.loss, comm=out.comm, metrics=metrics)
