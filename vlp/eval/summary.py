"""The metrics that code outside the evaluation reads: the run summary, the step log's eval line and
the quickstart's learned-or-not verdict. One home for their names, so that a renamed metric fails
here, in review, instead of silently vanishing from every summary.
"""

from __future__ import annotations

MEAN_RECALL = "retrieval/mean_recall"  # mean of R@1/5/10 both ways, on the held-out pairs
CHANCE_R1 = "retrieval/chance_R1"  # R@1 of a model that ranks at random

# What ``vlp train`` prints at the end, in this order (those a run has).
SUMMARY_METRICS = (
    "retrieval/i2t_R1", "retrieval/t2i_R1", "retrieval/i2t_R5", "retrieval/t2i_R5",
    "retrieval/v2t_R1", "retrieval/t2v_R1", "retrieval/v2t_R5", "retrieval/t2v_R5",
    MEAN_RECALL, "retrieval_shuffled/mean_recall", "temporal/mean_recall_gap", "temporal/R1_gap",
    CHANCE_R1, "zeroshot_en/top1", "zeroshot_zh/top1", "zeroshot_en/chance", "qa/accuracy",
    "qa/chance", "caption/bleu4", "caption/cider",
)

_HEADLINE_SUFFIXES = ("mean_recall", "_R1", "top1", "gap", "accuracy", "bleu4", "cider")


def headline_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The few numbers worth a log line after each evaluation (no chance levels)."""
    return {k: v for k, v in metrics.items() if k.endswith(_HEADLINE_SUFFIXES) and "chance" not in k}
