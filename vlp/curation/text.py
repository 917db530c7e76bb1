"""Caption transforms: normalisation, CJK-aware length, language identification.

Pure functions over strings; the curation job applies them row by row. Web captions are bilingual
(Chinese and English at BM-6B scale), so lengths count a Chinese character as a word (Chinese has no
spaces) and language identification decides CJK by script before asking a statistical model, which is
unreliable on short Latin captions.
"""

from __future__ import annotations

import html
import re
import threading
import unicodedata
from dataclasses import dataclass

_URL_RE = re.compile(r"(?:https?://|www\.)\S+", re.IGNORECASE)
_TAG_RE = re.compile(r"<[^>]{1,200}>")
_WS_RE = re.compile(r"\s+")
# Control and format characters (zero-width spaces, BOMs, direction marks) that survive scraping.
_INVISIBLE = {"Cc", "Cf", "Cs", "Co"}


@dataclass(frozen=True)
class TextConfig:
    """Caption normalisation.

    Attributes:
        html_unescape: turn ``&amp;`` and friends into characters, drop HTML tags.
        strip_urls: remove URLs, which describe nothing in the image.
        traditional_to_simplified: convert Traditional Chinese to Simplified (OpenCC ``t2s``).
    """

    html_unescape: bool = True
    strip_urls: bool = True
    traditional_to_simplified: bool = False


def _load_once(factory):
    """A loader that builds its model once per process, even when many threads ask at once.

    Curation workers call the models from many threads; ``functools.lru_cache`` does not serialise
    concurrent first calls, so every thread would build its own copy.
    """
    lock, box = threading.Lock(), []

    def load():
        if not box:
            with lock:
                if not box:
                    box.append(factory())
        return box[0]

    return load


def _make_t2s():
    import opencc

    return opencc.OpenCC("t2s")


_t2s_converter = _load_once(_make_t2s)


def normalize_caption(text: str, config: TextConfig = TextConfig()) -> str:
    """Clean a caption: entities, tags, URLs, invisible characters, whitespace, optional t2s."""
    if config.html_unescape:
        # Twice: scraped captions are often double-escaped (``&amp;amp;``).
        text = html.unescape(html.unescape(text))
        text = _TAG_RE.sub(" ", text)
    if config.strip_urls:
        text = _URL_RE.sub(" ", text)
    text = unicodedata.normalize("NFC", text)
    text = "".join(
        " " if ch in "\t\n\r" else ch
        for ch in text
        if ch in "\t\n\r" or unicodedata.category(ch) not in _INVISIBLE
    )
    text = _WS_RE.sub(" ", text).strip()
    if config.traditional_to_simplified and any(is_han(ch) for ch in text):
        text = _t2s_converter().convert(text)
    return text


def is_han(ch: str) -> bool:
    """CJK unified ideographs (with extensions A-F) and compatibility ideographs."""
    cp = ord(ch)
    return (
        0x4E00 <= cp <= 0x9FFF
        or 0x3400 <= cp <= 0x4DBF
        or 0x20000 <= cp <= 0x2EBEF
        or 0xF900 <= cp <= 0xFAFF
    )


def _is_kana(ch: str) -> bool:
    return 0x3040 <= ord(ch) <= 0x30FF or 0x31F0 <= ord(ch) <= 0x31FF


def _is_hangul(ch: str) -> bool:
    cp = ord(ch)
    return 0xAC00 <= cp <= 0xD7AF or 0x1100 <= cp <= 0x11FF or 0x3130 <= cp <= 0x318F


def count_words(text: str) -> int:
    """Words, counting each CJK character (Han, Kana, Hangul) as one word.

    ``"a red circle"`` -> 3; ``"红色的圆"`` -> 4; ``"iPhone 手机壳"`` -> 4.
    """
    words = 0
    in_word = False
    for ch in text:
        if is_han(ch) or _is_kana(ch) or _is_hangul(ch):
            words += 1
            in_word = False
        elif ch.isalnum():
            if not in_word:
                words += 1
                in_word = True
        else:
            in_word = False
    return words


def _make_langid():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


_langid = _load_once(_make_langid)


def warm_up(config: TextConfig = TextConfig()) -> None:
    """Load the language model (and the t2s converter if used) now rather than on the first row."""
    _langid()
    if config.traditional_to_simplified:
        _t2s_converter()


def identify_language(text: str, full: bool = False) -> list[tuple[str, float]]:
    """Candidate languages with probabilities, best first (only the best when it is at least 0.5
    likely, unless ``full``).

    CJK is decided by script: Kana means Japanese, Hangul Korean, and Han characters without them
    Chinese (Traditional or Simplified; a statistical model splits these into ``zh``/``wuu``/``yue``
    on short strings). Everything else goes to py3langid's ranking.
    """
    han = kana = hangul = letters = 0
    for ch in text:
        if is_han(ch):
            han += 1
        elif _is_kana(ch):
            kana += 1
        elif _is_hangul(ch):
            hangul += 1
        elif ch.isalpha():
            letters += 1
    # A Han character carries about a word; weigh it against the letters of a Latin word.
    cjk_weight = 4 * (han + kana + hangul)
    total = cjk_weight + letters
    if total == 0:
        return [("und", 0.0)]
    if cjk_weight / total >= 0.5:
        share = cjk_weight / total
        if kana:
            return [("ja", share)]
        if hangul > han:
            return [("ko", share)]
        return [("zh", share)]
    model = _langid()
    best, prob = model.classify(text)
    if prob >= 0.5 and not full:  # the full ranking costs twice as much and is rarely needed
        return [(best, float(prob))]
    return [(lang, float(p)) for lang, p in model.rank(text)]


def detect_language(
    text: str, allowed: tuple[str, ...] | list[str], min_confidence: float
) -> tuple[str, bool]:
    """The caption's language and whether it is acceptable.

    A caption is rejected only when the best guess is outside ``allowed`` *and* at least
    ``min_confidence`` sure; an unsure guess (short captions) takes the best allowed language instead.

    Returns:
        (language code, kept)
    """
    ranking = identify_language(text)
    best, prob = ranking[0]
    if best in allowed:
        return best, True
    if prob >= min_confidence:
        return best, False
    if len(ranking) == 1:  # only the confident best came back; the fallback needs the others
        ranking = identify_language(text, full=True)
    for lang, _ in ranking:
        if lang in allowed:
            return lang, True
    return best, False
