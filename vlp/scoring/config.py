"""The settings of ``vlp score`` (every one has a default; ``--set key=value`` overrides)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from vlp.config import ConfigError
from vlp.data.storage import StorageConfig


@dataclass(frozen=True)
class ScoreConfig:
    """How shards are scored.

    Attributes:
        batch_size: pairs per encoder call (and per preprocessing batch).
        embeddings: also store each row's ``image_embedding`` and ``text_embedding`` (float16 lists)
            for later stages (semantic dedup, selection by nearest neighbours).
        video_frames: how a clip of a video-text shard meets an image-text model: its ``middle``
            frame (the shard's ``image`` column) or the ``mean`` of its stored frames' embeddings (at
            most ``video_max_frames`` of them, spread over the clip). A video tower
            (``model.num_frames`` > 1) always gets the clip.
        precision: ``auto`` is bf16 autocast on a GPU and fp32 on CPUs.
        prepare: where shard rows are decoded, resized and tokenised: ``tasks`` (CPU tasks that feed
            the encoder actors ``uint8`` batches through Ray's object store, so a GPU never waits on
            a decode), ``encoder`` (each encoder actor reads and prepares its own rows, then encodes
            them: on CPUs this keeps every core on one stream of work with no copies between
            processes), or ``auto``: ``tasks`` where the cluster has GPUs, else ``encoder``.
        rows_per_read: rows of a shard one read covers (the unit of work and of retries; smaller
            spreads a few large shards over more encoders).
        encoders: encoder actors; 0 is one per GPU of the cluster, else one per ``cpus_per_encoder``
            CPUs (``prepare: encoder``) or per ``cpus_per_encoder + cpus_per_prepare_task`` CPUs.
        cpus_per_encoder, gpus_per_encoder: what each encoder actor reserves (GPUs only where the
            cluster has them).
        cpus_per_prepare_task: CPUs of each decode-and-preprocess task (below 1 lets them share a small
            machine with the encoders).
        ray_address: empty: ``RAY_ADDRESS``, else a local Ray started in-process.
    """

    batch_size: int = 64
    embeddings: bool = False
    video_frames: Literal["middle", "mean"] = "middle"
    video_max_frames: int = 16
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    prepare: Literal["auto", "tasks", "encoder"] = "auto"
    rows_per_read: int = 256
    encoders: int = 0
    cpus_per_encoder: float = 1.0
    gpus_per_encoder: float = 1.0
    cpus_per_prepare_task: float = 1.0
    ray_address: str = ""
    storage: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self):
        if self.batch_size < 1 or self.encoders < 0 or self.video_max_frames < 1 or self.rows_per_read < 1:
            raise ConfigError("score: batch_size >= 1, rows_per_read >= 1, encoders >= 0 and "
                              "video_max_frames >= 1")
        if self.cpus_per_encoder <= 0 or self.cpus_per_prepare_task <= 0 or self.gpus_per_encoder <= 0:
            raise ConfigError("score: cpus_per_encoder, gpus_per_encoder and cpus_per_prepare_task "
                              "must be > 0")

    def output_affecting(self) -> dict:
        """The settings a resumed run must share with the run it finishes (the rest may change)."""
        return {"embeddings": self.embeddings, "video_frames": self.video_frames,
                "video_max_frames": self.video_max_frames}
