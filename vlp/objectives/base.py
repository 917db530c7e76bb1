"""The objective interface and its registry.

An objective turns the model's outputs for a batch into one weighted loss term plus numbers worth
logging. The trainer only calls objectives and sums their losses; it never knows which ones run. A new
objective is a class with a typed ``Config`` (which must have a ``weight``) registered in
``OBJECTIVES``; the experiment config selects objectives by name: ``objectives: {contrastive: {...}}``.

What an objective reads from the shared forward pass it declares in ``needs`` (names in ``OUTPUTS``);
the pretraining module (``pretraining.py``) computes the union once per step, so two objectives that
read the same tokens share one encoder pass. Objectives with parameters of their own (a decoder, a
head) own them as submodules; they are built with the model at hand (``model=``) to size themselves,
and get it again in ``forward`` to call its shared parts (the fusion encoder), never storing it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from vlp.config import ConfigError, from_dict
from vlp.registry import Registry


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor  # this rank's unweighted loss term (the trainer applies the weight)
    metrics: dict[str, float] = field(default_factory=dict)  # detached numbers to log
    # Cross-rank traffic: anything with a ``bytes_sent`` that is complete once backward has run (the
    # gradients' collectives count too), e.g. the loss's ``CommCounter``; None for no traffic.
    comm: Any = None

    @property
    def bytes_sent(self) -> int:
        return int(self.comm.bytes_sent) if self.comm is not None else 0


# What the shared forward pass can compute for the objectives (besides the contrastive embeddings,
# which are always there):
OUTPUTS = {
    "vision": "the visual tower's VisionTokens (masked by masking.vision when its ratio is > 0)",
    "text_hidden": "the text tower's token states of the unmasked caption (B, L, D)",
    "masked_text": "MaskedText: the caption masked by masking.text, and the MLM labels",
    "masked_text_hidden": "the text tower's token states of the masked caption",
    "fused_masked": "FusedTokens: the fusion encoder over the masked caption and the visual tokens",
    "significant": "the batch's significant-word ids (data: <train>/_significant_words.json)",
}


class Objective(nn.Module):
    """Base class: ``Config`` is the typed config; ``forward(outputs, batch, model)`` the loss.

    Class attributes: ``needs`` (names in ``OUTPUTS``), ``uses_fusion`` (calls ``model.fuse``, so
    ``model.fusion`` must be configured), ``needs_vision_mask`` (only meaningful with a visual mask).
    """

    Config: ClassVar[type]
    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()
    uses_fusion: ClassVar[bool] = False
    needs_vision_mask: ClassVar[bool] = False

    def __init__(self, cfg: Any, **context: Any):
        super().__init__()
        self.cfg = cfg

    @classmethod
    def requirements(cls, cfg: Any) -> tuple[frozenset[str], bool]:
        """(outputs needed, whether the fusion encoder is used) for this config; override when a
        config option changes them (e.g. MLM conditioned on video or not)."""
        return cls.needs, cls.uses_fusion

    def forward(self, outputs: dict[str, Any], batch: dict[str, torch.Tensor],
                model: nn.Module | None = None) -> ObjectiveOutput:
        raise NotImplementedError


OBJECTIVES: Registry[type[Objective]] = Registry("objective")


def register_objective(name: str):
    def wrap(cls: type[Objective]) -> type[Objective]:
        if not hasattr(cls, "Config") or not hasattr(cls.Config, "weight"):
            raise TypeError(f"objective {cls.__name__} needs a Config dataclass with a weight")
        cls.name = name
        return OBJECTIVES.register(name)(cls)

    return wrap


def parse_objectives(section: dict[str, Any]) -> dict[str, Any]:
    """The ``objectives`` config section -> ``{name: typed config}``; errors name the bad key."""
    if not section:
        raise ConfigError("objectives: at least one objective is needed, e.g. {contrastive: {}}")
    parsed = {}
    for name, params in section.items():
        cls = OBJECTIVES.get(name)
        parsed[name] = from_dict(cls.Config, params or {}, where=f"objectives.{name}")
        if parsed[name].weight < 0:
            raise ConfigError(f"objectives.{name}.weight must be >= 0")
    return parsed


def build_objectives(section: dict[str, Any], **context: Any) -> dict[str, Objective]:
    return {name: OBJECTIVES.get(name)(cfg, **context) for name, cfg in parse_objectives(section).items()}
