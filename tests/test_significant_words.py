"""SNP-S3's significant words: chosen by part of speech and frequency, saved beside the shards,
and found again token by token in tokenized captions (all pieces of a word share one id)."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import subprocess
import sys
import time

import numpy as np
import pytest

from vlp.config import ConfigError
from vlp.curation.significant_words import (SignificantWordsConfig, compute_significant_words,
                                            write_significant_words)
from vlp.data.schema import SCHEMA_VERSION
from vlp.data.significant_words import (SIGNIFICANT_WORDS_FILE, load_significant_words,
                                        significant_word_ids)
from vlp.data.synthetic import random_spec
from vlp.data.tokenizer import TokenizerConfig, train_tokenizer

EN_CAPTIONS = (["A man is cooking in the kitchen."] * 4 + ["The man walks his dog quickly."] * 3
               + ["Two happy children are playing football!"] * 2 + ["xyzzy glorbs"] * 3
               + ["a lonely tree"])
ZH_CAPTIONS = (["一个高大的男人在厨房里做饭"] * 3 + ["一只漂亮的小狗在草地上奔跑"] * 2
               + ["桌子上有一台笔记本电脑"] * 2 + ["这是一辆红色的汽车"])


def _by_count(counts: dict[str, int]) -> list[str]:
    return sorted(counts, key=lambda w: (-counts[w], w))


def test_english_nouns_verbs_adjectives_are_kept_by_frequency_and_stop_words_dropped():
    result = compute_significant_words(EN_CAPTIONS, SignificantWordsConfig(min_count=2))
    counts = {"man": 7, "cooking": 4, "kitchen": 4, "walks": 3, "dog": 3, "happy": 2,
              "children": 2, "playing": 2, "football": 2}
    assert result["words"] == _by_count(counts)  # surface forms, lowercased, most frequent first
    assert result["counts"] == counts
    assert result["by_language"] == {"en": 9, "zh": 0}
    # adverbs, function words, numbers, words outside the lexicon and words seen once are all out
    for dropped in ("quickly", "is", "the", "a", "in", "his", "are", "two", "xyzzy", "glorbs",
                    "lonely", "tree"):
        assert dropped not in result["words"]
    adverbs = compute_significant_words(EN_CAPTIONS, SignificantWordsConfig(pos=["ADV"]))
    assert adverbs["words"] == ["quickly"]


def test_top_k_min_count_and_extra_stop_words_are_respected():
    top3 = compute_significant_words(EN_CAPTIONS, SignificantWordsConfig(top_k=3))
    assert top3["words"] == ["man", "cooking", "kitchen"] and len(top3["counts"]) == 3
    once = compute_significant_words(EN_CAPTIONS, SignificantWordsConfig(min_count=1))
    assert {"lonely", "tree"} <= set(once["words"])
    often = compute_significant_words(EN_CAPTIONS, SignificantWordsConfig(min_count=4))
    assert often["words"] == ["man", "cooking", "kitchen"]
    extra = compute_significant_words(EN_CAPTIONS,
                                      SignificantWordsConfig(extra_stop_words=["Man", "厨房"]))
    assert "man" not in extra["words"] and extra["words"][0] == "cooking"
    assert extra["config"]["extra_stop_words"] == ["Man", "厨房"]
    with pytest.raises(ConfigError, match="pos"):
        SignificantWordsConfig(pos=["NOUN", "PRON"])
    with pytest.raises(ConfigError, match="top_k"):
        SignificantWordsConfig(top_k=0)


def test_chinese_words_by_jieba_tag_without_function_words_or_overlong_words():
    result = compute_significant_words(ZH_CAPTIONS, SignificantWordsConfig(min_count=2))
    counts = {"男人": 3, "厨房": 3, "做饭": 3, "高大": 3, "漂亮": 2, "小狗": 2, "草地": 2,
              "奔跑": 2, "桌子": 2}
    assert result["words"] == _by_count(counts) and result["counts"] == counts
    assert result["by_language"] == {"en": 0, "zh": 9}
    # 笔记本电脑 is a noun, but longer than training's longest match (4 characters)
    for dropped in ("的", "在", "一个", "是", "有", "里", "上", "一只", "笔记本电脑", "汽车"):
        assert dropped not in result["words"]
    adjectives = compute_significant_words(ZH_CAPTIONS, SignificantWordsConfig(pos=["ADJ"]))
    assert adjectives["words"] == _by_count({"高大": 3, "漂亮": 2})


def test_bilingual_corpus_is_ranked_as_one():
    result = compute_significant_words(EN_CAPTIONS + ZH_CAPTIONS + ["a man 在厨房 cooking"] * 2,
                                       SignificantWordsConfig(top_k=4))
    assert result["words"] == ["man", "cooking", "厨房", "kitchen"]
    assert result["counts"] == {"man": 9, "cooking": 6, "厨房": 5, "kitchen": 4}
    assert result["by_language"] == {"en": 3, "zh": 1}


# ------------------------------------------------------------------- finding them in tokens

WORDS = frozenset({"skateboarder", "jumps", "red", "circle", "红", "红色", "圆形", "小", "左上角",
                   "三角形"})
ID_CAPTIONS = ["A skateboarder jumps over the Red circle.", "左上角有一个小的红色圆形",
               "red, red 红色红色 红 circle", "", "the skateboarder 和 三角形 in the top left"]


def _is_letter(c: str) -> bool:
    return c.isascii() and c.isalpha()


def _is_han(c: str) -> bool:
    return "\u4e00" <= c <= "\u9fff"


def _reference_ids(caption: str, offsets, words, max_words: int) -> list[int]:
    """Plain reference: walk the caption one character at a time, then test each token against each
    occurrence for overlap."""
    spans, i = [], 0
    while i < len(caption):
        if _is_letter(caption[i]):
            j = i
            while j < len(caption) and _is_letter(caption[j]):
                j += 1
            if caption[i:j].lower() in words:
                spans.append((i, j))
            i = j
        elif _is_han(caption[i]):
            for n in (4, 3, 2, 1):
                piece = caption[i:i + n]
                if len(piece) == n and all(map(_is_han, piece)) and piece in words:
                    spans.append((i, i + n))
                    i += n
                    break
            else:
                i += 1
        else:
            i += 1
    if max_words:
        spans = spans[:max_words]
    return [next((k + 1 for k, (ws, we) in enumerate(spans) if s < e and s < we and e > ws), 0)
            for s, e in offsets]


@functools.cache
def _tokenizer(kind: str):
    """Trained without the word "skateboarder": WordPiece splits it (skateboard ##er)."""
    rng = random.Random(0)
    corpus = [random_spec(rng).caption(lang) for _ in range(100) for lang in ("en", "zh")]
    corpus += ["the skater jumps onto a skateboard", "a snowboarder", "a keyboard player",
               "over the board"] * 3
    return train_tokenizer(corpus, TokenizerConfig(kind=kind, vocab_size=200 if kind == "wordpiece"
                                                   else 400))


@pytest.fixture(params=["wordpiece", "bpe"])
def tokenizer(request):
    return _tokenizer(request.param)


def _encode(tok, captions, max_length):
    enc = tok(captions, padding="max_length", truncation=True, max_length=max_length,
              return_offsets_mapping=True, return_tensors="np")
    return enc["input_ids"], enc["offset_mapping"]


@pytest.mark.parametrize("max_length", [24, 7])
@pytest.mark.parametrize("max_words", [0, 2])
def test_word_ids_match_a_plain_reference(tokenizer, max_length, max_words):
    _, offsets = _encode(tokenizer, ID_CAPTIONS, max_length)
    ids = significant_word_ids(ID_CAPTIONS, offsets, WORDS, max_words=max_words)
    assert ids.dtype == np.int64 and ids.shape == (len(ID_CAPTIONS), max_length)
    for b, caption in enumerate(ID_CAPTIONS):
        expected = _reference_ids(caption, offsets[b].tolist(), WORDS, max_words)
        assert ids[b].tolist() == expected, caption
    if max_words:
        assert ids.max() <= max_words
    assert not ids[3].any()  # the empty caption


def test_word_pieces_share_one_id_and_special_tokens_get_none():
    tokenizer = _tokenizer("wordpiece")
    input_ids, offsets = _encode(tokenizer, ID_CAPTIONS, 24)
    ids = significant_word_ids(ID_CAPTIONS, offsets, WORDS)
    special = np.isin(input_ids, tokenizer.all_special_ids)
    assert special.any() and not ids[special].any()  # [CLS], [SEP], [PAD]

    def ids_of(b, text, nth=0):  # ids of the tokens inside the nth occurrence of text in caption b
        start = -1
        for _ in range(nth + 1):
            start = ID_CAPTIONS[b].index(text, start + 1)
        s, e = offsets[b, :, 0], offsets[b, :, 1]
        return ids[b][(e > s) & (s < start + len(text)) & (e > start)].tolist()

    assert len(ids_of(0, "skateboarder")) >= 2 and set(ids_of(0, "skateboarder")) == {1}
    assert set(ids_of(0, "jumps")) == {2} and set(ids_of(0, "over the")) == {0}
    assert set(ids_of(0, "Red")) == {3}  # matched case-insensitively
    assert set(ids_of(0, "circle")) == {4}
    # 左上角 | 有一个 | 小 | 的 | 红色 | 圆形: one id per word, not per character
    assert len(ids_of(1, "左上角")) == 3 and set(ids_of(1, "左上角")) == {1}
    assert set(ids_of(1, "有一个")) == {0} and set(ids_of(1, "小")) == {2}
    assert set(ids_of(1, "红色")) == {3} and set(ids_of(1, "圆形")) == {4}
    # each occurrence of a repeated word is its own; longest match takes 红色 over 红
    assert [set(ids_of(2, "red", 0)), set(ids_of(2, "red", 1)), set(ids_of(2, "红色", 0)),
            set(ids_of(2, "红色", 1)), set(ids_of(2, " 红 ")), set(ids_of(2, "circle"))] \
        == [{1}, {2}, {3}, {4}, {5}, {6}]


def test_truncated_words_are_absent_and_ids_stay_in_caption_order(tokenizer):
    _, full = _encode(tokenizer, ID_CAPTIONS, 24)
    _, short = _encode(tokenizer, ID_CAPTIONS, 5)
    all_ids = significant_word_ids(ID_CAPTIONS, full, WORDS)
    cut = significant_word_ids(ID_CAPTIONS, short, WORDS)
    # the tokens both keep carry the same ids: truncation drops occurrences, never renumbers
    same = (short == full[:, :5]).all(-1) & (short[..., 1] > short[..., 0])
    assert same.sum() >= 10 and (cut[same] == all_ids[:, :5][same]).all()
    assert cut[2].max() < all_ids[2].max()


def test_word_ids_are_fast_enough_for_a_training_batch(tokenizer):
    rng = random.Random(1)
    captions = ["the skateboarder jumps: " + random_spec(rng).caption(lang) for _ in range(128)
                for lang in ("en", "zh")]
    _, offsets = _encode(tokenizer, captions, 32)
    words = set(WORDS) | {"blue", "square", "蓝色", "正方形"}
    significant_word_ids(captions, offsets, words)
    started = time.perf_counter()
    ids = significant_word_ids(captions, offsets, words)
    assert time.perf_counter() - started < 0.5  # ~15 ms here; a training step is far longer
    assert ids.shape == (256, 32) and (ids.max(axis=1) > 0).all()


def test_offsets_of_the_wrong_shape_are_refused():
    with pytest.raises(ValueError, match="offsets"):
        significant_word_ids(["a red circle"], np.zeros((2, 4, 2), dtype=np.int64), WORDS)


# ------------------------------------------------------------------------- the curation step

def _write_shard_folder(folder, captions):
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(folder)
    pq.write_table(pa.table({"caption": captions}), os.path.join(folder, "shard-000000.parquet"))
    with open(os.path.join(folder, "_manifest.json"), "w") as f:
        json.dump({"schema_version": SCHEMA_VERSION, "kind": "image-text", "status": "complete",
                   "shards": [{"name": "shard-000000.parquet", "rows": len(captions), "bytes": 0}]},
                  f)


@pytest.fixture
def shards(tmp_path):
    rng = random.Random(0)
    captions = [random_spec(rng).caption(lang) for _ in range(150) for lang in ("en", "zh")]
    folder = str(tmp_path / "shards")
    _write_shard_folder(folder, captions)
    return folder, captions


def test_words_are_saved_beside_the_shards_with_the_manifest_they_came_from(shards):
    folder, captions = shards
    config = SignificantWordsConfig(top_k=20)
    result = write_significant_words(folder, config)
    saved = json.load(open(os.path.join(folder, SIGNIFICANT_WORDS_FILE), encoding="utf-8"))
    assert saved == result
    assert result["words"] == compute_significant_words(captions, config)["words"]
    manifest = open(os.path.join(folder, "_manifest.json"), "rb").read()
    assert result["meta"]["manifest_sha256"] == hashlib.sha256(manifest).hexdigest()[:16]
    assert result["meta"]["captions"] == 300 and result["meta"]["config"]["top_k"] == 20
    assert len(result["words"]) == 20
    assert result["by_language"]["en"] and result["by_language"]["zh"]
    assert {"small", "large", "小", "大"} <= set(result["words"])
    assert not {"a", "the", "in", "有", "一个", "的"} & set(result["words"])
    # written atomically: nothing but the shard, the manifest and the words file
    assert sorted(os.listdir(folder)) == ["_manifest.json", SIGNIFICANT_WORDS_FILE,
                                          "shard-000000.parquet"]
    assert load_significant_words(folder) == result["words"]
    assert load_significant_words(os.path.join(folder, SIGNIFICANT_WORDS_FILE)) == result["words"]


def test_folders_without_manifest_or_captions_or_words_fail_clearly(tmp_path):
    with pytest.raises(ConfigError, match="_manifest.json"):
        write_significant_words(str(tmp_path))
    empty = str(tmp_path / "empty")
    _write_shard_folder(empty, [])
    with pytest.raises(ConfigError, match="no captions"):
        write_significant_words(empty)
    with pytest.raises(ConfigError, match="vlp significant-words"):
        load_significant_words(str(tmp_path))


def test_cli_saves_and_summarises_or_fails_in_one_line(shards, tmp_path):
    folder, _ = shards
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "significant-words", "--shards", folder,
                        "--top-k", "5"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    words = load_significant_words(folder)
    assert len(words) == 5 and "5 significant words" in r.stdout
    top = r.stdout.split("top 20: ")[1].strip().split(", ")
    assert [entry.split(" (")[0] for entry in top] == words  # most frequent first, with counts
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "significant-words", "--shards",
                        str(tmp_path / "missing")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "_manifest.json" in r.stderr and "Traceback" not in r.stderr
