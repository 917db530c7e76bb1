"""The library's public surface: what a user's script needs, without the application or a running Ray.

    import vlp

    config = vlp.load_config(vlp.TrainConfig, "ray_configs/train_quickstart.yaml", ["data.train=DIR"])
    model, tokenizer, config = vlp.load_trained_model("runs/my-run/checkpoint_2026-12-07_16-13-30")
    clip = vlp.load_dual_encoder("models/chinese-clip")  # a checkpoint or a Hugging Face folder
    shards = vlp.ShardFolder.open("curated/")            # checked: complete, readable schema, kind
    metrics = vlp.evaluate_checkpoint("runs/my-run/checkpoint_2026-12-07_16-13-30", data="held_out/")

Everything here is a re-export of the module that owns it, except ``evaluate_checkpoint``, which is
what ``vlp eval`` runs. Running jobs (curation, training on Ray Train, submission) is the
application's part: the ``vlp`` command, ``pipelines/``.
"""

from __future__ import annotations

from vlp.config import ConfigError, load_config
from vlp.curation.config import CurationConfig, VideoCurationConfig
from vlp.data.preprocess import ImagePreprocess
from vlp.data.schema import ShardKind
from vlp.data.shards import ShardFolder, ShardFolderError
from vlp.data.storage import Storage, StorageConfig
from vlp.data.tokenizer import load_tokenizer
from vlp.eval.zero_shot import evaluate
from vlp.models import DualEncoder, DualEncoderConfig, build_encoder
from vlp.objectives.pretraining import PretrainingModel, build_pretraining
from vlp.train.checkpoint import load_trained_model, load_trained_pretraining
from vlp.train.config import TrainConfig
from vlp.train.export import export_hf
from vlp.train.pretrained import LoadedDualEncoder, load_dual_encoder


def evaluate_checkpoint(checkpoint: str, *, data: str | None = None,
                        classification: str | None = None) -> dict[str, float]:
    """Zero-shot metrics of a ``vlp train`` checkpoint: retrieval (and the heads' evaluations) on the
    held-out shard folder ``data``, classification on the labelled folder ``classification``.

    Raises:
        ConfigError: not a checkpoint, an unreadable shard folder, or nothing to evaluate on.
    """
    pretraining, tokenizer, config = load_trained_pretraining(checkpoint)
    storage = Storage(config.data.storage)
    files = list(ShardFolder.open(data, storage).require_rows("to evaluate on").shards) if data else []
    if not files and not classification:
        raise ConfigError("nothing to evaluate on: give --data (held-out shards) and/or "
                          "--classification (a labelled folder)")
    return evaluate(pretraining.model, tokenizer, config.eval, retrieval_files=files,
                    classification=classification, storage=storage, pretraining=pretraining)


__all__ = ["ConfigError", "CurationConfig", "DualEncoder", "DualEncoderConfig", "ImagePreprocess",
           "LoadedDualEncoder", "PretrainingModel", "load_dual_encoder",
           "ShardFolder", "ShardFolderError", "ShardKind", "Storage", "StorageConfig", "TrainConfig",
           "VideoCurationConfig", "build_encoder", "build_pretraining", "evaluate",
           "evaluate_checkpoint", "export_hf", "load_config", "load_tokenizer", "load_trained_model",
           "load_trained_pretraining"]
