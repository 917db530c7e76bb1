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
learned on the same held-out pairs: it runs the evaluations registered for the run's objectives
(``vlp.eval.heads``; today masked-word video QA for a conditioned ``mlm`` and caption metrics for
``captioning``) without naming any of them. The held-out pairs and the encoders' batched embeddings
come from ``vlp.eval.pairs``, the settings from ``vlp.eval.config``. A new zero-shot task (a retrieval
or classification variant) goes here; a new head's evaluation goes in its own module, registered in
``vlp.eval.heads``.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from vlp.data.storage import Storage, join
from vlp.eval.config import EvalConfig
from vlp.eval.heads import evaluate_heads
from vlp.eval.metrics import chance_recall, classifier_weights, retrieval_recall, zero_shot_accuracy
from vlp.eval.pairs import PairSet, encode_images, encode_texts, load_pairs

CLASSES_FILE = "classes.json"
CLASSIFICATION_DATA = "data.parquet"


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
