"""Video question answering by masked language modelling (LAVENDER: answers fill a [MASK]).

From held-out clip-caption pairs, ``build_questions`` makes fill-in questions: for each caption and
each question type of the answer vocabulary (by default the sample videos' colours, shapes and
motion words, in English and Chinese), the first occurrence of a word of that type is the answer; the
question is the caption with that word masked, and the candidates are all words of that type in the
caption's language (the answer among them). A caption yields one question per type it mentions, none
when it mentions no answer word.

The model answers with the conditioned ``mlm`` objective's head, in eval mode and without any random
masking: visual tokens from ``model.encode_vision_tokens`` (the whole clip), the question through
``model.fuse`` and the head. A candidate that tokenizes into n tokens is scored on the question with n
[MASK] tokens in place of the answer, as the sum of the log-probabilities of its tokens at those masks
(the masks are predicted independently, as MLM trains them); candidates of one token count share one
forward pass. The answer is the highest-scoring candidate. A question is skipped (``qa/skipped``) when
a candidate's tokens do not line up with the word's characters (a byte-level BPE token that crosses
the word's boundary: most Chinese questions under a BPE tokenizer, which merges across words; the
WordPiece tokenizer splits Chinese into characters and never does) or when truncation at
``max_text_length`` cuts the word off.

Caveat of fill-in questions: the rest of the caption stays visible, so some answers follow from the
text alone ("moves from the [MASK] to the right" can only be "left" on the sample data); ``qa/chance``
is the chance of a guess that ignores the text too. The colour and shape questions, and "slowly
[MASK]" (appears or disappears: the order of the frames), need the video.

An unconditioned ``mlm`` (``conditioned: false``, BERT from text alone) cannot answer about a video,
so it is refused rather than evaluated (and a run's evaluation, ``vlp.eval.heads``, only calls this
for a conditioned one). New question types are new entries of the ``vocabulary`` argument:
``{type: {lang: [words]}}``; new words of the sample data go in ``vlp.data.sample_vocabulary``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from vlp.batch import ATTENTION_MASK, INPUT_IDS
from vlp.config import ConfigError
from vlp.data.sample_vocabulary import COLOURS, SHAPES, VIDEO_COLOURS, VIDEO_SHAPES
from vlp.data.tokenizer import tokenize_captions
from vlp.data.transforms import decode_media, pixels_to_model
from vlp.eval.pairs import PairSet

Vocabulary = dict[str, dict[str, list[str]]]  # question type -> language -> answer words


def default_vocabulary() -> Vocabulary:
    """The sample videos' words: their colours and shapes (``vlp.data.sample_vocabulary``, which the
    video generator draws from), and motion words.

    Motion words are the ones that tell the eight motions apart (the first one in each caption is
    asked about): where a move starts (left/right/top/bottom), grows or shrinks, appears or
    disappears; in Chinese 左/右/上/下, 变大/变小, 出现/消失.
    """
    return {
        "colour": {"en": list(VIDEO_COLOURS), "zh": [COLOURS[c][1] for c in VIDEO_COLOURS]},
        "shape": {"en": list(VIDEO_SHAPES), "zh": [SHAPES[s] for s in VIDEO_SHAPES]},
        "motion": {"en": ["left", "right", "top", "bottom", "grows", "shrinks", "appears",
                          "disappears"],
                   "zh": ["左", "右", "上", "下", "变大", "变小", "出现", "消失"]},
    }


@dataclass(frozen=True)
class Question:
    """One fill-in question about pair ``index``: ``caption[start:end]`` is the ``answer``."""

    index: int
    kind: str
    caption: str
    start: int
    end: int
    answer: str
    candidates: tuple[str, ...]  # every word of the type in the caption's language, answer included

    def filled(self, word: str) -> str:
        """The caption with ``word`` in the answer's place."""
        return self.caption[:self.start] + word + self.caption[self.end:]


@lru_cache(maxsize=256)
def _word_pattern(word: str) -> re.Pattern:
    # Latin words match whole words only ("appears" is not inside "disappears"); Chinese has no
    # spaces, so its words match anywhere (every CJK character is \w, so \b would never fire).
    if word.isascii():
        return re.compile(r"(?<!\w)" + re.escape(word) + r"(?!\w)", re.IGNORECASE)
    return re.compile(re.escape(word))


def _first_match(caption: str, words: list[str]) -> tuple[int, int] | None:
    """The span of the first occurrence of any of ``words`` (the longest one on a tie)."""
    spans = [(m.start(), m.end()) for m in (_word_pattern(w).search(caption) for w in words) if m]
    return min(spans, key=lambda span: (span[0], span[0] - span[1]), default=None)


def build_questions(captions: list[str], langs: list[str],
                    vocabulary: Vocabulary | None = None) -> list[Question]:
    """One question per caption and question type it mentions, in caption order then type order.

    Args:
        captions, langs: the pairs' captions and their languages (a ``PairSet``'s).
        vocabulary: ``{type: {lang: [words]}}``; default ``default_vocabulary()``. A type needs at
            least two words in a language to ask anything in it.
    """
    vocabulary = default_vocabulary() if vocabulary is None else vocabulary
    questions = []
    for index, (caption, lang) in enumerate(zip(captions, langs)):
        for kind, by_lang in vocabulary.items():
            words = by_lang.get(lang) or []
            if len(words) < 2:
                continue
            span = _first_match(caption, words)
            if span is None:
                continue
            found = caption[span[0]:span[1]]
            answer = next(w for w in words if w.lower() == found.lower())
            questions.append(Question(index, kind, caption, span[0], span[1], answer, tuple(words)))
    return questions


def _word_tokens(text: str, offsets: np.ndarray, attention: np.ndarray, start: int,
                 end: int) -> np.ndarray | None:
    """Token positions covering exactly characters ``[start, end)`` of ``text`` (a byte-level BPE
    token may also hold the space before the word); None when a token straddles a boundary or the
    word was cut off by truncation."""
    real = attention.astype(bool) & (offsets[:, 1] > offsets[:, 0])  # not padding, not specials
    inside = real & (offsets[:, 0] < end) & (offsets[:, 1] > start)
    pos = np.flatnonzero(inside)
    if not len(pos) or offsets[pos[-1], 1] != end:
        return None
    first = int(offsets[pos[0], 0])
    if first != start and not text[first:start].isspace():
        return None
    return pos


@dataclass
class _Inputs:
    """The masked inputs of a question set and which token of which candidate each mask scores."""

    input_ids: np.ndarray  # (R, L): questions with as many masks as a candidate has tokens
    attention_mask: np.ndarray  # (R, L)
    pair: np.ndarray  # (R,): the pair (clip) each input asks about
    # one entry per token of every candidate of every answered question:
    row: np.ndarray  # the input it is read from
    position: np.ndarray  # the mask's position in that input
    target: np.ndarray  # the candidate's token id there
    choice: np.ndarray  # index into ``choices``
    choices: list[tuple[int, int]]  # (question, candidate)
    skipped: set[int]


def _prepare(tokenizer, questions: list[Question], max_text_length: int, mask_id: int) -> _Inputs:
    """Tokenize every question with every candidate, mask the candidate's tokens, and share one
    masked input among the candidates of a question that give the same one (same token count)."""
    texts = [(qi, ci, q.filled(c)) for qi, q in enumerate(questions) for ci, c in enumerate(q.candidates)]
    tok = tokenize_captions(tokenizer, [t for _, _, t in texts], max_text_length, offsets=True)
    found: list[tuple[int, int, np.ndarray, np.ndarray] | None] = []
    skipped: set[int] = set()
    for k, (qi, ci, text) in enumerate(texts):
        q = questions[qi]
        pos = _word_tokens(text, tok["offsets"][k], tok[ATTENTION_MASK][k], q.start,
                           q.start + len(q.candidates[ci]))
        if pos is None:
            skipped.add(qi)
        found.append(None if pos is None else (qi, ci, pos, tok[INPUT_IDS][k]))
    rows: dict[tuple[int, bytes], int] = {}
    ids_rows, attn_rows, pairs, choices = [], [], [], []
    row, position, target, choice = [], [], [], []
    for k, item in enumerate(found):
        if item is None or item[0] in skipped:
            continue
        qi, ci, pos, ids = item
        masked = ids.copy()
        masked[pos] = mask_id
        key = (qi, masked.tobytes())
        if key not in rows:
            rows[key] = len(ids_rows)
            ids_rows.append(masked)
            attn_rows.append(tok[ATTENTION_MASK][k])
            pairs.append(questions[qi].index)
        row += [rows[key]] * len(pos)
        position += pos.tolist()
        target += ids[pos].tolist()
        choice += [len(choices)] * len(pos)
        choices.append((qi, ci))
    empty = np.zeros((0, max_text_length), dtype=np.int64)
    return _Inputs(np.stack(ids_rows) if ids_rows else empty,
                   np.stack(attn_rows) if attn_rows else empty, _ints(pairs), _ints(row),
                   _ints(position), _ints(target), _ints(choice), choices, skipped)


def _ints(values: list[int]) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


def _qa_parts(pretraining):
    """(DualEncoder, mlm objective) of a PretrainingModel whose mlm reads the video."""
    objectives = getattr(pretraining, "objectives", None)
    if objectives is None:
        raise ConfigError(f"video QA needs the PretrainingModel (model and objectives), got "
                          f"{type(pretraining).__name__}")
    if "mlm" not in objectives:
        raise ConfigError("video QA fills a [MASK] with the mlm objective's head: train with "
                          "objectives.mlm (conditioned: true) to evaluate it")
    mlm = objectives["mlm"]
    if not mlm.cfg.conditioned:
        raise ConfigError("video QA needs the video: objectives.mlm has conditioned: false, so its "
                          "head predicts from the text alone; train with conditioned: true")
    return pretraining.model, mlm


@torch.no_grad()
def score_questions(pretraining, tokenizer, media: list, questions: list[Question], *,
                    image_size: int, num_frames: int, max_text_length: int, batch_size: int,
                    device) -> list[np.ndarray | None]:
    """Each question's candidate scores (summed log-probabilities of the candidate's tokens at the
    masks), in ``candidates`` order; None for a skipped question. Runs the model as it is (the
    caller puts it in eval mode). ``media``: every pair's clip, indexed by ``Question.index``."""
    model, mlm = _qa_parts(pretraining)
    inputs = _prepare(tokenizer, questions, max_text_length, pretraining.mask_id)
    device = torch.device(device)
    token_logp = np.zeros(len(inputs.target), dtype=np.float64)
    clips = np.unique(inputs.pair)
    for i in range(0, len(clips), batch_size):  # each clip is encoded once, then all its questions
        chunk = clips[i:i + batch_size]
        pixels = torch.from_numpy(decode_media([media[j] for j in chunk], num_frames, image_size))
        vision = model.encode_vision_tokens(pixels_to_model(pixels.to(device))).tokens
        rows = np.flatnonzero(np.isin(inputs.pair, chunk))
        for r in range(0, len(rows), batch_size):
            part = rows[r:r + batch_size]
            context = vision[torch.from_numpy(np.searchsorted(chunk, inputs.pair[part])).to(device)]
            hidden = model.fuse(context, torch.from_numpy(inputs.input_ids[part]).to(device),
                                torch.from_numpy(inputs.attention_mask[part]).to(device)).text
            tokens = np.flatnonzero(np.isin(inputs.row, part))
            # each mask once through the head, however many candidates read it
            where, slot = np.unique(np.searchsorted(part, inputs.row[tokens]) * hidden.shape[1]
                                    + inputs.position[tokens], return_inverse=True)
            at = torch.from_numpy(where).to(device)
            logp = torch.log_softmax(mlm.logits(hidden.flatten(0, 1)[at]).float(), dim=-1)
            picked = logp[torch.from_numpy(slot).to(device),
                          torch.from_numpy(inputs.target[tokens]).to(device)]
            token_logp[tokens] = picked.double().cpu().numpy()
    per_choice = np.bincount(inputs.choice, weights=token_logp, minlength=len(inputs.choices))
    scores: list[np.ndarray | None] = [
        None if qi in inputs.skipped else np.full(len(q.candidates), np.nan)
        for qi, q in enumerate(questions)]
    for (qi, ci), s in zip(inputs.choices, per_choice):
        scores[qi][ci] = s
    return scores


def evaluate_video_qa(pretraining, tokenizer, pairs: PairSet, *, image_size: int, num_frames: int,
                      max_text_length: int, batch_size: int, device,
                      vocabulary: Vocabulary | None = None) -> dict[str, float]:
    """Fill-in video QA on held-out pairs; accuracies in percent.

    Args:
        pretraining: the (unwrapped) ``PretrainingModel``; its objectives must hold a conditioned
            ``mlm``.
        pairs: held-out clips and captions (``load_pairs(..., frames=True)``).
        vocabulary: ``{type: {lang: [words]}}``; default the sample videos' (``default_vocabulary``).

    Returns:
        ``qa/accuracy``, ``qa/chance`` (mean of 1 / candidates), ``qa/<type>_accuracy``,
        ``qa/questions`` (answered), ``qa/skipped``.

    Raises:
        ConfigError: no conditioned mlm objective, or no caption mentions an answer word.
    """
    _qa_parts(pretraining)
    questions = build_questions(pairs.captions, pairs.langs, vocabulary)
    if not questions:
        raise ConfigError("video QA: no held-out caption contains a word of the answer vocabulary "
                          f"({', '.join(default_vocabulary() if vocabulary is None else vocabulary)})")
    was_training = pretraining.training
    pretraining.eval()
    try:
        scores = score_questions(pretraining, tokenizer, pairs.media, questions,
                                 image_size=image_size, num_frames=num_frames,
                                 max_text_length=max_text_length, batch_size=batch_size,
                                 device=device)
    finally:
        pretraining.train(was_training)
    answered = [(q, s) for q, s in zip(questions, scores) if s is not None]
    metrics = {"qa/questions": float(len(answered)),
               "qa/skipped": float(len(questions) - len(answered))}
    if not answered:
        return metrics
    right = np.array([q.candidates[int(np.argmax(s))] == q.answer for q, s in answered])
    metrics["qa/accuracy"] = 100.0 * float(right.mean())
    metrics["qa/chance"] = 100.0 * float(np.mean([1.0 / len(q.candidates) for q, _ in answered]))
    kinds = np.array([q.kind for q, _ in answered])
    for kind in dict.fromkeys(kinds.tolist()):
        metrics[f"qa/{kind}_accuracy"] = 100.0 * float(right[kinds == kind].mean())
    return metrics
