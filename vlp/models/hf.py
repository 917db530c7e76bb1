"""Hugging Face ``transformers`` models as towers: configs built from our presets, local folders checked.

The towers that wrap a ``transformers`` model (``encoders``' ``vit`` and ``bert``, ``video``'s
``videomae``) are built one of two ways: from a preset of ours with ``EncoderConfig.options`` over it
(``hf_config``), or from a local pretrained folder (``check_folder`` first, then the model class's
``from_pretrained``). Nothing here imports ``transformers``: the towers pass their own config classes in,
so importing the library stays cheap. Checks and helpers that every such tower needs go here; the
presets stay with the towers that use them.
"""

from __future__ import annotations

import os
from typing import Any

from vlp.config import ConfigError
from vlp.models.config import EncoderConfig


def hf_config(config_cls, presets: dict, cfg: EncoderConfig, **fixed: Any):
    """``config_cls`` (a ``transformers`` config class) from preset ``cfg.preset``, then ``fixed`` (what
    the model config decides, such as ``image_size``), then ``cfg.options``.

    Raises:
        ConfigError: the preset is unknown, or an option is not a field of ``config_cls``.
    """
    if cfg.preset not in presets:
        raise ConfigError(f"unknown preset {cfg.preset!r} for encoder {cfg.name!r}; "
                          f"presets: {', '.join(presets)}")
    known = set(config_cls().to_dict())
    unknown = sorted(set(cfg.options) - known)
    if unknown:
        raise ConfigError(f"encoder {cfg.name!r}: unknown option {unknown[0]!r} "
                          f"(options are fields of transformers' {config_cls.__name__})")
    return config_cls(**{**presets[cfg.preset], **fixed, **cfg.options})


def check_folder(path: str) -> None:
    """Raise ``ConfigError`` unless ``path`` is a Hugging Face model folder (it has a config.json).

    Checked before ``from_pretrained``, which would otherwise take a wrong path for a Hub model name
    and fail on the network with a message that does not name the setting.
    """
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"pretrained_path {path!r} is not a Hugging Face model folder "
                          "(no config.json in it)")
