"""Zero-shot metrics against plain-Python references."""

from __future__ import annotations

import pytest
import torch

from vlp.eval.metrics import (chance_recall, classifier_weights, retrieval_recall,
                              zero_shot_accuracy)


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def _reference_recall(sim, k):
    hits = 0
    for i, row in enumerate(sim.tolist()):
        # rank of the true match: how many others score at least as high
        ahead = sum(1 for j, s in enumerate(row) if j != i and s >= row[i])
        hits += ahead < k
    return 100.0 * hits / len(sim)


def test_retrieval_recall_matches_a_plain_reference():
    g = torch.Generator().manual_seed(0)
    img = _unit(torch.randn(40, 8, generator=g))
    txt = _unit(img + 0.8 * torch.randn(40, 8, generator=g))
    out = retrieval_recall(img, txt, ks=(1, 5, 10))
    sim = img @ txt.T
    for k in (1, 5, 10):
        assert out[f"i2t_R{k}"] == pytest.approx(_reference_recall(sim, k))
        assert out[f"t2i_R{k}"] == pytest.approx(_reference_recall(sim.T, k))
    six = [out[f"{d}_R{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)]
    assert out["mean_recall"] == pytest.approx(sum(six) / 6)
    assert 0 < out["i2t_R1"] < 100  # neither trivial nor impossible: the test can tell


def test_perfect_and_degenerate_embeddings():
    eye = torch.eye(10)
    assert retrieval_recall(eye, eye)["i2t_R1"] == 100.0
    same = _unit(torch.ones(10, 4))  # every score ties: ties count against the query
    out = retrieval_recall(same, same, ks=(1, 5))
    assert out["i2t_R1"] == 0.0 and out["t2i_R5"] == 0.0
    assert chance_recall(10, 1) == 10.0 and chance_recall(4, 10) == 100.0


def test_zero_shot_accuracy_and_prompt_ensembling():
    g = torch.Generator().manual_seed(1)
    protos = _unit(torch.randn(5, 3, 16, generator=g))  # 5 classes x 3 templates
    weights = classifier_weights(protos)
    expected = _unit(protos.mean(dim=1))
    torch.testing.assert_close(weights, expected)
    labels = torch.randint(0, 5, (30,), generator=g)
    images = _unit(weights[labels] + 0.6 * torch.randn(30, 16, generator=g))
    acc = zero_shot_accuracy(images, weights, labels, ks=(1, 2))
    logits = images @ weights.T
    ref1 = 100.0 * sum(int(row.argmax() == y) for row, y in zip(logits, labels)) / 30
    ref2 = 100.0 * sum(int(y in row.topk(2).indices) for row, y in zip(logits, labels)) / 30
    assert acc["top1"] == pytest.approx(ref1) and acc["top2"] == pytest.approx(ref2)
    assert acc["top1"] <= acc["top2"]
