"""Caption transforms: normalisation, CJK-aware word counts, language identification."""

import pytest

from vlp.curation.filters import CaptionItem, CaptionLengthFilter, LanguageFilter
from vlp.curation.text import TextConfig, count_words, detect_language, normalize_caption


def test_normalize_unescapes_html_strips_tags_urls_and_invisible_characters():
    raw = "  a red&amp;amp;blue <b>circle</b>\u200b see https://x.com/a.jpg\n\tnow  "
    assert normalize_caption(raw) == "a red&blue circle see now"


def test_normalize_keeps_what_is_switched_off():
    cfg = TextConfig(html_unescape=False, strip_urls=False)
    assert normalize_caption("a &amp; b www.x.com", cfg) == "a &amp; b www.x.com"


def test_traditional_to_simplified_only_when_asked():
    assert normalize_caption("黃色三角形") == "黃色三角形"
    assert normalize_caption("黃色三角形", TextConfig(traditional_to_simplified=True)) == "黄色三角形"


@pytest.mark.parametrize("text,words", [
    ("a red circle", 3), ("红色的圆", 4), ("iPhone 手机壳", 4), ("", 0), ("---", 0),
    ("日本語テキスト", 7), ("3 blue squares, 2 red", 5),
])
def test_count_words_counts_each_cjk_character(text, words):
    assert count_words(text) == words


@pytest.mark.parametrize("text,lang", [
    ("a red circle", "en"), ("orange hexagon", "en"), ("two blue squares on a white background", "en"),
    ("白色背景上的两个蓝色正方形", "zh"), ("黃色三角形", "zh"), ("iPhone 手机壳 透明", "zh"),
])
def test_allowed_languages_are_kept_and_named(text, lang):
    assert detect_language(text, ("zh", "en"), 0.3) == (lang, True)


@pytest.mark.parametrize("text,lang", [
    ("中央に大きな赤い丸があります", "ja"),
    ("большой красный круг в центре изображения", "ru"),
    ("un grand cercle rouge au centre de l'image avec un fond blanc", "fr"),
])
def test_confident_other_languages_are_rejected(text, lang):
    assert detect_language(text, ("zh", "en"), 0.3) == (lang, False)


def test_language_filter_fills_lang_and_names_its_reason():
    item = CaptionItem("白色背景上的两个蓝色正方形")
    assert LanguageFilter().check(item) is None and item.lang == "zh"
    assert LanguageFilter(allowed=["en"]).check(CaptionItem("白色背景上的蓝色正方形")) == "language_not_allowed"


def test_caption_length_filter_reasons_in_chars_and_words():
    f = CaptionLengthFilter(min_chars=5, max_chars=20, min_words=2, max_words=4)
    assert f.check(CaptionItem("ok")) == "caption_too_short"
    assert f.check(CaptionItem("x" * 21)) == "caption_too_long"
    assert f.check(CaptionItem("oneword")) == "caption_too_few_words"
    assert f.check(CaptionItem("a b c d e")) == "caption_too_many_words"
    assert f.check(CaptionItem("红色的圆形")) == "caption_too_many_words"  # 5 CJK words
    assert f.check(CaptionItem("红色圆形")) == "caption_too_short"  # 4 characters
    assert f.check(CaptionItem("a red circle")) is None


def test_unsure_guesses_fall_back_to_an_allowed_language_at_any_threshold():
    # "orange hexagon": langid's best guess is not English, and unsure; at a strict threshold the
    # caption is still kept as the best allowed language rather than rejected.
    assert detect_language("orange hexagon", ("en",), 0.99) == ("en", True)


def test_models_load_once_even_when_many_threads_ask_at_once():
    """Curation workers call the language model from 16 threads; each used to load its own copy."""
    import threading
    import time

    from vlp.curation.text import _load_once

    builds = []

    def slow_factory():
        builds.append(1)
        time.sleep(0.1)
        return object()

    load = _load_once(slow_factory)
    results = []
    threads = [threading.Thread(target=lambda: results.append(load())) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and len({id(r) for r in results}) == 1
