"""Bilingual tokenizers: trained from the curated captions, saved beside the shards, versioned.

``train_tokenizer`` fits a WordPiece (BERT-style, default) or byte-level BPE vocabulary with the
``tokenizers`` library. Chinese text is split into single characters before WordPiece (BERT's
``handle_chinese_chars``) and every character seen in training enters the alphabet, so Chinese does
not come out as unknown tokens. ``train_tokenizer_for_shards`` is the curation step: it reads the
``caption`` column of a shard folder and writes ``<shards>/_tokenizer/`` (a Hugging Face tokenizer
folder that ``AutoTokenizer`` loads) with ``meta.json`` holding the version (a hash of the vocabulary
and rules), the training settings and the manifest it was trained on. Any tokenizer folder given by
path works as well.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Iterable, Literal

import numpy as np

from vlp.batch import ATTENTION_MASK, INPUT_IDS
from vlp.config import ConfigError, to_dict
from vlp.data.storage import Storage, join

TOKENIZER_DIR = "_tokenizer"
META_FILE = "meta.json"
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


@dataclass(frozen=True)
class TokenizerConfig:
    kind: Literal["wordpiece", "bpe"] = "wordpiece"
    vocab_size: int = 8000
    min_frequency: int = 1
    lowercase: bool = True


def train_tokenizer(captions: Iterable[str], config: TokenizerConfig = TokenizerConfig()):
    """Fit a tokenizer on ``captions``; returns a ``transformers.PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if config.kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                    strip_accents=False, lowercase=config.lowercase)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        # limit_alphabet: keep every character seen (thousands of CJK characters), never [UNK] them
        trainer = trainers.WordPieceTrainer(vocab_size=config.vocab_size,
                                            min_frequency=config.min_frequency,
                                            special_tokens=list(SPECIAL_TOKENS), limit_alphabet=1 << 20)
    else:
        tok = Tokenizer(models.BPE(unk_token="[UNK]"))
        norms = [normalizers.NFKC()] + ([normalizers.Lowercase()] if config.lowercase else [])
        tok.normalizer = normalizers.Sequence(norms)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=config.vocab_size, min_frequency=config.min_frequency,
                                      special_tokens=list(SPECIAL_TOKENS),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(captions, trainer=trainer)
    if config.kind == "wordpiece":
        # The trainer numbers its alphabet in hash-map order (and breaks ties between equally
        # frequent merges by it), so retraining on the same captions can give another vocabulary.
        # WordPiece needs only the set of tokens (greedy longest match): number it canonically, so
        # that equal sets get equal ids. The saved folder, with its version hash, is the reference.
        rest = sorted(t for t in tok.get_vocab() if t not in SPECIAL_TOKENS)
        tok.model = models.WordPiece(vocab={t: i for i, t in enumerate([*SPECIAL_TOKENS, *rest])},
                                     unk_token="[UNK]")
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def tokenizer_version(folder: str) -> str:
    """A content hash of the vocabulary and rules: two folders with one version tokenize alike."""
    with open(os.path.join(folder, "tokenizer.json"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:12]


def read_captions(shards: str, storage: Storage) -> Iterable[str]:
    """The captions of a complete shard folder, shard after shard."""
    from vlp.data.shards import ShardFolder

    return ShardFolder.open(shards, storage).read_column("caption", storage)


def train_tokenizer_for_shards(shards: str, config: TokenizerConfig = TokenizerConfig(),
                               storage: Storage | None = None) -> dict:
    """Train on the captions of a shard folder and save ``<shards>/_tokenizer/``; returns meta."""
    from vlp.data.shards import ShardFolder

    storage = storage or Storage()
    folder = ShardFolder.open(shards, storage)
    captions = list(folder.read_column("caption", storage))
    if not captions:
        raise ConfigError(f"no captions in {shards} to train a tokenizer on")
    tok = train_tokenizer(captions, config)
    manifest_hash = folder.manifest_sha256
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        meta = {"version": tokenizer_version(tmp), "config": to_dict(config),
                "vocab_size": len(tok), "trained_on": {"shards": shards, "captions": len(captions),
                                                       "manifest_sha256": manifest_hash}}
        with open(os.path.join(tmp, META_FILE), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2, ensure_ascii=False)
        for name in sorted(os.listdir(tmp)):
            with open(os.path.join(tmp, name), "rb") as f:
                storage.write_bytes_atomic(join(shards, TOKENIZER_DIR, name), f.read())
    return meta


def resolve_tokenizer_path(path: str | None, shards: str) -> str:
    """The tokenizer folder to use: ``path`` when given, else the one saved beside ``shards``."""
    return path or join(shards, TOKENIZER_DIR)


def load_tokenizer(path: str, storage: Storage | None = None):
    """Load a tokenizer folder (local or ``s3://``; an s3 folder is copied to a local cache first)."""
    from transformers import AutoTokenizer

    storage = storage or Storage()
    local = path
    if path.startswith("s3://"):
        local = os.path.join(tempfile.gettempdir(), "vlp-tokenizers",
                             hashlib.sha256(path.encode()).hexdigest()[:16])
        if not os.path.isdir(local):
            tmp = tempfile.mkdtemp(dir=os.path.dirname(local) if os.path.isdir(os.path.dirname(local))
                                   else None)
            for f in storage.list_files(path):
                with open(os.path.join(tmp, f.rsplit("/", 1)[-1]), "wb") as out:
                    out.write(storage.read_bytes(f))
            os.makedirs(os.path.dirname(local), exist_ok=True)
            try:
                os.rename(tmp, local)
            except OSError:  # another process won the race; its copy is the same
                pass
    if not os.path.isdir(local) or not os.listdir(local):
        raise ConfigError(f"no tokenizer in {path}: run `vlp tokenizer --shards DIR` first, or give "
                          "a tokenizer folder with data.tokenizer=PATH")
    return AutoTokenizer.from_pretrained(local)


def tokenize_captions(tokenizer, captions: list[str], max_length: int,
                      offsets: bool = False) -> dict[str, np.ndarray]:
    """Captions -> padded ``input_ids`` and ``attention_mask`` (int64, shape ``(B, max_length)``);
    with ``offsets`` also each token's character span ``(B, max_length, 2)`` ((0, 0) for special
    tokens and padding)."""
    enc = tokenizer(list(captions), padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="np", return_offsets_mapping=offsets)
    out = {INPUT_IDS: enc["input_ids"].astype(np.int64),
           ATTENTION_MASK: enc["attention_mask"].astype(np.int64)}
    if offsets:
        out["offsets"] = enc["offset_mapping"].astype(np.int64)
    return out
