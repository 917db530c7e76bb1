"""The objective interface and its registry.

An objective turns the model's outputs for a batch into one weighted loss term plus numbers worth
logging. The trainer only calls objectives and sums their losses; it never knows which ones run. A new
objective is a class with a typed ``Config`` (which must have a ``weight``) registered in
``OBJECTIVES``; the experiment config selects objectives by name: ``objectives: {contrastive: {...}}``.
That section is typed once, at load time (``parse_objectives``): ``{name: Config instance}``, defaults
filled in, so the run logs and checkpoints the values it trains with. What a config can only be
checked against the rest of the experiment (the model, the masking) goes in the class's ``check``,
which runs at load time too, never first on the workers.

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

    @property
    def bytes_by_group(self) -> dict[tuple[int, ...], int]:
        """The bytes sent by process group (its global ranks), when ``comm`` counts them so."""
        return dict(getattr(self.comm, "by_group", None) or {})


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
    def check(cls, cfg: Any, model: Any, masking: Any) -> None:
        """Check ``cfg`` against the model config (``DualEncoderConfig``) and the masking config.

        Runs when the experiment config is loaded (``TrainConfig``) and again when the pretraining
        module is built, before the objective is constructed; override to add this objective's rules.

        Raises:
            ConfigError: the combination cannot train.
        """

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
    """The ``objectives`` config section -> ``{name: typed config}``; errors name the bad key.

    Values may be mappings (YAML, JSON from a worker's payload) or already the objective's ``Config``
    (passed through), so parsing a parsed section gives it back unchanged.
    """
    if not section:
        raise ConfigError("objectives: at least one objective is needed, e.g. {contrastive: {}}")
    parsed = {}
    for name, params in section.items():
        cls = OBJECTIVES.get(name)
        if isinstance(params, cls.Config):
            parsed[name] = params
        else:
            parsed[name] = from_dict(cls.Config, params or {}, where=f"objectives.{name}")
        if parsed[name].weight < 0:
            raise ConfigError(f"objectives.{name}.weight must be >= 0")
    return parsed


def build_objectives(section: dict[str, Any], **context: Any) -> dict[str, Objective]:
    """``{name: Objective}`` built from a parsed section (or one ``parse_objectives`` accepts);
    ``context`` goes to the constructors (``model``, ``local_world_size``, ``tokenizer``)."""
    return {name: OBJECTIVES.get(name)(cfg, **context) for name, cfg in parse_objectives(section).items()}
