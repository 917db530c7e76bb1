"""SNP-S3's significant words: picked once per corpus by part of speech, found again in tokens.

Curation step (``write_significant_words``): read the ``caption`` column of a curated shard folder,
count words, keep those whose part of speech is wanted (nouns, verbs, adjectives by default) and
that are not stop-like, and save the ``top_k`` most frequent in ``<shards>/_significant_words.json``
(``vlp significant-words --shards DIR``).
The training side (loading the list, finding the words again in tokenized captions) is
``vlp/data/significant_words.py``: this module only picks them.

Words and parts of speech come from resources that ship inside PyPI packages (no model download):

- English: ``lemminflect``'s bundled lexicon. ``getAllLemmas(word)`` lists every universal POS the
  word can have, with no likelihood, so the rule is *any listed POS*: a word counts when any of its
  listed POS is wanted. Proper nouns are looked up with ``upos="PROPN"`` and count as NOUN. Words
  outside the lexicon are not counted: ``getAllLemmasOOV(word, upos)`` takes the POS as input and
  returns a lemma for any string (``"the"`` as a NOUN), so it cannot tell a word's POS. The lexicon
  lists pronouns (``he``, ``this``), quantifiers and prepositions (``up``, ``over``, ``there``) as
  NOUN/ADJ/VERB, which is why the built-in stop list is long.
- Chinese: ``jieba.posseg`` with its bundled dictionary (dictionary words only, no HMM guesses), on
  runs of Han characters. jieba tags each occurrence; a word's POS is its *most frequent tag* in
  the corpus, mapped by first letter (``n*`` NOUN, ``v*`` VERB, ``a*`` ADJ, ``d*`` ADV). Words
  longer than ``MAX_ZH_CHARS`` are not kept: training finds Chinese words by greedy longest match
  up to that length.

Words are kept by surface form, lowercased (training matches surface words in captions, not
lemmas); single Latin letters are never kept. Both languages are ranked together by count (ties by
word, for a stable result). Other languages, or other POS sources, go in as another branch of
``count_words`` and of the POS rule in ``compute_significant_words``.
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Iterable


from vlp.config import ConfigError, to_dict
from vlp.data.shards import ShardFolder
from vlp.data.significant_words import MAX_ZH_CHARS, SIGNIFICANT_WORDS_FILE, WORD_RE
from vlp.data.storage import Storage, join

KNOWN_POS = ("NOUN", "VERB", "ADJ", "ADV")
_JIEBA_POS = {"n": "NOUN", "v": "VERB", "a": "ADJ", "d": "ADV"}

# Function words, pronouns, quantifiers, prepositions and adverbs the lexicon also lists as nouns,
# verbs or adjectives; light verbs and modals; pieces of contractions (``don't`` -> ``don``, ``t``).
_EN_STOP = frozenset("""
a about above across after again against ago all almost along already also although always am among
an and another any anyone anything are aren around as at away be because been before behind being
below beside besides between both but by can cannot could couldn did didn do does doesn doing don
done down during each either else enough etc even ever every everyone everything few for from
further get gets getting got gotten had hadn has hasn have haven having he her here hers herself
him himself his how however i if in inside instead into is isn it its itself just least less let
lets like ll many may me might mine more most much must mustn my myself near nearly neither never
next no nobody none nor not nothing now of off often on once one only onto or other others
otherwise our ours ourselves out outside over own per quite rather re really same shall shan she
should shouldn since so some somebody someone something sometimes somewhat still such than that the
their theirs them themselves then there these they this those though through throughout thus to
together too toward towards under until up upon us ve very via was wasn we well were weren what
whatever when where whether which while who whom whose why will with within without would wouldn
yet you your yours yourself yourselves two three four five six seven eight nine ten
""".split())

_ZH_STOP = frozenset("""
的 地 得 了 着 过 是 在 有 和 与 及 或 而 但 并 也 都 就 还 又 很 更 最 太 不 没 没有 被 把 让 给 对 从
向 往 到 为 以 于 之 其 这 那 这个 那个 这些 那些 这里 那里 这是 那是 一个 一些 一种 个 些 我 你 他 她
它 我们 你们 他们 她们 它们 自己 什么 怎么 怎样 哪 哪里 谁 会 能 可以 要 做 进行 正在 已经 等 等等 吗
呢 吧 啊 呀 哦 嗯 上 下 里 中 前 后 来 去
""".split())


@dataclass(frozen=True)
class SignificantWordsConfig:
    """Which words of a corpus are significant.

    Attributes:
        top_k: keep the most frequent ``top_k`` words (SNP-S3: 3,000).
        min_count: a word seen fewer times in the corpus is never kept.
        pos: universal POS tags that make a word significant (of NOUN, VERB, ADJ, ADV).
        extra_stop_words: removed on top of the built-in English and Chinese stop lists.
    """

    top_k: int = 3000
    min_count: int = 2
    pos: list[str] = field(default_factory=lambda: ["NOUN", "VERB", "ADJ"])
    extra_stop_words: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.top_k < 1 or self.min_count < 1:
            raise ConfigError(f"significant words: top_k and min_count must be >= 1, got "
                              f"top_k={self.top_k}, min_count={self.min_count}")
        unknown = sorted(set(self.pos) - set(KNOWN_POS))
        if unknown or not self.pos:
            raise ConfigError(f"significant words: pos must be a non-empty list of "
                              f"{list(KNOWN_POS)}, got {list(self.pos)}")


def _load_jieba_posseg():
    import jieba
    import jieba.posseg

    jieba.setLogLevel(logging.WARNING)  # silence "Building prefix dict..." on first use
    return jieba.posseg


def _english_pos(word: str) -> set[str]:
    """Every universal POS the lexicon lists for ``word`` (proper nouns as NOUN); empty if none."""
    import lemminflect

    tags = set(lemminflect.getAllLemmas(word))
    if lemminflect.getAllLemmas(word, upos="PROPN"):
        tags.add("NOUN")
    return tags


def count_words(captions: Iterable[str]) -> tuple[Counter, Counter, dict[str, Counter]]:
    """Surface-word counts of a corpus: English (lowercased letter runs), Chinese (jieba words), and
    jieba's tag counts per Chinese word."""
    en, zh_runs = Counter(), Counter()
    for caption in captions:
        for m in WORD_RE.finditer(caption or ""):
            if m.group(1) is not None:
                en[m.group(1).lower()] += 1
            else:
                zh_runs[m.group(2)] += 1
    zh, zh_tags = Counter(), defaultdict(Counter)
    posseg = _load_jieba_posseg() if zh_runs else None
    for run, n in zh_runs.items():  # each distinct run once: captions repeat phrases a lot
        # Dictionary words only (no HMM): its new-word guesses are slow (most of the time on
        # captions) and give words that a dictionary match in training would not find anyway.
        for pair in posseg.cut(run, HMM=False):
            zh[pair.word] += n
            zh_tags[pair.word][pair.flag] += n
    return en, zh, zh_tags


def compute_significant_words(captions: Iterable[str],
                              config: SignificantWordsConfig = SignificantWordsConfig()) -> dict:
    """Pick a corpus's significant words (see the module docstring for the POS rules).

    Returns:
        ``{"words": [...most frequent first...], "counts": {word: count}, "by_language":
        {"en": n, "zh": n}, "config": {...}}``; counts and languages cover the kept words only.
    """
    wanted = set(config.pos)
    stop = _EN_STOP | _ZH_STOP | {w.lower() for w in config.extra_stop_words}
    en, zh, zh_tags = count_words(captions)
    candidates: list[tuple[str, int, str]] = []
    for word, n in en.items():
        if n < config.min_count or len(word) < 2 or word in stop:
            continue
        if _english_pos(word) & wanted:
            candidates.append((word, n, "en"))
    for word, n in zh.items():
        if n < config.min_count or len(word) > MAX_ZH_CHARS or word in stop:
            continue
        tag = zh_tags[word].most_common(1)[0][0]
        if _JIEBA_POS.get(tag[:1]) in wanted:
            candidates.append((word, n, "zh"))
    candidates.sort(key=lambda c: (-c[1], c[0]))
    kept = candidates[:config.top_k]
    return {"words": [w for w, _, _ in kept], "counts": {w: n for w, n, _ in kept},
            "by_language": {lang: sum(1 for *_, l in kept if l == lang) for lang in ("en", "zh")},
            "config": to_dict(config)}


def write_significant_words(shards: str, config: SignificantWordsConfig = SignificantWordsConfig(),
                            storage: Storage | None = None) -> dict:
    """Pick the significant words of a shard folder's captions; save them beside the shards.

    Returns what was saved: ``compute_significant_words``'s result plus a ``meta`` block (the shard
    folder, the manifest's sha256, the number of captions).
    """
    storage = storage or Storage()
    folder = ShardFolder.open(shards, storage)
    captions = [c for c in folder.read_column("caption", storage) if c]
    if not captions:
        raise ConfigError(f"no captions in {shards} to pick significant words from")
    result = compute_significant_words(captions, config)
    result["meta"] = {"shards": shards, "captions": len(captions), "config": to_dict(config),
                      "manifest_sha256": folder.manifest_sha256}
    storage.write_bytes_atomic(join(shards, SIGNIFICANT_WORDS_FILE),
                               json.dumps(result, indent=1, ensure_ascii=False).encode("utf-8"))
    return result


