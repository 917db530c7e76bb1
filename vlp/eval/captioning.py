"""Captioning evaluation: decode a caption for each held-out image or clip and score it.

For a pretraining run with the ``captioning`` objective (CoCa), ``decode_captions`` takes held-out
pairs (``vlp.eval.pairs.load_pairs``), encodes each image or clip with the visual tower (eval mode,
no mask), decodes a caption with the objective's decoder (greedy, or beam search), and detokenizes it.
The result holds hypotheses and references side by side: ``metrics()`` scores them with
``vlp.eval.caption_metrics`` (BLEU-1..4, ROUGE-L, CIDEr-D, keys prefixed ``caption/``) and
``examples(n)`` gives the first pairs for a text artifact. ``evaluate_captioning`` is the one-call form
when only the numbers are wanted.

Each pair's own caption is its only reference; web shards rarely hold several captions per image, and
CIDEr's idf then comes from the evaluated captions themselves, so compare scores between runs on the
same held-out set, not with COCO's five-reference numbers.

A run's evaluation calls ``decode_captions`` through its registration for ``captioning`` in
``vlp.eval.heads`` (settings: the ``eval.caption_*`` fields of ``vlp.eval.config``). A new caption
metric goes in ``caption_metrics``; a new decoding strategy in ``vlp.models.decoding``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from vlp.config import ConfigError
from vlp.data.transforms import decode_media, language_codes, pixels_to_model
from vlp.eval.caption_metrics import caption_metrics
from vlp.eval.pairs import PairSet

# WordPiece decodes Chinese as space-separated characters; written Chinese has no spaces (the metrics
# split CJK characters apart anyway, so this only makes the examples read as written)
_CJK_GAP = re.compile(r"(?<=[\u3400-\u9fff]) (?=[\u3400-\u9fff])")

OBJECTIVE = "captioning"


@dataclass
class CaptionResults:
    """Decoded captions of held-out items: ``hypotheses[i]`` for the item whose caption is
    ``references[i]``."""

    references: list[str]
    hypotheses: list[str]

    def metrics(self) -> dict[str, float]:
        """``caption/bleu1``..``bleu4``, ``rouge_l``, ``cider`` (COCO units: x100), plus
        ``caption/items`` and ``caption/mean_words`` (mean hypothesis length in metric tokens)."""
        scores = caption_metrics(self.hypotheses, [[r] for r in self.references])
        out = {f"caption/{k}": float(v) for k, v in scores.items()}
        out["caption/items"] = float(len(self.hypotheses))
        out["caption/mean_words"] = (sum(len(h.split()) for h in self.hypotheses)
                                     / max(1, len(self.hypotheses)))
        return out

    def examples(self, n: int = 10) -> list[tuple[str, str]]:
        """The first ``n`` ``(reference, hypothesis)`` pairs."""
        return list(zip(self.references[:n], self.hypotheses[:n]))

    def examples_text(self, n: int = 10) -> str:
        """The first ``n`` pairs as plain text, one block per item (for ``mlflow.log_text``)."""
        return "".join(f"ref: {r}\nhyp: {h}\n\n" for r, h in self.examples(n))


def captioning_objective(pretraining):
    """The ``captioning`` objective of a ``PretrainingModel`` (DDP-wrapped or not).

    Raises:
        ConfigError: the model has no such objective.
    """
    pretraining = getattr(pretraining, "module", pretraining)
    objectives = getattr(pretraining, "objectives", None)
    if objectives is None or OBJECTIVE not in objectives:
        have = ", ".join(objectives) if objectives is not None else "none (not a PretrainingModel)"
        raise ConfigError(f"captioning evaluation needs a PretrainingModel trained with the "
                          f"'{OBJECTIVE}' objective (objectives: {{{OBJECTIVE}: {{}}}}); "
                          f"its objectives: {have}")
    return objectives[OBJECTIVE]


@torch.no_grad()
def decode_captions(pretraining, tokenizer, pairs: PairSet, *, image_size: int, num_frames: int,
                    max_text_length: int, batch_size: int, device, beam_size: int = 1,
                    length_penalty: float = 0.0, max_items: int = 200) -> CaptionResults:
    """Decode a caption for each of the first ``max_items`` pairs' images or clips.

    Args:
        pretraining: the ``PretrainingModel`` (unwrapped or DDP-wrapped); run in eval mode here, its
            mode restored after.
        tokenizer: its tokenizer: ``[CLS]`` starts a caption, ``[SEP]`` ends it.
        pairs: held-out pairs (``load_pairs``); media are decoded as ``encode_images`` does (whole image,
            ``num_frames`` frames per clip, an image repeated into a still clip for a video tower).
        image_size, num_frames: the model's.
        max_text_length: most tokens per decoded caption, [CLS] and [SEP] included (at most the
            model's ``max_text_length``).
        beam_size: 1 for greedy decoding.

    Raises:
        ConfigError: no ``captioning`` objective, or a tokenizer without [CLS]/[SEP].
    """
    objective = captioning_objective(pretraining)
    pretraining = getattr(pretraining, "module", pretraining)
    start_id, eos_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    if start_id is None or eos_id is None:
        raise ConfigError("captioning needs a tokenizer with [CLS] (start) and [SEP] (end) tokens")
    if batch_size < 1 or beam_size < 1:
        raise ConfigError("captioning evaluation: batch_size and beam_size must be >= 1")
    media, references = pairs.media[:max_items], pairs.captions[:max_items]
    langs = pairs.langs[:max_items]
    was_training = pretraining.training
    pretraining.eval()
    try:
        hypotheses: list[str] = []
        for i in range(0, len(media), batch_size):
            pixels = torch.from_numpy(decode_media(media[i:i + batch_size], num_frames, image_size))
            vision = pretraining.model.encode_vision_tokens(pixels_to_model(pixels.to(device)))
            # each caption in its reference's language (the language prompt; ignored without one)
            lang = torch.from_numpy(language_codes(langs[i:i + batch_size])).to(device)
            ids = objective.generate(vision.tokens, start_id=start_id, eos_id=eos_id,
                                     max_length=max_text_length, beam_size=beam_size,
                                     length_penalty=length_penalty, lang=lang)
            hypotheses += [_CJK_GAP.sub("", t.strip()) for t in
                           tokenizer.batch_decode(ids.cpu().tolist(), skip_special_tokens=True)]
    finally:
        pretraining.train(was_training)
    return CaptionResults(list(references), hypotheses)


def evaluate_captioning(pretraining, tokenizer, pairs: PairSet, *, image_size: int, num_frames: int,
                        max_text_length: int, batch_size: int, device, beam_size: int = 1,
                        length_penalty: float = 0.0, max_items: int = 200) -> dict[str, float]:
    """Caption metrics (``caption/...``, see ``CaptionResults.metrics``) of the captions decoded for
    the first ``max_items`` pairs; arguments as ``decode_captions``. Use ``decode_captions`` to get
    the examples from the same decoding."""
    return decode_captions(pretraining, tokenizer, pairs, image_size=image_size, num_frames=num_frames,
                           max_text_length=max_text_length, batch_size=batch_size, device=device,
                           beam_size=beam_size, length_penalty=length_penalty,
                           max_items=max_items).metrics()
