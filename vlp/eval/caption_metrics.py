"""Corpus-level captioning metrics: BLEU-1..4, ROUGE-L and CIDEr-D, as the COCO caption evaluation
(``pycocoevalcap``) defines them, without its Java tokenizer.

Every public function takes raw ``hypotheses`` (one string per sample) and ``references`` (a non-empty
list of strings per sample) and tokenises both with :func:`caption_tokens`. The ``_..._from_tokens``
helpers hold the maths over token lists so that :func:`caption_metrics` tokenises once. A new metric
goes here as one such helper plus a public wrapper and a key in :func:`caption_metrics`.

Tokenisation is an approximation of COCO's PTB tokenizer (which needs Java): scores are exactly those of
``pycocoevalcap`` on the same tokens, but can differ slightly from the COCO server's on the raw text.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from typing import Sequence

Ngram = tuple[str, ...]

# CJK ideographs (unified, extension A, compatibility, and the supplementary-plane extensions): Chinese
# is written without spaces, so each character is one token, as in the usual Chinese caption benchmarks.
_CJK_CHAR = re.compile("([\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f])")
_ROUGE_BETA = 1.2
_CIDER_SIGMA = 6.0
_CIDER_MAX_N = 4


def caption_tokens(text: str) -> list[str]:
    """Tokenise a caption: NFKC-normalise, lowercase, turn punctuation into spaces, split on whitespace,
    and make every CJK ideograph a token of its own.

    Punctuation is any Unicode ``P*`` character (so Chinese ``，。`` too) and becomes a separator, not a
    deletion: ``"black-and-white"`` gives three tokens, ``"man's"`` gives ``["man", "s"]``. NFKC first
    folds full-width forms (``"Ａ，"`` -> ``"a,"``) so that both scripts are treated alike.
    """
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text)
    return _CJK_CHAR.sub(r" \1 ", text).split()


def _check_corpus(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    """Raise ``ValueError`` unless there is at least one sample, each with at least one reference."""
    if len(hypotheses) == 0:
        raise ValueError("caption metrics need at least one hypothesis; got an empty corpus")
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    empty = [i for i, refs in enumerate(references) if len(refs) == 0]
    if empty:
        raise ValueError(f"samples {empty[:5]} have no reference caption")


def _tokenize_corpus(hypotheses: Sequence[str], references: Sequence[Sequence[str]]
                     ) -> tuple[list[list[str]], list[list[list[str]]]]:
    _check_corpus(hypotheses, references)
    return ([caption_tokens(h) for h in hypotheses],
            [[caption_tokens(r) for r in refs] for refs in references])


def _ngram_counts(tokens: Sequence[str], max_n: int) -> Counter[Ngram]:
    """Counts of every n-gram of order 1..``max_n`` (orders share one counter, told apart by length)."""
    return Counter(tuple(tokens[i:i + n]) for n in range(1, max_n + 1)
                   for i in range(len(tokens) - n + 1))


# ---------------------------------------------------------------------------------------------- BLEU

def _bleu_from_tokens(hyps: list[list[str]], refs: list[list[list[str]]], max_n: int
                      ) -> dict[str, float]:
    matched = [0] * max_n  # clipped n-gram matches, summed over the corpus, per order
    total = [0] * max_n    # hypothesis n-grams, summed over the corpus, per order
    hyp_len = ref_len = 0
    for hyp, hyp_refs in zip(hyps, refs):
        max_ref_counts: Counter[Ngram] = Counter()
        for ref in hyp_refs:
            max_ref_counts |= _ngram_counts(ref, max_n)  # ``|`` keeps the max count per n-gram
        for ngram, count in _ngram_counts(hyp, max_n).items():
            matched[len(ngram) - 1] += min(count, max_ref_counts[ngram])
        for n in range(max_n):
            total[n] += max(0, len(hyp) - n)
        hyp_len += len(hyp)
        # The "closest" rule of pycocoevalcap and sacrebleu: ties go to the shorter reference.
        ref_len += min((len(r) for r in hyp_refs), key=lambda r: (abs(r - len(hyp)), r))
    if hyp_len == 0:
        brevity = 0.0
    else:
        brevity = 1.0 if hyp_len >= ref_len else math.exp(1.0 - ref_len / hyp_len)
    scores: dict[str, float] = {}
    log_sum = 0.0
    for n in range(max_n):
        if matched[n] == 0:
            log_sum = -math.inf  # a zero precision zeroes this order and every higher one
        else:
            log_sum += math.log(matched[n] / total[n])
        scores[f"bleu{n + 1}"] = brevity * math.exp(log_sum / (n + 1))
    return scores


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4
         ) -> dict[str, float]:
    """Corpus BLEU-1..``max_n`` (Papineni et al. 2002), on a 0-1 scale.

    Clipped n-gram matches and hypothesis n-gram counts are summed over the corpus before dividing;
    BLEU-n is the geometric mean of precisions 1..n with uniform weights, times the corpus brevity
    penalty ``exp(1 - r/c)`` (1 when ``c >= r``). ``c`` sums the hypothesis lengths, ``r`` sums, per
    sample, the reference length closest to the hypothesis length (ties to the shorter), as
    ``pycocoevalcap`` (option ``"closest"``) and sacrebleu do.

    Unlike ``pycocoevalcap``, which adds 1e-15 / 1e-9 to avoid dividing by zero and so reports about
    1e-4 for a zero precision, a zero precision gives exactly 0 (no smoothing, like sacrebleu's
    ``smooth_method="none"``).

    Returns:
        ``{"bleu1": ..., "bleu{max_n}": ...}``.

    Raises:
        ValueError: empty corpus, mismatched lengths, a sample without references, or ``max_n < 1``.
    """
    if max_n < 1:
        raise ValueError(f"max_n must be at least 1, got {max_n}")
    return _bleu_from_tokens(*_tokenize_corpus(hypotheses, references), max_n=max_n)


# ------------------------------------------------------------------------------------------- ROUGE-L

def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (one rolling row of the usual DP table)."""
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0  # row[j - 1] of the previous row
        for j, y in enumerate(b, start=1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def _rouge_l_sample(hyp: list[str], refs: list[list[str]], beta: float = _ROUGE_BETA) -> float:
    """COCO's ROUGE-L of one hypothesis: F_beta of the best LCS precision and the best LCS recall."""
    if not hyp:
        return 0.0
    lcs = [_lcs_length(hyp, ref) for ref in refs]
    precision = max(common / len(hyp) for common in lcs)
    recall = max((common / len(ref) for common, ref in zip(lcs, refs) if ref), default=0.0)
    if precision == 0.0 or recall == 0.0:
        return 0.0
    return (1 + beta ** 2) * precision * recall / (recall + beta ** 2 * precision)


def _rouge_l_from_tokens(hyps: list[list[str]], refs: list[list[list[str]]]) -> float:
    return sum(_rouge_l_sample(h, r) for h, r in zip(hyps, refs)) / len(hyps)


def rouge_l(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """ROUGE-L F-measure with ``beta = 1.2`` as in ``pycocoevalcap``, averaged over samples, 0-1 scale.

    Per sample, the LCS precision and the LCS recall are each maximised over the references
    (possibly at different references) and then combined: ``(1+b^2) P R / (R + b^2 P)``. This is the
    COCO definition; it is not the maximum over references of the per-reference F (rouge-score's
    ``score_multi``), which can be lower. An empty hypothesis, or one sharing no token, scores 0.

    Raises:
        ValueError: empty corpus, mismatched lengths, or a sample without references.
    """
    return _rouge_l_from_tokens(*_tokenize_corpus(hypotheses, references))


# ------------------------------------------------------------------------------------------- CIDEr-D

def _tfidf(counts: Counter[Ngram], log_num_docs: float, doc_freq: Counter[Ngram]
           ) -> tuple[list[dict[Ngram, float]], list[float]]:
    """Per order: n-gram -> raw count x idf, and the vector's L2 norm (pycocoevalcap's ``counts2vec``).

    The idf is ``log(N) - log(max(1, df))``, so an n-gram absent from every reference gets ``log N``.
    """
    vectors: list[dict[Ngram, float]] = [{} for _ in range(_CIDER_MAX_N)]
    for ngram, count in counts.items():
        vectors[len(ngram) - 1][ngram] = count * (log_num_docs - math.log(max(1.0, doc_freq[ngram])))
    norms = [math.sqrt(sum(v * v for v in vec.values())) for vec in vectors]
    return vectors, norms


def _cider_d_from_tokens(hyps: list[list[str]], refs: list[list[list[str]]],
                         sigma: float = _CIDER_SIGMA) -> float:
    ref_counts = [[_ngram_counts(r, _CIDER_MAX_N) for r in sample] for sample in refs]
    # Document frequency: in how many samples' reference sets an n-gram occurs (not in how many refs).
    doc_freq: Counter[Ngram] = Counter()
    for sample in ref_counts:
        doc_freq.update(set().union(*sample))
    log_num_docs = math.log(len(hyps))

    total = 0.0
    for hyp, sample_refs, sample_counts in zip(hyps, refs, ref_counts):
        hyp_vec, hyp_norm = _tfidf(_ngram_counts(hyp, _CIDER_MAX_N), log_num_docs, doc_freq)
        sample_score = 0.0
        for ref, counts in zip(sample_refs, sample_counts):
            ref_vec, ref_norm = _tfidf(counts, log_num_docs, doc_freq)
            # pycocoevalcap measures length in bigrams; that equals the token-length difference
            # whenever both sides are non-empty, and an empty side scores 0 whatever the penalty.
            penalty = math.exp(-((len(hyp) - len(ref)) ** 2) / (2 * sigma ** 2))
            for n in range(_CIDER_MAX_N):
                if hyp_norm[n] == 0.0 or ref_norm[n] == 0.0:
                    continue
                # CIDEr-D clips each hypothesis weight at the reference's (repeats earn nothing more).
                dot = sum(min(w, ref_vec[n].get(g, 0.0)) * ref_vec[n].get(g, 0.0)
                          for g, w in hyp_vec[n].items())
                sample_score += penalty * dot / (hyp_norm[n] * ref_norm[n])
        total += 10.0 * sample_score / (_CIDER_MAX_N * len(sample_refs))
    return total / len(hyps)


def cider_d(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """CIDEr-D (Vedantam et al. 2015) exactly as ``pycocoevalcap.cider.Cider`` computes it.

    N-grams of order 1..4 weighted by raw count x idf, the idf from document frequencies over this
    corpus's reference sets; per order, the cosine between hypothesis and each reference with the
    hypothesis weights clipped at the reference's, times the length penalty
    ``exp(-(len_h - len_r)^2 / (2 * 6^2))``; averaged over orders and references, times 10, averaged
    over samples. The scale is therefore 0-10-ish, not 0-1; a one-sample corpus always scores 0
    (every idf is 0), so score a whole evaluation set at once.

    Raises:
        ValueError: empty corpus, mismatched lengths, or a sample without references.
    """
    return _cider_d_from_tokens(*_tokenize_corpus(hypotheses, references))


def caption_metrics(hypotheses: Sequence[str], references: Sequence[Sequence[str]]
                    ) -> dict[str, float]:
    """All caption metrics at once, in the units papers report (COCO convention).

    Returns:
        ``bleu1``..``bleu4`` and ``rouge_l`` as percentages (x100 of :func:`bleu` and
        :func:`rouge_l`), and ``cider`` as x100 of :func:`cider_d` (so a typical COCO model reads
        about 120, not 1.2). An empty hypothesis scores 0 on every metric.

    Raises:
        ValueError: empty corpus, mismatched lengths, or a sample without references.
    """
    hyps, refs = _tokenize_corpus(hypotheses, references)
    out = {k: 100.0 * v for k, v in _bleu_from_tokens(hyps, refs, max_n=4).items()}
    out["rouge_l"] = 100.0 * _rouge_l_from_tokens(hyps, refs)
    out["cider"] = 100.0 * _cider_d_from_tokens(hyps, refs)
    return out
