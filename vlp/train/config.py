"""The experiment config of ``vlp train``: one typed dataclass per concern, composed into one.

Loaded from a recipe YAML (``ray_configs/train_*.yaml``) plus dotted ``--set`` overrides, logged whole
to MLflow as flattened params. Defaults are the tiny CPU recipe of the quickstart.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

from vlp.config import ConfigError
from vlp.data.storage import StorageConfig
from vlp.eval.config import EvalConfig
from vlp.models.config import DualEncoderConfig
from vlp.objectives.pretraining import MaskingConfig


@dataclass(frozen=True)
class DataConfig:
    """Where the shards are and how batches are made from them.

    Attributes:
        train: curated shard folder (local or ``s3://``).
        eval: held-out shard folder for retrieval; when empty, the last ``holdout_shards`` shards of
            ``train`` are held out instead (and never trained on).
        classification: labelled folder for zero-shot classification (``data.parquet`` +
            ``classes.json``); empty to skip.
        tokenizer: tokenizer folder; empty means ``model.pretrained``'s (the folder's own) when that is
            set, else ``<train>/_tokenizer`` (made by ``vlp tokenizer``).
        batch_size: rows per worker per step (the global batch is this times the world size).
        mix: a second curated shard folder mixed into every epoch (e.g. video-text clips into an
            image-text run: an image is a one-frame video to a video tower, a clip its middle frame to
            an image tower); empty for none.
        mix_fraction: the share of each epoch's samples drawn from ``mix`` (its shards are cut or
            repeated to that share).
    """

    train: str = ""
    mix: str = ""
    mix_fraction: float = 0.5
    eval: str = ""
    holdout_shards: int = 0
    classification: str = ""
    tokenizer: str = ""
    # SNP-S3's significant words (``vlp significant-words``); empty: <train>/_significant_words.json.
    # Read only when an objective or the text masking asks for them.
    significant_words: str = ""
    batch_size: int = 64
    min_crop_scale: float = 0.8
    shuffle_buffer: int = 512
    prefetch_batches: int = 2
    decode_batch_size: int = 256  # rows per decode task: larger amortises Ray Data's per-task cost
    # Epochs streamed as one pass of Ray Data (each re-read and re-augmented). Every pass starts the
    # streaming executor anew (planning, launching tasks: about a second of data wait), which is a
    # stall worth avoiding when epochs last seconds; a resume re-reads at most one pass to its position.
    epochs_per_pass: int = 1
    # CPUs Ray reserves per read and decode task. Below 1 lets the input pipeline share a small
    # machine with the training workers (they must leave at least this much free, or nothing is read).
    cpus_per_data_task: float = 1.0
    storage: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self):
        if self.batch_size < 2:
            raise ConfigError("data.batch_size must be at least 2 (contrastive negatives)")
        if not 0.05 <= self.min_crop_scale <= 1.0:
            raise ConfigError("data.min_crop_scale must be in [0.05, 1]")
        if self.epochs_per_pass < 1:
            raise ConfigError("data.epochs_per_pass must be >= 1")
        if self.cpus_per_data_task <= 0:
            raise ConfigError("data.cpus_per_data_task must be > 0")
        if self.holdout_shards < 0:
            raise ConfigError("data.holdout_shards must be >= 0")
        if not 0.0 < self.mix_fraction < 1.0:
            raise ConfigError("data.mix_fraction must be in (0, 1)")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    warmup_steps: int = 20
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0  # max global gradient norm; 0 switches clipping off
    grad_accum_steps: int = 1
    # The learning rate was tuned for base_world_size workers; with another (elastic) world size it is
    # scaled linearly or by the square root, so that it follows the actual global batch.
    lr_scaling: Literal["none", "linear", "sqrt"] = "linear"
    base_world_size: int = 2

    def __post_init__(self):
        if self.lr <= 0 or self.grad_accum_steps < 1 or self.warmup_steps < 0 or self.base_world_size < 1:
            raise ConfigError("optim: lr > 0, grad_accum_steps >= 1, warmup_steps >= 0, "
                              "base_world_size >= 1")
        if len(self.betas) != 2:
            raise ConfigError("optim.betas must be two numbers")


@dataclass(frozen=True)
class ScheduleConfig:
    epochs: int = 10
    max_steps: int = 0  # 0: run all epochs
    log_every: int = 10
    checkpoint_every: int = 100
    eval_every: int = 0  # 0: evaluate only at the end
    keep_checkpoints: int = 2


@dataclass(frozen=True)
class FSDPConfig:
    """Settings of ``scaling.strategy: fsdp`` (FSDP2, ``vlp.train.parallel``).

    Attributes:
        reshard_after_forward: free each block's gathered parameters after its forward and gather
            them again in backward (True: least memory, one more all-gather per block and step);
            False keeps them from forward to backward (ZeRO-2-like: more memory, less traffic).
    """

    reshard_after_forward: bool = True


STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class ScalingConfig:
    """Ray Train workers. ``min_workers`` > 0 makes the run elastic: (min_workers, num_workers).

    ``strategy`` says how the model is spread over the workers: ``ddp`` (every worker holds the whole
    model and optimiser state; gradients are all-reduced) or ``fsdp`` (FSDP2: parameters, gradients
    and AdamW state sharded over the workers, so each holds about 1/W of them; checkpoints are then
    written shard by shard with ``torch.distributed.checkpoint``).
    """

    num_workers: int = 2
    min_workers: int = 0
    use_gpu: bool = False
    accelerator_type: str = ""  # e.g. "A100": the GPU node type the autoscaler should add
    cpus_per_worker: float = 1.0
    max_failures: int = 0
    ray_address: str = ""  # empty: RAY_ADDRESS, else a local Ray started in-process
    strategy: Literal["ddp", "fsdp"] = "ddp"
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)

    def __post_init__(self):
        if self.num_workers < 1 or not 0 <= self.min_workers <= self.num_workers:
            raise ConfigError("scaling: num_workers >= 1 and 0 <= min_workers <= num_workers")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"scaling.strategy must be one of {' | '.join(STRATEGIES)}, got "
                              f"{self.strategy!r}")


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow. An empty ``tracking_uri`` means ``MLFLOW_TRACKING_URI`` if set, else a SQLite file
    ``mlflow.db`` in the working folder (artifacts beside it in ``mlartifacts/``)."""

    tracking_uri: str = ""
    experiment: str = "vlp"
    system_metrics: bool = True
    system_metrics_interval_s: float = 10.0
    log_checkpoints: bool = True


@dataclass(frozen=True)
class TrainConfig:
    run_name: str = "dual-encoder"
    output_dir: str = "runs"  # Ray Train storage: checkpoints of run <run_name> live under it
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    # GradCache-style batch accumulation: encode this many micro-batches without graphs, take the
    # contrastive loss over all of them (more negatives), then recompute each one with gradients.
    feature_accumulation: int = 1
    model: DualEncoderConfig = field(default_factory=DualEncoderConfig)
    # {name: that objective's typed Config}: a mapping per objective in YAML, typed and filled in with
    # its defaults here, so what is logged and checkpointed is what trains (``vlp.objectives``)
    objectives: dict[str, Any] = field(default_factory=lambda: {"contrastive": {}})
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        from vlp.objectives import parse_objectives
        from vlp.objectives.pretraining import check_objectives

        # typed once, here; fail at load time, naming the key, rather than on the workers
        object.__setattr__(self, "objectives", parse_objectives(self.objectives))
        check_objectives(self.objectives, self.model, self.masking)
        if self.model.pretrained and not self.data.tokenizer:  # a pretrained model's own tokenizer
            object.__setattr__(self, "data", replace(self.data, tokenizer=self.model.pretrained))
        if self.feature_accumulation < 1:
            raise ConfigError("feature_accumulation must be >= 1")
        if self.feature_accumulation > 1 and set(self.objectives) != {"contrastive"}:
            raise ConfigError("feature_accumulation pools contrastive features: it works with the "
                              "contrastive objective alone")
        if self.feature_accumulation > 1 and self.optim.grad_accum_steps > 1:
            raise ConfigError("use either feature_accumulation (more negatives) or "
                              "optim.grad_accum_steps (bigger batch, same negatives), not both")
        if not self.run_name or "/" in self.run_name:
            raise ConfigError("run_name must be a non-empty name without '/'")
