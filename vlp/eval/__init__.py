"""Evaluation: pure metrics (``metrics``, ``caption_metrics``), the zero-shot runner (``zero_shot``),
and the evaluations of trained heads: captioning (``captioning``) and masked-word video QA
(``video_qa``)."""
