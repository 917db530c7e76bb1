"""The bilingual tokenizer: trained from curated captions, Chinese never unknown, saved and versioned
beside the shards, loaded back identically."""

from __future__ import annotations

import json
import os
import random

import pytest

from vlp.config import ConfigError
from vlp.data.schema import SCHEMA_VERSION
from vlp.data.synthetic import random_spec
from vlp.data.tokenizer import (TOKENIZER_DIR, TokenizerConfig, load_tokenizer, tokenize_captions,
                                tokenizer_version, train_tokenizer, train_tokenizer_for_shards)


def _captions(n=200, seed=0):
    rng = random.Random(seed)
    return [random_spec(rng).caption(lang) for _ in range(n) for lang in ("en", "zh")]


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_chinese_and_english_captions_never_become_unknown_tokens(kind):
    tok = train_tokenizer(_captions(), TokenizerConfig(kind=kind, vocab_size=600))
    for caption in _captions(50, seed=7):  # unseen combinations of seen words and characters
        ids = tok(caption)["input_ids"]
        assert tok.unk_token_id not in ids, caption
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    zh = "左上角有一个小的红色圆形"
    decoded = tok.decode(tok(zh)["input_ids"], skip_special_tokens=True).replace(" ", "")
    assert decoded == zh


def test_tokenize_captions_pads_and_truncates_to_max_length():
    tok = train_tokenizer(_captions(), TokenizerConfig(vocab_size=600))
    out = tokenize_captions(tok, ["a red circle", "左上角有一个小的红色圆形" * 5], max_length=12)
    assert out["input_ids"].shape == out["attention_mask"].shape == (2, 12)
    assert out["attention_mask"][0].tolist() == [1] * 5 + [0] * 7  # [CLS] a red circle [SEP]
    assert (out["input_ids"][0][5:] == tok.pad_token_id).all()
    assert out["attention_mask"][1].all() and out["input_ids"][1][-1] == tok.sep_token_id


def _write_shards(folder, captions):
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(folder)
    half = len(captions) // 2
    shards = []
    for i, part in enumerate((captions[:half], captions[half:])):
        name = f"shard-{i:06d}.parquet"
        pq.write_table(pa.table({"caption": part}), os.path.join(folder, name))
        shards.append({"name": name, "rows": len(part), "bytes": 0})
    with open(os.path.join(folder, "_manifest.json"), "w") as f:
        json.dump({"schema_version": SCHEMA_VERSION, "kind": "image-text", "status": "complete",
                   "shards": shards}, f)


def test_tokenizer_is_saved_beside_the_shards_with_a_content_version(tmp_path):
    shards = str(tmp_path / "shards")
    _write_shards(shards, _captions())
    meta = train_tokenizer_for_shards(shards, TokenizerConfig(vocab_size=600))
    folder = os.path.join(shards, TOKENIZER_DIR)
    assert json.load(open(os.path.join(folder, "meta.json"))) == meta
    assert meta["trained_on"]["captions"] == 400 and meta["trained_on"]["manifest_sha256"]
    assert meta["version"] == tokenizer_version(folder)
    loaded = load_tokenizer(folder)
    copy = str(tmp_path / "copy")
    loaded.save_pretrained(copy)
    assert tokenizer_version(copy) == meta["version"]  # the version is the content, not the path
    for caption in _captions(20, seed=3):
        assert load_tokenizer(copy)(caption)["input_ids"] == loaded(caption)["input_ids"]
    other = train_tokenizer_for_shards(shards, TokenizerConfig(vocab_size=60))
    assert other["version"] != meta["version"] and other["vocab_size"] < meta["vocab_size"]


def test_missing_shards_or_tokenizer_fail_clearly(tmp_path):
    with pytest.raises(ConfigError, match="curate first"):
        train_tokenizer_for_shards(str(tmp_path))
    with pytest.raises(ConfigError, match="no tokenizer"):
        load_tokenizer(str(tmp_path / "nothing"))
