"""Greedy and beam search against plain per-sample loops and brute-force enumeration."""

from __future__ import annotations

import itertools
import zlib

import pytest
import torch

from vlp.models.decoding import beam_search, greedy_decode

EOS = 0


class HashLM:
    """A fixed random "language model" whose next-token logits depend on the whole prefix.

    Logits (not normalised, so the searches must cope with raw scores) come from a generator seeded by
    a stable hash of the prefix; ``eos_bias`` makes some sequences end early and others run to the end.
    """

    def __init__(self, vocab: int, seed: int, eos_bias: float = 0.0, scale: float = 2.0):
        self.vocab, self.seed, self.eos_bias, self.scale = vocab, seed, eos_bias, scale
        self._cache: dict[tuple[int, ...], torch.Tensor] = {}

    def logits(self, prefix: tuple[int, ...]) -> torch.Tensor:
        if prefix not in self._cache:
            g = torch.Generator().manual_seed(zlib.crc32(repr((self.seed, prefix)).encode()))
            row = self.scale * torch.randn(self.vocab, generator=g, dtype=torch.float64) + 3.0
            row[EOS] += self.eos_bias
            self._cache[prefix] = row
        return self._cache[prefix]

    def logp(self, prefix: tuple[int, ...]) -> torch.Tensor:
        return self.logits(prefix).log_softmax(-1)

    def __call__(self, prefixes: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.logits(tuple(p)) for p in prefixes.tolist()]).float()


def _generated(seq: list[int], prefix_len: int) -> list[int]:
    """The generated tokens of a decoded row, up to and including its first eos."""
    gen = seq[prefix_len:]
    return gen[:gen.index(EOS) + 1] if EOS in gen else gen


def _score(lm: HashLM, prefix: tuple[int, ...], gen: list[int], alpha: float) -> float:
    total = sum(lm.logp(prefix + tuple(gen[:i]))[tok].item() for i, tok in enumerate(gen))
    return total / len(gen) ** alpha


def _brute_force(lm: HashLM, prefix: tuple[int, ...], max_length: int, alpha: float
                 ) -> tuple[float, list[int]]:
    """Best score over every hypothesis beam search may return: ended by eos, or cut at max_length."""
    max_new = max_length - len(prefix)
    best = (-float("inf"), [])
    for length in range(1, max_new + 1):
        for gen in itertools.product(range(lm.vocab), repeat=length):
            if EOS in gen[:-1] or (gen[-1] != EOS and length < max_new):
                continue
            best = max(best, (_score(lm, prefix, list(gen), alpha), list(gen)))
    return best


def _greedy_reference(lm: HashLM, prefix: list[int], max_length: int) -> list[int]:
    seq = list(prefix)
    while len(seq) < max_length:
        seq.append(int(lm.logits(tuple(seq)).argmax()))
        if seq[-1] == EOS:
            break
    return seq


def _starts(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long)


@pytest.mark.parametrize("seed", range(5))
def test_greedy_matches_a_per_sample_loop(seed):
    """Batched greedy equals the plain loop per sample, eos-padded to the batch width, and the width is
    the longest sample's (so decoding stops as soon as every row has finished)."""
    lm = HashLM(vocab=7, seed=seed, eos_bias=1.5)
    starts = [[s] for s in range(1, 7)]
    out = greedy_decode(lm, _starts(starts), EOS, max_length=9)
    refs = [_greedy_reference(lm, s, 9) for s in starts]
    assert out.shape[1] == max(len(r) for r in refs)
    for row, ref in zip(out.tolist(), refs):
        assert row == ref + [EOS] * (out.shape[1] - len(ref))
    assert len({len(r) for r in refs}) > 1  # rows end at different steps, so padding is exercised


def test_greedy_with_a_multi_token_prefix():
    lm = HashLM(vocab=6, seed=11, eos_bias=1.0)
    starts = [[1, 2], [3, 4], [5, 5]]
    out = greedy_decode(lm, _starts(starts), EOS, max_length=7)
    for row, s in zip(out.tolist(), starts):
        ref = _greedy_reference(lm, s, 7)
        assert row == ref + [EOS] * (out.shape[1] - len(ref))


@pytest.mark.parametrize("alpha", [0.0, 1.0, 0.6, -0.5])
@pytest.mark.parametrize("seed", range(3))
def test_exhaustive_beam_finds_the_brute_force_optimum(alpha, seed):
    """With beam_size = vocab ** depth nothing is pruned, so beam search (including its early stop)
    must return the best of all sequences up to length 4 over a vocabulary of 5, for any length
    normalisation, with the score of the sequence it returns."""
    lm = HashLM(vocab=5, seed=seed, eos_bias=0.5)
    starts = [[1], [2], [4]]
    seqs, scores = beam_search(lm, _starts(starts), EOS, max_length=5, beam_size=5 ** 4,
                               length_penalty=alpha)
    for row, score, start in zip(seqs.tolist(), scores.tolist(), starts):
        best_score, best_gen = _brute_force(lm, tuple(start), 5, alpha)
        assert score == pytest.approx(best_score, rel=1e-5, abs=1e-5)
        assert _generated(row, 1) == best_gen
        assert row[1 + len(best_gen):] == [EOS] * (len(row) - 1 - len(best_gen))


def test_exhaustive_beam_with_a_two_token_prefix():
    lm = HashLM(vocab=4, seed=7, eos_bias=0.3)
    starts = [[1, 3], [2, 2]]
    seqs, scores = beam_search(lm, _starts(starts), EOS, max_length=6, beam_size=4 ** 4)
    for row, score, start in zip(seqs.tolist(), scores.tolist(), starts):
        best_score, best_gen = _brute_force(lm, tuple(start), 6, 0.0)
        assert row[:2] == start
        assert score == pytest.approx(best_score, rel=1e-5, abs=1e-5)
        assert _generated(row, 2) == best_gen


@pytest.mark.parametrize("beam_size", [1, 2, 3, 5, 10])
@pytest.mark.parametrize("alpha", [0.0, 1.0])
@pytest.mark.parametrize("seed", range(4))
def test_small_beams_never_beat_brute_force_and_report_true_scores(beam_size, alpha, seed):
    """A narrow beam may miss the optimum but cannot exceed it, and the score it reports is the real
    normalised log-probability of the sequence it returns."""
    lm = HashLM(vocab=5, seed=100 + seed, eos_bias=0.5)
    starts = [[1], [2], [3], [4]]
    seqs, scores = beam_search(lm, _starts(starts), EOS, max_length=5, beam_size=beam_size,
                               length_penalty=alpha)
    for row, score, start in zip(seqs.tolist(), scores.tolist(), starts):
        best_score, _ = _brute_force(lm, tuple(start), 5, alpha)
        assert score <= best_score + 1e-5
        assert score == pytest.approx(_score(lm, tuple(start), _generated(row, 1), alpha), abs=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_beam_of_one_scores_at_least_the_greedy_sequence(seed):
    """Greedy's path is always among a width-1 beam's candidates, so the beam cannot score lower."""
    lm = HashLM(vocab=6, seed=200 + seed, eos_bias=0.5)
    starts = [[1], [2], [3]]
    greedy = greedy_decode(lm, _starts(starts), EOS, max_length=7)
    _, scores = beam_search(lm, _starts(starts), EOS, max_length=7, beam_size=1)
    for row, score, start in zip(greedy.tolist(), scores.tolist(), starts):
        assert score >= _score(lm, tuple(start), _generated(row, 1), 0.0) - 1e-5


def _bigram_lm(table: torch.Tensor):
    """Next-token log-probs that depend only on the last token: ``table[last]``."""
    return lambda prefixes: table[prefixes[:, -1]]


def test_eos_stops_a_sequence_and_pads_it():
    """Start 1 -> 2 -> eos; start 3 -> 4 -> 4 -> ... never ends. The finished row is eos-padded to the
    unfinished one's full width; a batch where all rows end early comes back shorter than max_length."""
    table = torch.full((5, 5), -20.0)
    table[1, 2] = table[2, EOS] = table[3, 4] = table[4, 4] = table[EOS, EOS] = 0.0
    lm = _bigram_lm(table.log_softmax(-1))
    expected_long = [[1, 2, EOS, EOS, EOS, EOS], [3, 4, 4, 4, 4, 4]]
    assert greedy_decode(lm, _starts([[1], [3]]), EOS, 6).tolist() == expected_long
    seqs, _ = beam_search(lm, _starts([[1], [3]]), EOS, 6, beam_size=3)
    assert seqs.tolist() == expected_long
    assert greedy_decode(lm, _starts([[1], [2]]), EOS, 6).tolist() == [[1, 2, EOS], [2, EOS, EOS]]
    seqs, _ = beam_search(lm, _starts([[1], [2]]), EOS, 6, beam_size=3)
    assert seqs.tolist() == [[1, 2, EOS], [2, EOS, EOS]]


@pytest.mark.parametrize("beam_size,alpha", [(1, 0.0), (3, 0.0), (4, 1.0), (8, 0.6), (5, -0.5)])
def test_a_batch_decodes_like_each_sample_alone(beam_size, alpha):
    """Batching is invisible: each row equals the sample decoded alone (eos-padded to the batch width),
    with bitwise-equal beam scores."""
    lm = HashLM(vocab=9, seed=5, eos_bias=1.0)
    starts = [[s] for s in range(1, 9)]
    batch = greedy_decode(lm, _starts(starts), EOS, 10)
    seqs, scores = beam_search(lm, _starts(starts), EOS, 10, beam_size, alpha)
    for i, s in enumerate(starts):
        alone = greedy_decode(lm, _starts([s]), EOS, 10)[0].tolist()
        assert batch[i].tolist() == alone + [EOS] * (batch.shape[1] - len(alone))
        alone_seq, alone_score = beam_search(lm, _starts([s]), EOS, 10, beam_size, alpha)
        alone_row = alone_seq[0].tolist()
        assert seqs[i].tolist() == alone_row + [EOS] * (seqs.shape[1] - len(alone_row))
        assert torch.equal(scores[i], alone_score[0])


def test_beam_rows_are_grouped_per_sample_for_repeat_interleave():
    """The documented layout: rows b*K .. b*K+K-1 are sample b's, so a per-sample context expanded
    with repeat_interleave(K) lines up with the prefixes (here the context is the start token)."""
    k, starts = 3, _starts([[1], [2], [3], [4]])
    context = starts[:, 0].repeat_interleave(k)
    table = HashLM(vocab=6, seed=9, eos_bias=0.5)

    def lm(prefixes):
        assert torch.equal(prefixes[:, 0], context)
        return table(prefixes)

    seqs, _ = beam_search(lm, starts, EOS, 6, beam_size=k)
    assert torch.equal(seqs[:, 0], starts[:, 0])


def test_degenerate_lengths_and_invalid_arguments():
    lm = HashLM(vocab=4, seed=1)
    starts = _starts([[1], [2]])
    assert torch.equal(greedy_decode(lm, starts, EOS, 1), starts)
    seqs, scores = beam_search(lm, starts, EOS, 1, beam_size=2)
    assert torch.equal(seqs, starts) and torch.equal(scores, torch.zeros(2))
    with pytest.raises(ValueError, match="LongTensor"):
        greedy_decode(lm, torch.tensor([1, 2]), EOS, 5)
    with pytest.raises(ValueError, match="shorter than the start prefix"):
        beam_search(lm, _starts([[1, 2, 3]]), EOS, 2, beam_size=2)
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(lm, starts, EOS, 5, beam_size=0)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        greedy_decode(lm, starts, 7, 5)


class _TableLM(HashLM):
    """A bigram table behind HashLM's interface, for the brute-force helpers."""

    def __init__(self, table: torch.Tensor):
        super().__init__(vocab=table.shape[1], seed=0)
        self.table = table.double()

    def logits(self, prefix: tuple[int, ...]) -> torch.Tensor:
        return self.table[prefix[-1]]


def test_length_normalisation_keeps_searching_after_a_short_caption_finishes():
    """With length_penalty=1 a short caption that ends first (eos at -0.69) must not stop the search
    while a longer one (a costly first token, then near-certain ones) can still average better: the
    early stop has to bound by the longest reachable length, not the next one."""
    a, b = 2, 3
    table = torch.full((4, 4), -9.0)
    table[1, EOS], table[1, a] = 0.0, -0.8   # from the start token: eos likelier than a
    table[a, b] = table[b, b] = 5.0          # then b, b, ... almost surely
    lm = _TableLM(table)
    seqs, scores = beam_search(lm, _starts([[1]]), EOS, max_length=6, beam_size=2, length_penalty=1.0)
    best_score, best_gen = _brute_force(lm, (1,), 6, 1.0)
    assert len(best_gen) > 1  # the longer caption is the optimum here ...
    assert _generated(seqs[0].tolist(), 1) == best_gen  # ... and beam search finds it
    assert scores[0].item() == pytest.approx(best_score, rel=1e-5)
