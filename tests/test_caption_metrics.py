"""Caption metrics against the reference implementations (pycocoevalcap, sacrebleu, rouge-score).

The references are fed the same tokens (``caption_tokens`` joined by single spaces), so what is compared
is the maths, not the tokenisers; pycocoevalcap's PTBTokenizer (Java) is never used.
"""

from __future__ import annotations

import math
import random

import pytest
import sacrebleu
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from rouge_score import rouge_scorer

from vlp.eval.caption_metrics import bleu, caption_metrics, caption_tokens, cider_d, rouge_l

_WORDS = ("a man woman dog cat sits on the grass red ball with two people riding bike street "
          "near table of food").split()
_HANZI = list("一只猫狗坐在草地上的红色球两个人骑自行车街道")
_PUNCT = [".", ",", "!", "", "", ""]


def _caption(rng: random.Random, base: list[str], chinese: bool, min_len: int = 1) -> str:
    """A perturbation of ``base`` (drop, swap, substitute tokens), rendered as raw text."""
    vocab = _HANZI if chinese else _WORDS
    toks = [t for t in base if rng.random() > 0.2]
    toks = [rng.choice(vocab) if rng.random() < 0.2 else t for t in toks]
    if len(toks) > 1 and rng.random() < 0.3:
        i = rng.randrange(len(toks) - 1)
        toks[i], toks[i + 1] = toks[i + 1], toks[i]
    while len(toks) < min_len:
        toks.append(rng.choice(vocab))
    if chinese:
        return "".join(toks) + rng.choice(["。", "", "！"])
    text = " ".join(toks) + rng.choice(_PUNCT)
    return text.capitalize() if rng.random() < 0.5 else text


def _random_corpus(seed: int) -> tuple[list[str], list[list[str]]]:
    """Mixed English/Chinese samples, 1-5 references each; some hypotheses are very short or empty."""
    rng = random.Random(seed)
    hyps, refs = [], []
    for _ in range(rng.randint(1, 20)):
        chinese = rng.random() < 0.3
        base = [rng.choice(_HANZI if chinese else _WORDS) for _ in range(rng.randint(3, 12))]
        refs.append([_caption(rng, base, chinese) for _ in range(rng.randint(1, 5))])
        hyp = _caption(rng, base, chinese, min_len=0)
        if rng.random() < 0.15:
            hyp = " ".join(hyp.split()[:rng.randint(0, 2)])  # very short or empty
        hyps.append(hyp)
    return hyps, refs


def _coco_inputs(hyps, refs):
    """pycocoevalcap's dicts of pre-tokenised, space-joined strings."""
    res = {i: [" ".join(caption_tokens(h))] for i, h in enumerate(hyps)}
    gts = {i: [" ".join(caption_tokens(r)) for r in rs] for i, rs in enumerate(refs)}
    return gts, res


_HAND_MADE = [
    (["A man riding a bike down the street."],
     [["A man rides a bicycle on the street.", "Someone riding a bike.", "a man on a bike"]]),
    (["一只猫坐在垫子上。", "两个人在街上骑自行车"],
     [["一只猫在垫子上", "猫坐在地毯上"], ["两个人骑车", "街道上有两个骑自行车的人。"]]),
    (["dog", "a", "the red ball on the grass"],
     [["a dog playing in the park"], ["a cat on a table"], ["a red ball lies on the grass"]]),
    (["", "a man with a dog", "a man with a dog"],
     [["an empty scene"], ["a man walks with his dog", "man and dog"], ["a man with a dog"]]),
]
_CORPORA = [_random_corpus(seed) for seed in range(30)] + _HAND_MADE


@pytest.mark.parametrize("hyps,refs", _CORPORA)
def test_bleu_matches_sacrebleu_and_pycocoevalcap(hyps, refs):
    """Corpus BLEU-n equals sacrebleu (no smoothing, closest ref length) everywhere, and pycocoevalcap
    wherever no precision is zero (there it adds 1e-15/1e-9 instead of returning 0)."""
    ours = bleu(hyps, refs)
    gts, res = _coco_inputs(hyps, refs)
    coco, _ = Bleu(4).compute_score(gts, res, verbose=0)
    num_refs = max(len(r) for r in refs)
    streams = [[gts[i][k] if k < len(gts[i]) else None for i in range(len(hyps))]
               for k in range(num_refs)]
    for n in range(1, 5):
        sb = sacrebleu.metrics.BLEU(tokenize="none", smooth_method="none", max_ngram_order=n)
        expected = sb.corpus_score([res[i][0] for i in range(len(hyps))], streams).score
        assert 100 * ours[f"bleu{n}"] == pytest.approx(expected, abs=1e-9)
        if ours[f"bleu{n}"] > 0:
            assert ours[f"bleu{n}"] == pytest.approx(coco[n - 1], rel=1e-6)


@pytest.mark.parametrize("hyps,refs", _CORPORA)
def test_rouge_l_matches_pycocoevalcap_and_rouge_score(hyps, refs):
    """ROUGE-L equals pycocoevalcap's Rouge, and equals F_1.2 of rouge-score's LCS precision and recall
    maximised over the references (COCO's definition)."""
    gts, res = _coco_inputs(hyps, refs)
    coco, _ = Rouge().compute_score(gts, res)
    assert rouge_l(hyps, refs) == pytest.approx(coco, abs=1e-12)

    class _Split:
        def tokenize(self, text):
            return text.split()

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Split())
    per_sample = []
    for i in range(len(hyps)):
        scores = [scorer.score(ref, res[i][0])["rougeL"] for ref in gts[i]]
        p, r = max(s.precision for s in scores), max(s.recall for s in scores)
        per_sample.append(0.0 if p == 0 or r == 0 else 2.44 * p * r / (r + 1.44 * p))
    assert rouge_l(hyps, refs) == pytest.approx(sum(per_sample) / len(per_sample), abs=1e-12)


@pytest.mark.parametrize("hyps,refs", _CORPORA)
def test_cider_d_matches_pycocoevalcap(hyps, refs):
    """CIDEr-D equals pycocoevalcap's Cider (idf over this corpus, clipping, sigma=6, x10)."""
    gts, res = _coco_inputs(hyps, refs)
    coco, _ = Cider().compute_score(gts, res)
    assert cider_d(hyps, refs) == pytest.approx(coco, rel=1e-9, abs=1e-12)


def test_the_corpora_exercise_both_zero_and_nonzero_scores():
    """Guards the comparisons above against passing vacuously: most corpora have 4-gram matches (so
    pycocoevalcap's BLEU is compared), some have a zero precision, and CIDEr and ROUGE-L are not 0."""
    scores = [caption_metrics(hyps, refs) for hyps, refs in _CORPORA if len(hyps) > 1]
    assert sum(m["bleu4"] > 0 for m in scores) >= 20
    assert sum(m["bleu4"] == 0 for m in scores) >= 3
    assert all(m["rouge_l"] > 0 and m["cider"] > 0 for m in scores)


def test_caption_tokens_handles_english_chinese_and_punctuation():
    assert caption_tokens("A Man's   black-and-white dog!") == ["a", "man", "s", "black", "and",
                                                                  "white", "dog"]
    assert caption_tokens("一只猫，坐在垫子上。") == list("一只猫坐在垫子上")
    assert caption_tokens("Ｔwo 只cats在sofa上") == ["two", "只", "cats", "在", "sofa", "上"]
    assert caption_tokens("  ...!!  ") == []


def test_hand_computed_bleu():
    """p1..p4 = 3/4, 2/3, 1/2, 0 and no brevity penalty; then a half-length hypothesis, BP = e^-1."""
    out = bleu(["a b c d"], [["a b c e"]])
    assert out["bleu1"] == pytest.approx(0.75)
    assert out["bleu2"] == pytest.approx(math.sqrt(0.75 * 2 / 3))
    assert out["bleu3"] == pytest.approx((0.75 * 2 / 3 * 0.5) ** (1 / 3))
    assert out["bleu4"] == 0.0
    short = bleu(["a b"], [["a b c d"]], max_n=2)
    assert short == pytest.approx({"bleu1": math.exp(-1), "bleu2": math.exp(-1)})
    # closest reference length, ties to the shorter: 3 and 5 are both 1 away from 4 -> r = 3, BP = 1
    assert bleu(["a b c d"], [["a b c", "a b c d e"]], max_n=1)["bleu1"] == pytest.approx(1.0)


def test_identical_captions_score_100_and_disjoint_score_0():
    hyps = ["a man riding a red bike down the street", "两个人在街上骑自行车"]
    same = caption_metrics(hyps, [[h] for h in hyps])
    for key in ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l"):
        assert same[key] == pytest.approx(100.0)
    assert same["cider"] > 0
    disjoint = caption_metrics(hyps, [["zebras graze quietly"], ["猫狗"]])
    assert disjoint == {k: 0.0 for k in ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider")}


def test_caption_metrics_keys_and_scaling():
    """caption_metrics is x100 of each low-level function (cider included, the COCO paper convention)."""
    hyps, refs = _random_corpus(3)
    out = caption_metrics(hyps, refs)
    assert set(out) == {"bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider"}
    for n, value in bleu(hyps, refs).items():
        assert out[n] == pytest.approx(100 * value)
    assert out["rouge_l"] == pytest.approx(100 * rouge_l(hyps, refs))
    assert out["cider"] == pytest.approx(100 * cider_d(hyps, refs))


def test_empty_hypotheses_score_zero_without_crashing():
    out = caption_metrics(["", "?!", ""], [["a cat"], ["a dog", "一只狗"], ["猫"]])
    assert out == {k: 0.0 for k in ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider")}


@pytest.mark.parametrize("hyps,refs,message", [
    ([], [], "empty corpus"),
    (["a"], [], "reference lists"),
    (["a", "b"], [["a"], []], "no reference"),
])
def test_invalid_corpora_raise(hyps, refs, message):
    for metric in (caption_metrics, bleu, rouge_l, cider_d):
        with pytest.raises(ValueError, match=message):
            metric(hyps, refs)
