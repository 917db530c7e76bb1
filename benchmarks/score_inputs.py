"""Inputs of ``bench_score.py``: curated shards made from scikit-image's photos (English and Chinese
captions) and the models it scores them with (a ``vlp train`` checkpoint, or a tiny random Hugging Face
``CLIPModel`` folder), each made once and cached under ``.bench/score/``."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_DIR = os.path.join(REPO, ".bench", "score")
STORED_SIZE, QUALITY = 256, 95  # what `vlp curate images --set image.size=256` stores

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "hubble_deep_field",
          "immunohistochemistry", "retina", "brick", "grass", "gravel", "moon", "clock", "coins")
SUBJECTS = [("an astronaut", "宇航员"), ("a cup of coffee", "一杯咖啡"), ("a cat", "一只猫"),
            ("a rocket", "一枚火箭"), ("a photographer", "一位摄影师"), ("distant galaxies", "遥远的星系"),
            ("stained tissue", "染色的组织"), ("a retina", "视网膜"), ("a brick wall", "砖墙"),
            ("green grass", "绿草"), ("gravel", "碎石"), ("the moon", "月亮"), ("a clock", "时钟"),
            ("old coins", "旧硬币")]
SETTINGS = [("in close-up", "特写"), ("on a sunny day", "晴天里"), ("seen from above", "俯视"),
            ("in black and white", "黑白"), ("with a blurred background", "背景模糊"), ("at night", "夜晚"),
            ("in a museum", "在博物馆里"), ("on the table", "在桌子上")]


def _photos() -> list:
    import numpy as np
    from skimage import data

    out = []
    for name in PHOTOS:
        a = getattr(data, name)()
        if a.ndim == 2:
            a = np.stack([a] * 3, axis=-1)
        out.append((name, np.ascontiguousarray(a[..., :3])))
    return out


def _caption(rng, photo: int) -> tuple[str, str]:
    """A caption of the photo (or, one time in four, of another one: scores should spread)."""
    if rng.random() < 0.25:
        photo = int(rng.integers(len(SUBJECTS)))
    subject, setting = SUBJECTS[photo % len(SUBJECTS)], SETTINGS[int(rng.integers(len(SETTINGS)))]
    if rng.random() < 0.3:
        return f"一张{setting[1]}{subject[1]}的照片", "zh"
    return f"a photo of {subject[0]} {setting[0]}", "en"


def _row(i: int, photos: list) -> dict:
    """Row ``i`` of the benchmark data: a random square crop of a photo (flipped or turned), resized to
    256 px with a bicubic filter and stored as JPEG q95, as a centre-cropped curated image is."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(i)
    p = int(rng.integers(len(photos)))
    name, photo = photos[p]
    h, w = photo.shape[:2]
    side = int(min(h, w) * rng.uniform(0.45, 1.0))
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = photo[top:top + side, left:left + side]
    crop = np.rot90(crop, int(rng.integers(4))) if rng.random() < 0.5 else crop[:, ::-1]
    im = Image.fromarray(np.ascontiguousarray(crop)).resize((STORED_SIZE, STORED_SIZE),
                                                            Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=QUALITY)
    data = buf.getvalue()
    caption, lang = _caption(rng, p)
    return {"key": f"{i:09d}", "caption": caption, "lang": lang, "image": data, "image_format": "jpeg",
            "width": STORED_SIZE, "height": STORED_SIZE, "orig_width": side, "orig_height": side,
            "sha256": hashlib.sha256(data).hexdigest(), "phash": int(rng.integers(-2**63, 2**63 - 1)),
            "source": f"skimage:{name}#{i}"}


def prepare_shards(rows: int, shard_rows: int) -> str:
    """A folder of ``rows`` curated rows in shards of ``shard_rows`` (cached); returns its path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vlp.data.schema import IMAGE_TEXT_SCHEMA, SCHEMA_VERSION

    root = os.path.join(BENCH_DIR, "data", f"images_{rows}_s{shard_rows}")
    manifest = os.path.join(root, "_manifest.json")
    if os.path.exists(manifest):
        return root
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    photos = _photos()
    shards = []
    for s, start in enumerate(range(0, rows, shard_rows)):
        table = pa.Table.from_pylist([_row(i, photos) for i in range(start, min(rows, start + shard_rows))],
                                     schema=IMAGE_TEXT_SCHEMA)
        name = f"shard-{s:06d}.parquet"
        # as pipelines/shard_sink.py writes them: images uncompressed, other columns zstd
        pq.write_table(table, os.path.join(root, name), row_group_size=1024,
                       compression={c: ("NONE" if c == "image" else "zstd") for c in table.column_names},
                       use_dictionary=[c for c in table.column_names if c not in ("image", "key", "sha256")])
        shards.append({"name": name, "rows": table.num_rows,
                       "bytes": os.path.getsize(os.path.join(root, name))})
    with open(manifest + ".tmp", "w") as f:  # last: the folder is complete once this exists
        json.dump({"schema_version": SCHEMA_VERSION, "kind": "image-text", "status": "complete",
                   "num_rows": rows, "shards": shards,
                   "made_by": "benchmarks/bench_score.py (skimage photos, 256 px, JPEG q95)"}, f)
    os.replace(manifest + ".tmp", manifest)
    return root


def all_captions() -> list[str]:
    """Every caption the data can hold (what the checkpoint's tokenizer is trained on)."""
    return [c for subject in SUBJECTS for setting in SETTINGS
            for c in (f"a photo of {subject[0]} {setting[0]}", f"一张{setting[1]}{subject[1]}的照片")]


def prepare_checkpoint(preset: str, image_size: int) -> str:
    """A ``vlp train`` checkpoint (random init): ViT ``preset`` at ``image_size``, BERT tiny."""
    import torch

    from vlp.config import from_dict
    from vlp.data.tokenizer import TokenizerConfig, train_tokenizer
    from vlp.objectives.pretraining import build_pretraining
    from vlp.train.checkpoint import TrainState, save_checkpoint
    from vlp.train.config import TrainConfig

    folder = os.path.join(BENCH_DIR, "models", f"vit-{preset}_{image_size}_bert-tiny")
    if os.path.exists(os.path.join(folder, "DONE")):
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    tok_dir = folder + "_tokenizer"
    tok = train_tokenizer(all_captions() * 4, TokenizerConfig(vocab_size=1000))
    tok.save_pretrained(tok_dir)
    torch.manual_seed(0)
    config = from_dict(TrainConfig, {"model": {"image_size": image_size,
                                               "image": {"name": "vit", "preset": preset},
                                               "text": {"name": "bert", "preset": "tiny"}}})
    save_checkpoint(folder, build_pretraining(config, tok), None, TrainState(), config, tok_dir)
    shutil.rmtree(tok_dir)
    open(os.path.join(folder, "DONE"), "w").close()
    return folder


def _clip_tokenizer(max_length: int):
    """A real ``CLIPTokenizer`` over a byte-level vocabulary (every byte alone and as a word end, so
    nothing is unknown, Chinese included) with a few merges."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())
    merges = [("p", "h"), ("o", "t"), ("ot", "o</w>"), ("t", "h"), ("th", "e</w>"), ("o", "f</w>")]
    tokens = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars),
              *("".join(pair) for pair in merges)]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                         model_max_length=max_length)


def prepare_hf_clip(image_size: int) -> str:
    """A tiny random ``CLIPModel`` folder (ViT patch 16, 4 layers of 192; text 4 layers of 128)."""
    import torch
    import transformers as tf
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    folder = os.path.join(BENCH_DIR, "models", f"hf-clip-tiny_{image_size}")
    if os.path.exists(os.path.join(folder, "DONE")):
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    torch.manual_seed(0)
    tok = _clip_tokenizer(77)
    vision = {"hidden_size": 192, "num_hidden_layers": 4, "num_attention_heads": 4,
              "intermediate_size": 768, "image_size": image_size, "patch_size": 16}
    text = {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 512,
            "vocab_size": len(tok), "max_position_embeddings": 77, "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    model = tf.CLIPModel(tf.CLIPConfig(vision_config=vision, text_config=text, projection_dim=128))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": image_size},
                          crop_size={"height": image_size, "width": image_size}).save_pretrained(folder)
    open(os.path.join(folder, "DONE"), "w").close()
    return folder
