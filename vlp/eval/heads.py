"""The evaluations of trained heads, registered under the name of the objective that trains the head.

``evaluate_heads`` (run by ``zero_shot.evaluate`` when it is given the whole ``PretrainingModel``)
loops over the objectives the run trains; for each one with an entry in ``HEAD_EVALUATIONS`` whose
``applies`` accepts the objective's config and the ``EvalConfig``, it runs that entry on the held-out
pairs. Registered here:

- ``mlm``: masked-word video question answering (``vlp.eval.video_qa``, ``qa/*``; LAVENDER), when the
  mlm reads the video (``conditioned``) and ``eval.video_qa`` is on;
- ``captioning``: caption metrics (``vlp.eval.captioning``, ``caption/*``; CoCa) and decoded examples
  (``caption_examples.txt``), when ``eval.captions`` is on.

A new head's evaluation is its metric in a module of its own (as ``video_qa`` and ``captioning``,
which import only ``pairs`` of this package) plus one ``HeadEvaluation`` class here, decorated with
``@register_head_evaluation("<objective name>")``. The registrations sit next to the registry on
purpose: whatever can see ``HEAD_EVALUATIONS`` sees every entry, with no module left to import first.
"""

from __future__ import annotations

from typing import Any

from vlp.eval.captioning import decode_captions
from vlp.eval.config import EvalConfig
from vlp.eval.pairs import PairSet
from vlp.eval.video_qa import evaluate_video_qa
from vlp.registry import Registry

CAPTION_EXAMPLES = 20  # decoded captions written to ``caption_examples.txt``


class HeadEvaluation:
    """One head's evaluation on held-out pairs.

    ``applies`` decides, from the objective's typed config and the ``EvalConfig``, whether it runs;
    calling it returns its metrics and may add readable examples to ``texts`` (by file name).
    """

    def applies(self, objective_cfg: Any, cfg: EvalConfig) -> bool:
        raise NotImplementedError

    def __call__(self, pretraining, tokenizer, pairs: PairSet, cfg: EvalConfig, *,
                 texts: dict[str, str] | None, image_size: int, num_frames: int,
                 max_text_length: int, batch_size: int, device) -> dict[str, float]:
        raise NotImplementedError


HEAD_EVALUATIONS: Registry[HeadEvaluation] = Registry("head evaluation")


def register_head_evaluation(objective: str):
    """Class decorator: an instance of the class evaluates the head trained by ``objective``."""

    def wrap(cls: type[HeadEvaluation]) -> type[HeadEvaluation]:
        HEAD_EVALUATIONS.register(objective)(cls())
        return cls

    return wrap


@register_head_evaluation("mlm")
class VideoQAEvaluation(HeadEvaluation):
    """Fill-in video QA with the mlm head; an unconditioned mlm never saw the video, so it is skipped."""

    def applies(self, objective_cfg: Any, cfg: EvalConfig) -> bool:
        return cfg.video_qa and objective_cfg.conditioned

    def __call__(self, pretraining, tokenizer, pairs: PairSet, cfg: EvalConfig, *,
                 texts: dict[str, str] | None, **inputs: Any) -> dict[str, float]:
        return evaluate_video_qa(pretraining, tokenizer, pairs, **inputs)


@register_head_evaluation("captioning")
class CaptionEvaluation(HeadEvaluation):
    """Captions decoded with the captioning decoder (``eval.caption_*`` settings), scored against
    each pair's own caption."""

    def applies(self, objective_cfg: Any, cfg: EvalConfig) -> bool:
        return cfg.captions

    def __call__(self, pretraining, tokenizer, pairs: PairSet, cfg: EvalConfig, *,
                 texts: dict[str, str] | None, **inputs: Any) -> dict[str, float]:
        captions = decode_captions(pretraining, tokenizer, pairs, beam_size=cfg.caption_beam_size,
                                   length_penalty=cfg.caption_length_penalty,
                                   max_items=cfg.caption_max_items, **inputs)
        metrics = captions.metrics()
        if texts is not None:
            texts["caption_examples.txt"] = captions.examples_text(CAPTION_EXAMPLES)
        return metrics


def evaluate_heads(pretraining, tokenizer, pairs: PairSet, cfg: EvalConfig, device,
                   texts: dict[str, str] | None = None) -> dict[str, float]:
    """The metrics of the heads the run trains that have a registered evaluation that applies, in the
    order of the run's objectives; ``texts`` receives readable examples by file name (decoded
    captions next to their references)."""
    mcfg = pretraining.model.cfg
    inputs = dict(image_size=mcfg.image_size, num_frames=mcfg.num_frames,
                  max_text_length=mcfg.max_text_length, batch_size=min(cfg.batch_size, 64),
                  device=device)
    metrics: dict[str, float] = {}
    for name, objective in pretraining.objectives.items():
        if name not in HEAD_EVALUATIONS:
            continue
        evaluation = HEAD_EVALUATIONS.get(name)
        if evaluation.applies(objective.cfg, cfg):
            metrics.update(evaluation(pretraining, tokenizer, pairs, cfg, texts=texts, **inputs))
    return metrics
