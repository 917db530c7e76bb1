"""The evaluation's typed config (the experiment config's ``eval`` section).

One dataclass for every evaluation a run does: zero-shot retrieval and classification
(``vlp.eval.zero_shot``) and the heads' evaluations (``vlp.eval.heads``). A new evaluation's settings
go here as fields with defaults, so existing configs keep loading; it imports nothing but
``vlp.config``, so the training config can hold it without pulling in the evaluations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vlp.config import ConfigError


@dataclass(frozen=True)
class EvalConfig:
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    templates: dict[str, list[str]] = field(default_factory=lambda: {
        "en": ["a {}.", "a photo of a {}.", "an image showing a {}."],
        "zh": ["一个{}", "一张{}的照片", "图片里有一个{}"],
    })
    batch_size: int = 256
    max_rows: int = 5000  # held-out pairs used for retrieval (the first ones, in shard order)
    video_qa: bool = True  # masked-word QA, when the run trains a conditioned mlm head
    captions: bool = True  # caption metrics, when the run trains a captioning head
    caption_beam_size: int = 3
    # beam scores are divided by length ** this: at 0 (plain sums of log-probabilities) a beam that
    # ends at once outscores every real caption of a barely trained model
    caption_length_penalty: float = 1.0
    caption_max_items: int = 200

    def __post_init__(self):
        if not self.ks or min(self.ks) < 1:
            raise ConfigError("eval.ks must be positive integers")
        for lang, templates in self.templates.items():
            bad = [t for t in templates if "{}" not in t]
            if bad:
                raise ConfigError(f"eval.templates.{lang}: {bad[0]!r} has no {{}} for the class name")
