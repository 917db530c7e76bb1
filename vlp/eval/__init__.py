"""Evaluation, layered so that imports point one way (down this list):

- pure metrics: ``metrics`` (retrieval recall, zero-shot accuracy), ``caption_metrics`` (BLEU,
  ROUGE-L, CIDEr-D); a new metric goes next to its kind;
- ``config``: ``EvalConfig``, the ``eval`` section (what the training config imports);
- ``pairs``: held-out pairs (``PairSet``, ``load_pairs``) and the batched encoders every evaluation
  uses;
- the evaluations of trained heads, one module each: ``captioning`` (caption metrics) and
  ``video_qa`` (masked-word video QA);
- ``heads``: ``HEAD_EVALUATIONS``, those evaluations registered by objective name; a new head's
  evaluation is a module of its own plus one registration there;
- ``zero_shot``: the runner, ``evaluate`` (retrieval, classification, then the registered heads).
"""
