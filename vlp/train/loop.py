"""The one training loop, run by every Ray Train worker.

``train_worker`` is the thin Ray Train entry point: read the context, get this worker's dataset
shard, build a ``Trainer`` and run it. The ``Trainer`` owns the run: data position, optimiser
updates, logging, evaluation, checkpoints. The step's forward and backward are in ``vlp.train.steps``
(they call the registered objectives and sum their weighted losses). Nothing here talks to other ranks
except through ``vlp.distributed`` (the losses gather; DDP averages parameter gradients).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass

import torch

from vlp.batch import PIXELS, TENSOR_DTYPES
from vlp.config import from_dict
from vlp.data.transforms import cached_tokenizer, pixels_to_model
from vlp.objectives.pretraining import build_pretraining
from vlp.train.checkpoint import TrainState, load_checkpoint, save_checkpoint
from vlp.train.config import TrainConfig
from vlp.train.optim import build_optimizer, lr_at, scaled_lr, set_lr
from vlp.train.steps import StepContext, feature_cache_step, plain_step
from vlp.train.tracking import RankZeroLogger

EVAL_FILE = "eval.json"


@dataclass
class RunPlan:
    """What the driver worked out once and every worker needs (plain data: travels in the payload)."""

    train_rows: int
    tokenizer_dir: str
    eval_files: list  # held-out shard files: ShardFile as dicts (a view's selection included)
    classification: str
    tracking_uri: str
    mlflow_run_id: str
    pid_dir: str = ""  # when set, each worker writes rank-<r>.pid there (tests kill workers by PID)


def train_worker(payload: dict) -> None:
    """Ray Train entry point (``train_loop_per_worker``)."""
    import ray.train

    config = from_dict(TrainConfig, payload["config"])
    plan = RunPlan(**payload["plan"])
    ctx = ray.train.get_context()
    Trainer(config, plan, rank=ctx.get_world_rank(), world_size=ctx.get_world_size(),
            local_world_size=ctx.get_local_world_size(),
            shard=ray.train.get_dataset_shard("train")).run()


class Trainer:
    def __init__(self, config: TrainConfig, plan: RunPlan, *, rank: int, world_size: int,
                 local_world_size: int, shard):
        import ray.train.torch

        self.cfg, self.plan, self.shard = config, plan, shard
        self.rank, self.world_size = rank, world_size
        if plan.pid_dir:
            os.makedirs(plan.pid_dir, exist_ok=True)
            with open(os.path.join(plan.pid_dir, f"rank-{rank}.pid"), "w") as f:
                f.write(str(os.getpid()))
        torch.manual_seed(config.seed * 1000 + rank)
        self.device = ray.train.torch.get_device()
        self.bf16 = config.precision == "bf16" or (config.precision == "auto" and self.device.type == "cuda")
        self.tokenizer = cached_tokenizer(plan.tokenizer_dir)
        # the model and the objectives' own heads, as one module: what DDP wraps and checkpoints hold
        self.pretraining = build_pretraining(config, self.tokenizer, local_world_size=local_world_size)
        self.model = self.pretraining.model
        self.optimizer = build_optimizer(self.pretraining, config.optim)
        self.state = TrainState(mlflow_run_id=plan.mlflow_run_id, world_size=world_size)
        checkpoint = ray.train.get_checkpoint()
        if checkpoint:
            with checkpoint.as_directory() as folder:
                previous = load_checkpoint(folder, self.pretraining, self.optimizer)
            self.state = TrainState(**{**previous.__dict__, "world_size": world_size,
                                       "mlflow_run_id": plan.mlflow_run_id})
        self.ddp = ray.train.torch.prepare_model(self.pretraining)  # DDP when world_size > 1
        self.peak_lr = scaled_lr(config.optim, world_size)
        self.global_batch = config.data.batch_size * world_size * self.micro_batches
        self.planned_samples = config.schedule.epochs * (plan.train_rows // self.global_batch) * self.global_batch
        if config.schedule.max_steps:
            self.planned_samples = min(self.planned_samples, config.schedule.max_steps * self.global_batch)
        if self.planned_samples <= 0:
            raise ValueError(f"{plan.train_rows} training rows do not fill one global batch of "
                             f"{self.global_batch} (batch_size x workers x accumulation): lower "
                             "data.batch_size or add data")
        self.log = RankZeroLogger(plan.tracking_uri, plan.mlflow_run_id, active=rank == 0,
                                  system_metrics=config.tracking.system_metrics,
                                  system_metrics_interval_s=config.tracking.system_metrics_interval_s)
        if rank == 0 and checkpoint:
            print(f"[train] resumed at step {self.state.step} ({self.state.samples:,} samples) with "
                  f"{world_size} workers", flush=True)

    @property
    def micro_batches(self) -> int:
        return max(self.cfg.optim.grad_accum_steps, self.cfg.feature_accumulation)

    # ---- data -------------------------------------------------------------------------------------
    def _epoch_batches(self):
        """Yield this worker's micro-batches of the current pass (``data.epochs_per_pass`` epochs),
        skipping what was already trained on (the data position: samples of this pass already seen,
        whatever the old world size)."""
        data = self.cfg.data
        per_step_rows = data.batch_size * self.world_size
        skip = self.state.samples_in_epoch // per_step_rows
        it = self.shard.iter_torch_batches(batch_size=data.batch_size, drop_last=True,
                                           local_shuffle_buffer_size=data.shuffle_buffer or None,
                                           prefetch_batches=data.prefetch_batches,
                                           dtypes={key: getattr(torch, dtype)
                                                   for key, dtype in TENSOR_DTYPES.items()})
        for i, batch in enumerate(it):
            if i >= skip:
                yield batch

    def _to_model(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {key: value.to(self.device, non_blocking=True) for key, value in batch.items()}
        out[PIXELS] = pixels_to_model(out[PIXELS])
        return out

    def _autocast(self):
        if self.bf16:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ---- one optimiser step -----------------------------------------------------------------------
    def _optimizer_step(self) -> float:
        grad_norm = 0.0
        if self.cfg.optim.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.pretraining.parameters(),
                                                             self.cfg.optim.grad_clip))
        lr = lr_at(self.peak_lr, self.cfg.optim, self.state.step, self.state.samples / self.planned_samples)
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    # ---- the run ----------------------------------------------------------------------------------
    def run(self) -> None:
        sched = self.cfg.schedule
        step_fn = feature_cache_step if self.cfg.feature_accumulation > 1 else plain_step
        ctx = StepContext(model=self.pretraining, ddp=self.ddp,
                          autocast=self._autocast, world_size=self.world_size)
        window = {"start": time.perf_counter(), "wait": 0.0, "samples": 0, "bytes": 0}
        status = "FAILED"
        try:
            while self.state.samples < self.planned_samples:
                micro = []
                batches = self._epoch_batches()
                steps_before = self.state.step
                while self.state.samples < self.planned_samples:
                    t0 = time.perf_counter()
                    batch = next(batches, None)
                    window["wait"] += time.perf_counter() - t0
                    if batch is None:
                        break  # end of this epoch's data
                    micro.append(self._to_model(batch))
                    if len(micro) < self.micro_batches:
                        continue
                    ctx.step = self.state.step
                    result = step_fn(ctx, micro)
                    loss, parts, sent = result.loss, result.parts, result.bytes_sent
                    micro = []
                    grad_norm = self._optimizer_step()
                    self.state.step += 1
                    self.state.samples += self.global_batch
                    self.state.samples_in_epoch += self.global_batch
                    window["samples"] += self.global_batch
                    window["bytes"] += sent
                    if self.state.step % sched.log_every == 0:
                        self._log_window(window, loss, parts, grad_norm)
                    if sched.eval_every and self.state.step % sched.eval_every == 0:
                        self._evaluate(final=False)
                    if self.state.step % sched.checkpoint_every == 0:
                        self._checkpoint({"loss": loss})
                if self.state.step == steps_before:
                    raise RuntimeError(f"rank {self.rank} got no full batch from a whole pass over the "
                                       "data: lower data.batch_size or add data")
                self.state.epoch += self.cfg.data.epochs_per_pass
                self.state.samples_in_epoch = 0
            metrics = self._evaluate(final=True)
            self._checkpoint({"loss": float("nan"), **metrics}, final=True)
            status = "FINISHED"
        finally:
            self.log.close(status)

    def _log_window(self, window: dict, loss: float, parts: dict, grad_norm: float) -> None:
        elapsed = max(time.perf_counter() - window["start"], 1e-9)
        metrics = {
            "loss/total": loss, **parts,
            "lr": self.optimizer.param_groups[0]["lr"],
            "temperature": 1.0 / float(self.model.scale().detach()),
            "grad_norm": grad_norm,
            "samples_per_second": window["samples"] / elapsed,
            "data_wait_fraction": window["wait"] / elapsed,
            "comm_bytes_per_step": window["bytes"] / max(1, self.cfg.schedule.log_every),
            "epoch": self.state.samples / max(1, self.plan.train_rows),
            "world_size": self.world_size,
        }
        self.log.metrics(metrics, step=self.state.step)
        if self.rank == 0:
            print(f"[train] step {self.state.step:>5} epoch {metrics['epoch']:.1f} loss {loss:.4f} "
                  f"lr {metrics['lr']:.2e} T {metrics['temperature']:.4f} "
                  f"{metrics['samples_per_second']:.0f} samples/s, data wait "
                  f"{100 * metrics['data_wait_fraction']:.0f}%", flush=True)
        window.update(start=time.perf_counter(), wait=0.0, samples=0, bytes=0)

    def _evaluate(self, final: bool) -> dict[str, float]:
        if self.rank != 0 or not (self.plan.eval_files or self.plan.classification):
            return {}
        from vlp.data.storage import Storage
        from vlp.eval.summary import headline_metrics
        from vlp.eval.zero_shot import evaluate, recall_bar_chart

        texts: dict[str, str] = {}  # readable examples of the heads' output (decoded captions)
        metrics = evaluate(self.model, self.tokenizer, self.cfg.eval,
                           retrieval_files=self.plan.eval_files,
                           classification=self.plan.classification or None,
                           storage=Storage(self.cfg.data.storage), device=self.device,
                           pretraining=self.pretraining, texts=texts)
        self.log.metrics({f"eval/{k}": v for k, v in metrics.items()}, step=self.state.step)
        if final:
            self.final_metrics = metrics
            self.log.dict(metrics, EVAL_FILE)
            if any(k.startswith("retrieval") for k in metrics):
                with tempfile.TemporaryDirectory() as tmp:
                    self.log.artifact(recall_bar_chart(metrics, os.path.join(tmp, "recall_at_k.png")),
                                      "plots")
            with tempfile.TemporaryDirectory() as tmp:
                for name, text in texts.items():
                    path = os.path.join(tmp, name)
                    with open(path, "w", encoding="utf-8") as f:
                        f.write(text)
                    self.log.artifact(path, "eval")
        print(f"[train] eval at step {self.state.step}: " + ", ".join(
            f"{k} {v:.1f}" for k, v in headline_metrics(metrics).items()), flush=True)
        return metrics

    def _checkpoint(self, metrics: dict, final: bool = False) -> None:
        import ray.train

        metrics = {**metrics, "step": self.state.step, "samples": self.state.samples}
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if self.rank == 0:
                save_checkpoint(tmp, self.pretraining, self.optimizer, self.state, self.cfg,
                                self.tokenizer.name_or_path)
                if final:
                    with open(os.path.join(tmp, EVAL_FILE), "w") as f:
                        json.dump(getattr(self, "final_metrics", {}), f, indent=2)
                if self.cfg.tracking.log_checkpoints:
                    name = "final" if final else f"step-{self.state.step:07d}"
                    self.log.artifacts(tmp, f"checkpoints/{name}")
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({k: v for k, v in metrics.items() if not (isinstance(v, float)
                                                                      and math.isnan(v))},
                             checkpoint=checkpoint)
