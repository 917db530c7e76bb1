"""Zero-shot evaluation of a dual encoder: retrieval on held-out shards, classification by prompts.

``evaluate`` is called at the end of training, every ``eval_every`` steps (rank 0), and by
``vlp eval`` on a saved model. Retrieval runs on held-out image-text or video-text shards (overall and
per caption language; ``i2t``/``t2i`` for images, ``v2t``/``t2v`` for clips). On clips, a video tower
(``model.num_frames`` > 1) is also evaluated with each clip's frames shuffled (HiTeA's temporal
shuffle test): ``retrieval_shuffled/*``, ``temporal/mean_recall_gap`` and ``temporal/R1_gap``
(ordered minus shuffled) tell whether the model uses the order of frames at all. Classification runs
on a labelled folder (``data.parquet`` with ``image`` and ``label``, ``classes.json`` with the class
names per language), with English and Chinese prompt templates.

Given the whole ``PretrainingModel`` (``pretraining=``), ``evaluate`` also measures what its heads
learned on the same held-out pairs: masked-word video question answering (LAVENDER; ``qa/*``) when it
trains a conditioned ``mlm``, and caption metrics (``caption/*``) when it trains ``captioning``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from vlp.config import ConfigError
from vlp.data.storage import Storage, join
from vlp.data.tokenizer import tokenize_captions
from vlp.data.transforms import decode_media, pixels_to_model
from vlp.eval.metrics import chance_recall, classifier_weights, retrieval_recall, zero_shot_accuracy

CLASSES_FILE = "classes.json"
CLASSIFICATION_DATA = "data.parquet"


@dataclass(frozen=True)
class EvalConfig:
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    templates: dict[str, list[str]] = field(default_factory=lambda: {
        "en": ["a {}.", "a photo of a {}.", "an image showing a {}."],
        "zh": ["一个{}", "一张{}的照片", "图片里有一个{}"],
    })
    batch_size: int = 256
    max_rows: int = 5000  # held-out pairs used for retrieval (the first ones, in shard order)
    video_qa: bool = True  # masked-word QA, when the run trains a conditioned mlm head
    captions: bool = True  # caption metrics, when the run trains a captioning head
    caption_beam_size: int = 3
    # beam scores are divided by length ** this: at 0 (plain sums of log-probabilities) a beam that
    # ends at once outscores every real caption of a barely trained model
    caption_length_penalty: float = 1.0
    caption_max_items: int = 200

    def __post_init__(self):
        if not self.ks or min(self.ks) < 1:
            raise ConfigError("eval.ks must be positive integers")
        for lang, templates in self.templates.items():
            bad = [t for t in templates if "{}" not in t]
            if bad:
                raise ConfigError(f"eval.templates.{lang}: {bad[0]!r} has no {{}} for the class name")


@dataclass
class PairSet:
    media: list  # images (bytes) or clips (lists of frame bytes)
    captions: list[str]
    langs: list[str]
    clips: bool = False


def load_pairs(files: list[str], storage: Storage, max_rows: int, frames: bool = False) -> PairSet:
    """The first ``max_rows`` held-out pairs; with ``frames``, video shards give their clips' frames
    (image shards, and video shards for an image tower, give one image per pair)."""
    tables, n, clips = [], 0, False
    for path in files:
        with storage.open_input(path) as f:
            pf = pq.ParquetFile(pa.BufferReader(f.read()))
            use_frames = frames and "frames" in pf.schema_arrow.names
            t = pf.read(columns=["frames" if use_frames else "image", "caption", "lang"])
        clips = clips or use_frames
        tables.append(t.rename_columns(["media", "caption", "lang"]).slice(0, max_rows - n))
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
        out.append(model.encode_text(torch.from_numpy(tok["input_ids"]).to(device),
                                     torch.from_numpy(tok["attention_mask"]).to(device)).float().cpu())
    return torch.cat(out)


def _recall(visual: torch.Tensor, text: torch.Tensor, ks, clips: bool) -> dict[str, float]:
    out = retrieval_recall(visual, text, ks)
    if clips:  # name the directions for what was retrieved
        out = {k.replace("i2t_", "v2t_").replace("t2i_", "t2v_"): v for k, v in out.items()}
    return out


def evaluate_retrieval(model, tokenizer, pairs: PairSet, cfg: EvalConfig, device) -> dict[str, float]:
    mcfg = model.cfg
    frames = getattr(mcfg, "num_frames", 1)
    vis = encode_images(model, pairs.media, mcfg.image_size, cfg.batch_size, device, frames)
    txt = encode_texts(model, tokenizer, pairs.captions, mcfg.max_text_length, cfg.batch_size, device)
    metrics = {f"retrieval/{k}": v for k, v in _recall(vis, txt, cfg.ks, pairs.clips).items()}
    metrics["retrieval/chance_R1"] = chance_recall(len(pairs.captions), 1)
    langs = np.array(pairs.langs)
    for lang in sorted(set(pairs.langs)):
        idx = torch.from_numpy(np.flatnonzero(langs == lang))
        if len(idx) >= 2:
            per = _recall(vis[idx], txt[idx], cfg.ks, pairs.clips)
            metrics.update({f"retrieval_{lang}/{k}": v for k, v in per.items()})
    if pairs.clips and frames > 1:
        shuffled = encode_images(model, pairs.media, mcfg.image_size, cfg.batch_size, device, frames,
                                 shuffle_seed=0)
        metrics.update({f"retrieval_shuffled/{k}": v
                        for k, v in _recall(shuffled, txt, cfg.ks, True).items()})
        metrics["temporal/mean_recall_gap"] = (metrics["retrieval/mean_recall"]
                                               - metrics["retrieval_shuffled/mean_recall"])
        # R@1 is where time shows first: R@5 and R@10 saturate on small held-out sets
        r1 = [f"{d}_R1" for d in ("v2t", "t2v")]
        metrics["temporal/R1_gap"] = sum(metrics[f"retrieval/{k}"] - metrics[f"retrieval_shuffled/{k}"]
                                         for k in r1) / 2
    return metrics


def evaluate_classification(model, tokenizer, folder: str, cfg: EvalConfig, device,
                            storage: Storage) -> dict[str, float]:
    classes = json.loads(storage.read_bytes(join(folder, CLASSES_FILE)))
    with storage.open_input(join(folder, CLASSIFICATION_DATA)) as f:
        table = pq.read_table(pa.BufferReader(f.read()), columns=["image", "label"])
    labels = torch.tensor(table.column("label").to_pylist())
    img = encode_images(model, table.column("image").to_pylist(), model.cfg.image_size,
                        cfg.batch_size, device, getattr(model.cfg, "num_frames", 1))
    metrics: dict[str, float] = {}
    for lang, names in classes["classnames"].items():
        templates = cfg.templates.get(lang)
        if not templates:
            continue
        prompts = [t.format(name) for name in names for t in templates]
        emb = encode_texts(model, tokenizer, prompts, model.cfg.max_text_length, cfg.batch_size, device)
        weights = classifier_weights(emb.view(len(names), len(templates), -1))
        acc = zero_shot_accuracy(img, weights, labels, ks=(1,))
        metrics[f"zeroshot_{lang}/top1"] = acc["top1"]
        metrics[f"zeroshot_{lang}/chance"] = 100.0 / len(names)
    return metrics


def evaluate(model, tokenizer, cfg: EvalConfig, *, retrieval_files: list[str],
             classification: str | None, storage: Storage, device=None,
             pretraining=None, texts: dict[str, str] | None = None) -> dict[str, float]:
    """All zero-shot metrics of ``model`` (an unwrapped ``DualEncoder``), in eval mode; with
    ``pretraining`` (the ``PretrainingModel`` around it) also its heads' metrics (and their readable
    examples into ``texts``)."""
    device = device or next(model.parameters()).device
    owner = pretraining if pretraining is not None else model
    was_training = owner.training
    owner.eval()
    try:
        metrics: dict[str, float] = {}
        if retrieval_files:
            pairs = load_pairs(retrieval_files, storage, cfg.max_rows,
                               frames=getattr(model.cfg, "num_frames", 1) > 1)
            metrics.update(evaluate_retrieval(model, tokenizer, pairs, cfg, device))
            if pretraining is not None:
                metrics.update(evaluate_heads(pretraining, tokenizer, pairs, cfg, device, texts))
        if classification:
            metrics.update(evaluate_classification(model, tokenizer, classification, cfg, device,
                                                   storage))
        return metrics
    finally:
        owner.train(was_training)


def evaluate_heads(pretraining, tokenizer, pairs: PairSet, cfg: EvalConfig, device,
                   texts: dict[str, str] | None = None) -> dict[str, float]:
    """The generative and masked-word heads' metrics on held-out pairs (those the run trains);
    ``texts`` receives readable examples by file name (decoded captions next to their references)."""
    mcfg = pretraining.model.cfg
    common = dict(image_size=mcfg.image_size, num_frames=mcfg.num_frames,
                  max_text_length=mcfg.max_text_length, batch_size=min(cfg.batch_size, 64),
                  device=device)
    metrics: dict[str, float] = {}
    objectives = pretraining.objectives
    if cfg.video_qa and "mlm" in objectives and objectives["mlm"].cfg.conditioned:
        from vlp.eval.video_qa import evaluate_video_qa

        metrics.update(evaluate_video_qa(pretraining, tokenizer, pairs, **common))
    if cfg.captions and "captioning" in objectives:
        from vlp.eval.captioning import decode_captions

        captions = decode_captions(pretraining, tokenizer, pairs, beam_size=cfg.caption_beam_size,
                                   length_penalty=cfg.caption_length_penalty,
                                   max_items=cfg.caption_max_items, **common)
        metrics.update(captions.metrics())
        if texts is not None:
            texts["caption_examples.txt"] = captions.examples_text(20)
    return metrics


def recall_bar_chart(metrics: dict[str, float], path: str, title: str = "zero-shot retrieval") -> str:
    """A bar chart of recall@K per direction (and language), saved as PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({k.split("/")[0] for k in metrics if k.startswith("retrieval")})
    directions = ("v2t", "t2v") if any("/v2t_" in k for k in metrics) else ("i2t", "t2i")
    ks = sorted({k.split("_R")[-1] for k in metrics if "_R" in k and "chance" not in k}, key=int)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / max(1, 2 * len(groups))
    for g_i, group in enumerate(groups):
        for d_i, direction in enumerate(directions):
            vals = [metrics.get(f"{group}/{direction}_R{k}", 0.0) for k in ks]
            offset = (2 * g_i + d_i) * width
            ax.bar([i + offset for i in range(len(ks))], vals, width, label=f"{group} {direction}")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(ks))], [f"R@{k}" for k in ks])
    ax.set_ylabel("recall (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
