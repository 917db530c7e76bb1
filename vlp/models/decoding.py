"""Autoregressive decoding for captioning heads, independent of any model: greedy and beam search.

The model enters only through ``next_logits(prefix) -> scores``: given a ``(N, t)`` LongTensor of
prefixes it returns ``(N, vocab)`` logits or log-probabilities for the next token of each (both are
accepted: beam search applies ``log_softmax``, which leaves log-probabilities unchanged, and greedy
search only takes the argmax). The caller closes over its model and image context; in beam search the
``beam_size`` prefixes of sample ``b`` are rows ``b * beam_size .. b * beam_size + beam_size - 1``, so
the caller's per-sample context lines up after ``context.repeat_interleave(beam_size, dim=0)``.

Both searches run batched over samples and beams; the only Python loop is over time steps, with one
host synchronisation per step (to stop once everything has finished). Outputs include the start
prefix, have at most ``max_length`` columns, and are padded with ``eos_id`` after each sequence's first
generated ``eos_id``. Other searches (sampling, constrained beams) go here as further functions of the
same shape.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

NextLogits = Callable[[torch.Tensor], torch.Tensor]


def _check_inputs(start_ids: torch.Tensor, max_length: int) -> None:
    if start_ids.dim() != 2 or start_ids.shape[1] < 1 or start_ids.dtype != torch.long:
        raise ValueError(f"start_ids must be a (batch, prefix_len >= 1) LongTensor, got "
                         f"{start_ids.dtype} of shape {tuple(start_ids.shape)}")
    if max_length < start_ids.shape[1]:
        raise ValueError(f"max_length {max_length} is shorter than the start prefix "
                         f"({start_ids.shape[1]} tokens)")


def _check_scores(scores: torch.Tensor, rows: int, eos_id: int) -> None:
    if scores.dim() != 2 or scores.shape[0] != rows:
        raise ValueError(f"next_logits returned shape {tuple(scores.shape)}, expected ({rows}, vocab)")
    if not 0 <= eos_id < scores.shape[1]:
        raise ValueError(f"eos_id {eos_id} is outside the vocabulary of size {scores.shape[1]}")


def greedy_decode(next_logits: NextLogits, start_ids: torch.Tensor, eos_id: int,
                  max_length: int) -> torch.Tensor:
    """Pick the highest-scoring next token until every sequence has emitted ``eos_id``.

    Args:
        next_logits: prefixes ``(B, t)`` -> next-token scores ``(B, vocab)``; always called on the
            whole batch (finished rows too), so it never has to subset its context.
        start_ids: ``(B, P)`` start prefix, usually ``P = 1`` (the start token); it is not checked
            for ``eos_id``.
        eos_id: end-of-sequence token.
        max_length: most columns of the output, start prefix included.

    Returns:
        ``(B, T)`` LongTensor, ``T <= max_length``: the start prefix then the generated tokens; after a
        row's first ``eos_id`` it holds only ``eos_id``. ``T < max_length`` only when every row has
        finished. Ties go to the lowest token id (``argmax``).
    """
    _check_inputs(start_ids, max_length)
    seq = start_ids
    finished = torch.zeros(seq.shape[0], dtype=torch.bool, device=seq.device)
    while seq.shape[1] < max_length:
        scores = next_logits(seq)
        _check_scores(scores, seq.shape[0], eos_id)
        token = scores.argmax(dim=-1).masked_fill(finished, eos_id)
        seq = torch.cat([seq, token.unsqueeze(1)], dim=1)
        finished |= token == eos_id
        if bool(finished.all()):
            break
    return seq


def _length_norm(length: int, length_penalty: float) -> float:
    return float(length) ** length_penalty


def _keep_best(seqs: torch.Tensor, scores: torch.Tensor, new_seqs: torch.Tensor,
               new_scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best of two pools per sample: ``(B, n, L)`` sequences with ``(B, n)`` scores each."""
    all_seqs, all_scores = torch.cat([seqs, new_seqs], dim=1), torch.cat([scores, new_scores], dim=1)
    top, idx = all_scores.topk(k, dim=1)
    return all_seqs.gather(1, idx.unsqueeze(-1).expand(-1, -1, all_seqs.shape[2])), top


def _best_reachable(alive_best: torch.Tensor, generated: int, max_new: int,
                    length_penalty: float) -> torch.Tensor:
    """Upper bound on the normalised score of any continuation of the alive beams.

    Log-probabilities are <= 0, so a continuation's raw sum is at most ``alive_best <= 0``, and dividing
    it by the largest ``L ** length_penalty`` over the lengths still reachable gives the bound.
    """
    norm = max(_length_norm(generated + 1, length_penalty), _length_norm(max_new, length_penalty))
    return alive_best / norm


def beam_search(next_logits: NextLogits, start_ids: torch.Tensor, eos_id: int, max_length: int,
                beam_size: int, length_penalty: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Beam search returning the best hypothesis per sample.

    A hypothesis is scored ``sum(log p) / L ** length_penalty``, ``L`` the number of generated tokens
    (its ``eos_id`` included, the start prefix not): plain length normalisation as in Hugging Face
    ``generate``, not GNMT's ``((5 + L) / 6) ** alpha``. ``0`` (the default) ranks by total
    log-probability; positive values favour longer captions.

    Each step expands every alive beam by every token. Candidates ending in ``eos_id`` join a pool of
    the ``beam_size`` best finished hypotheses per sample; the ``beam_size`` best others stay alive.
    Beams still alive at ``max_length`` are finished there, unterminated. A sample stops once no alive
    beam can still beat its best finished hypothesis (an exact bound, not a heuristic), so with
    ``beam_size >= vocab ** (max_length - P)`` the result is the exact optimum over all sequences.

    Args:
        next_logits: prefixes ``(B * beam_size, t)`` -> next-token scores ``(B * beam_size, vocab)``;
            rows ``b * beam_size ..`` ``b * beam_size + beam_size - 1`` are sample ``b``'s beams.
        start_ids: ``(B, P)`` start prefix, usually ``P = 1``.
        eos_id: end-of-sequence token.
        max_length: most columns of the output, start prefix included.
        beam_size: alive beams (and finished hypotheses) kept per sample.
        length_penalty: exponent of the length normalisation.

    Returns:
        ``(sequences, scores)``: ``(B, T)`` LongTensor, ``T <= max_length``, the start prefix then the
        best hypothesis, padded with ``eos_id`` after its ``eos_id``; and ``(B,)`` float32 normalised
        scores of those hypotheses (0 when ``max_length`` leaves nothing to generate).
    """
    _check_inputs(start_ids, max_length)
    if beam_size < 1:
        raise ValueError(f"beam_size must be at least 1, got {beam_size}")
    batch, prefix_len = start_ids.shape
    device, k = start_ids.device, beam_size
    max_new = max_length - prefix_len
    if max_new == 0:
        return start_ids.clone(), torch.zeros(batch, device=device)

    alive_seq = start_ids.unsqueeze(1).expand(batch, k, prefix_len)
    # All beams start identical: keep one alive so that the top-k never holds duplicates.
    alive_score = torch.full((batch, k), -torch.inf, device=device)
    alive_score[:, 0] = 0.0
    fin_seq = torch.full((batch, k, max_length), eos_id, dtype=torch.long, device=device)
    fin_score = torch.full((batch, k), -torch.inf, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)

    for generated in range(1, max_new + 1):  # tokens generated once this step is taken
        t = alive_seq.shape[2]
        scores = next_logits(alive_seq.reshape(batch * k, t))
        _check_scores(scores, batch * k, eos_id)
        # float32: summing fp16/bf16 log-probabilities over a caption loses the ranking.
        logp = scores.float().log_softmax(dim=-1).view(batch, k, -1)
        vocab = logp.shape[-1]
        cand = alive_score.unsqueeze(-1) + logp

        ended = F.pad(alive_seq, (0, max_length - t), value=eos_id)  # eos at column t, then padding
        ended_score = cand[..., eos_id] / _length_norm(generated, length_penalty)
        fin_seq, fin_score = _keep_best(fin_seq, fin_score, ended, ended_score, k)

        cand[..., eos_id] = -torch.inf
        alive_score, flat = cand.view(batch, k * vocab).topk(k, dim=1)
        parent = (flat // vocab).unsqueeze(-1).expand(-1, -1, t)
        alive_seq = torch.cat([alive_seq.gather(1, parent), (flat % vocab).unsqueeze(-1)], dim=2)

        if generated < max_new:
            bound = _best_reachable(alive_score.max(dim=1).values, generated, max_new, length_penalty)
            done |= fin_score.max(dim=1).values >= bound
            # A stopped sample's beams get -inf, so its finished pool is final, and decoding it
            # within a batch gives what decoding it alone (which would stop here) gives.
            alive_score = alive_score.masked_fill(done.unsqueeze(1), -torch.inf)
            if bool(done.all()):
                break
    else:
        truncated = alive_score / _length_norm(max_new, length_penalty)
        fin_seq, fin_score = _keep_best(fin_seq, fin_score, alive_seq, truncated, k)

    best = fin_score.argmax(dim=1)
    rows = torch.arange(batch, device=device)
    seq, score = fin_seq[rows, best], fin_score[rows, best]
    is_eos = seq[:, prefix_len:] == eos_id
    lengths = torch.where(is_eos.any(dim=1), prefix_len + is_eos.int().argmax(dim=1) + 1, max_length)
    return seq[:, :int(lengths.max())], score
