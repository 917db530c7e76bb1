"""SNP-S3's significant words on the training side: the saved list, and the words found in tokens.

The list is picked once per corpus by a curation step (``vlp/curation/significant_words.py``,
``vlp significant-words``) and saved beside the shards as ``SIGNIFICANT_WORDS_FILE``. Training loads it
(``load_significant_words``) and marks, in each batch of tokenized captions, which tokens belong to
which significant-word occurrence (``significant_word_ids``, a pure function): masked significant
semantic modelling masks them, local vision-word matching pools them per word.
"""

from __future__ import annotations

import json
import re

import numpy as np

from vlp.config import ConfigError
from vlp.data.storage import Storage, join

SIGNIFICANT_WORDS_FILE = "_significant_words.json"
# Chinese words are found by greedy longest match up to this many characters (curation keeps no
# longer word).
MAX_ZH_CHARS = 4

# Han characters as BERT's tokenizer sees them (``handle_chinese_chars``); Latin letters, accented.
_CJK = ("\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002a6df\U0002a700-\U0002ceaf"
        "\U0002f800-\U0002fa1f")
_LATIN = "A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f"
WORD_RE = re.compile(f"([{_LATIN}]+)|([{_CJK}]+)")


def load_significant_words(path: str, storage: Storage | None = None) -> list[str]:
    """The words saved by ``write_significant_words``; ``path``: the JSON file or its folder."""
    storage = storage or Storage()
    if not path.endswith(".json"):
        path = join(path, SIGNIFICANT_WORDS_FILE)
    if not storage.exists(path):
        raise ConfigError(f"no significant words at {path}: run "
                          "`vlp significant-words --shards DIR` first")
    words = json.loads(storage.read_bytes(path)).get("words")
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        raise ConfigError(f"{path} has no list of words")
    return words


def find_word_spans(caption: str, words: set[str] | frozenset[str]) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of the significant words in ``caption``, in order.

    English: lowercased letter runs that are in ``words``. Chinese: greedy longest match (up to
    ``MAX_ZH_CHARS`` characters) against ``words`` along each run of Han characters.
    """
    spans = []
    for m in WORD_RE.finditer(caption):
        if m.group(1) is not None:
            if m.group(1).lower() in words:
                spans.append(m.span())
            continue
        run, base, i = m.group(2), m.start(), 0
        while i < len(run):
            for n in range(min(MAX_ZH_CHARS, len(run) - i), 0, -1):
                if run[i:i + n] in words:
                    spans.append((base + i, base + i + n))
                    i += n
                    break
            else:
                i += 1
    return spans


def significant_word_ids(captions: list[str], offsets: np.ndarray, words: set[str] | frozenset[str],
                         max_words: int = 0) -> np.ndarray:
    """Which tokens belong to which significant-word occurrence.

    Args:
        captions: the ``B`` captions as given to the tokenizer.
        offsets: ``(B, L, 2)`` character offsets per token (a fast tokenizer's
            ``return_offsets_mapping=True``); special tokens and padding are ``(0, 0)``.
        words: the significant words (lowercase; ``load_significant_words``).
        max_words: when > 0, only the first ``max_words`` occurrences of each caption are marked.

    Returns:
        int64 ``(B, L)``: 0 for tokens outside significant words, ``k`` (1-based) for the tokens of
        the caption's ``k``-th occurrence (all pieces of a word share it). A token overlapping an
        occurrence belongs to it; to the first, when it overlaps several (byte-level BPE can merge
        characters across Chinese word boundaries). Occurrences truncated away have no tokens.
    """
    offsets = np.asarray(offsets)
    if offsets.ndim != 3 or offsets.shape[0] != len(captions) or offsets.shape[2] != 2:
        raise ValueError(f"offsets must be (B={len(captions)}, L, 2), got {offsets.shape}")
    out = np.zeros(offsets.shape[:2], dtype=np.int64)
    for b, caption in enumerate(captions):
        spans = find_word_spans(caption, words)
        if max_words > 0:
            spans = spans[:max_words]
        if not spans:
            continue
        starts, ends = np.asarray(spans, dtype=np.int64).T
        tok_start, tok_end = offsets[b, :, 0], offsets[b, :, 1]
        # spans are sorted and disjoint: the first one ending after a token's start is the first
        # that can overlap it, and does when it starts before the token ends
        k = np.searchsorted(ends, tok_start, side="right")
        kc = np.minimum(k, len(spans) - 1)
        hit = (tok_end > tok_start) & (k < len(spans)) & (starts[kc] < tok_end)
        out[b] = np.where(hit, kc + 1, 0)
    return out
