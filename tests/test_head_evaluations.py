"""The evaluations of trained heads are registered by objective name (``vlp.eval.heads``): every entry
names a real objective, and each runs exactly when today's rules say (video QA only for an mlm that
reads the video, captions when asked for)."""

from vlp.config import from_dict
from vlp.eval.config import EvalConfig
from vlp.eval.heads import HEAD_EVALUATIONS
from vlp.objectives import OBJECTIVES


def test_every_head_evaluation_names_a_registered_objective():
    assert set(HEAD_EVALUATIONS.names()) == {"mlm", "captioning"}
    assert set(HEAD_EVALUATIONS.names()) <= set(OBJECTIVES.names())


def test_video_qa_runs_only_for_an_mlm_that_reads_the_video():
    qa = HEAD_EVALUATIONS.get("mlm")
    mlm = OBJECTIVES.get("mlm").Config
    assert qa.applies(from_dict(mlm, {"conditioned": True}), EvalConfig(video_qa=True))
    assert not qa.applies(from_dict(mlm, {"conditioned": False}), EvalConfig(video_qa=True))
    assert not qa.applies(from_dict(mlm, {"conditioned": True}), EvalConfig(video_qa=False))


def test_caption_metrics_run_when_asked_for():
    captions = HEAD_EVALUATIONS.get("captioning")
    cfg = from_dict(OBJECTIVES.get("captioning").Config, {})
    assert captions.applies(cfg, EvalConfig(captions=True))
    assert not captions.applies(cfg, EvalConfig(captions=False))
