"""Held-out pairs, and how every evaluation reads and encodes them.

``load_pairs`` reads the first held-out image-text or video-text pairs of a run's shards into a
``PairSet``; ``encode_images`` and ``encode_texts`` turn media and texts into the dual encoder's
embeddings in batches (``shuffled_order`` gives the temporal shuffle test its frame orders). The
zero-shot runner (``zero_shot``) and the heads' evaluations (``captioning``, ``video_qa``) all import
from here, and this module imports no evaluation: a new way to read or encode held-out data goes here,
a new metric goes in a module of its own above it.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from vlp.batch import ATTENTION_MASK, INPUT_IDS
from vlp.config import ConfigError
from vlp.data.shards import as_shard_file, read_shard
from vlp.data.storage import Storage
from vlp.data.tokenizer import tokenize_captions
from vlp.data.transforms import decode_media, pixels_to_model


@dataclass
class PairSet:
    media: list  # images (bytes) or clips (lists of frame bytes)
    captions: list[str]
    langs: list[str]
    clips: bool = False


def load_pairs(files: list, storage: Storage, max_rows: int, frames: bool = False) -> PairSet:
    """The first ``max_rows`` held-out pairs; with ``frames``, video shards give their clips' frames
    (image shards, and video shards for an image tower, give one image per pair). ``files``: paths, or
    ``ShardFile`` (or its dict form) to read only a view's selected rows."""
    tables, n, clips = [], 0, False
    for item in files:
        shard = as_shard_file(item)
        fs, path = storage.resolve(shard.path)
        with fs.open_input_file(path) as f:
            use_frames = frames and "frames" in pq.ParquetFile(f).schema_arrow.names
        columns = ["frames" if use_frames else "image", "caption", "lang"]
        batches = list(read_shard(shard, storage, columns, limit=max_rows - n))
        if not batches:
            continue
        t = pa.Table.from_batches(batches).select(columns)
        clips = clips or use_frames
        tables.append(t.rename_columns(["media", "caption", "lang"]))
        n += tables[-1].num_rows
        if n >= max_rows:
            break
    if not n:
        raise ConfigError(f"no held-out rows to evaluate on in {files[:3]}")
    if len({t.schema.field("media").type for t in tables}) > 1:
        raise ConfigError(f"held-out shards mix images and videos: {files[:3]}; evaluate them apart")
    t = pa.concat_tables(tables)
    return PairSet(t.column("media").to_pylist(), t.column("caption").to_pylist(),
                   t.column("lang").to_pylist(), clips=clips)


def shuffled_order(num_frames: int, generator: torch.Generator) -> torch.Tensor:
    """A random order of ``num_frames`` frames that is not the original one."""
    while True:
        perm = torch.randperm(num_frames, generator=generator)
        if num_frames < 2 or not torch.equal(perm, torch.arange(num_frames)):
            return perm


@torch.no_grad()
def encode_images(model, media: list, image_size: int, batch_size: int, device: torch.device,
                  num_frames: int = 1, shuffle_seed: int | None = None) -> torch.Tensor:
    """Embeddings of images or clips (``num_frames`` per clip); with ``shuffle_seed``, each clip's
    frames go in a random (non-identity) order, fixed by the seed."""
    generator = torch.Generator().manual_seed(shuffle_seed) if shuffle_seed is not None else None
    out = []
    for i in range(0, len(media), batch_size):
        pixels = torch.from_numpy(decode_media(media[i:i + batch_size], num_frames, image_size))
        if generator is not None and pixels.dim() == 5:
            pixels = torch.stack([clip[shuffled_order(num_frames, generator)] for clip in pixels])
        out.append(model.encode_image(pixels_to_model(pixels.to(device))).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def encode_texts(model, tokenizer, texts: list[str], max_length: int, batch_size: int,
                 device: torch.device) -> torch.Tensor:
    out = []
    for i in range(0, len(texts), batch_size):
        tok = tokenize_captions(tokenizer, texts[i:i + batch_size], max_length)
        out.append(model.encode_text(torch.from_numpy(tok[INPUT_IDS]).to(device),
                                     torch.from_numpy(tok[ATTENTION_MASK]).to(device)).float().cpu())
    return torch.cat(out)
