"""The objective interface and its registry.

An objective turns the model's outputs for a batch into one weighted loss term plus numbers worth
logging. The trainer only calls objectives and sums their losses; it never knows which ones run. A new
objective is a class with a typed ``Config`` (which must have a ``weight``) registered in
``OBJECTIVES``; the experiment config selects objectives by name: ``objectives: {contrastive: {...}}``.
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


class Objective(nn.Module):
    """Base class: ``Config`` is the typed config; ``forward(outputs, batch)`` the loss."""

    Config: ClassVar[type]
    name: ClassVar[str] = ""

    def __init__(self, cfg: Any, **context: Any):
        super().__init__()
        self.cfg = cfg

    def forward(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
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
