"""The one training loop, run by every Ray Train worker.

``train_worker`` is the thin Ray Train entry point: read the context, get this worker's dataset
shard, build a ``Trainer`` and run it. The ``Trainer`` owns the step: it calls the registered
objectives and sums their weighted losses; it never talks to other ranks except through
``vlp.distributed`` (the objectives' losses do their own gathers; DDP averages parameter gradients).
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

from vlp.config import from_dict
from vlp.data.transforms import cached_tokenizer, pixels_to_model
from vlp.distributed.reduce import all_reduce_sum
from vlp.models import DualEncoder
from vlp.objectives import build_objectives
from vlp.train.checkpoint import TrainState, load_checkpoint, save_checkpoint
from vlp.train.config import TrainConfig
from vlp.train.optim import build_optimizer, lr_at, scaled_lr, set_lr
from vlp.train.tracking import RankZeroLogger

EVAL_FILE = "eval.json"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite: training stops instead of going on with broken weights."""


@dataclass
class RunPlan:
    """What the driver worked out once and every worker needs (plain data: travels in the payload)."""

    train_rows: int
    tokenizer_dir: str
    eval_files: list[str]
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
        self.model = DualEncoder(config.model, vocab_size=len(self.tokenizer),
                                 pad_token_id=self.tokenizer.pad_token_id or 0)
        self.objectives = build_objectives(config.objectives, local_world_size=local_world_size)
        self.optimizer = build_optimizer(self.model, config.optim)
        self.state = TrainState(mlflow_run_id=plan.mlflow_run_id, world_size=world_size)
        checkpoint = ray.train.get_checkpoint()
        if checkpoint:
            with checkpoint.as_directory() as folder:
                previous = load_checkpoint(folder, self.model, self.optimizer)
            self.state = TrainState(**{**previous.__dict__, "world_size": world_size,
                                       "mlflow_run_id": plan.mlflow_run_id})
        self.ddp = ray.train.torch.prepare_model(self.model)  # DDP when world_size > 1
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
                                  system_metrics=config.tracking.system_metrics)
        if rank == 0 and checkpoint:
            print(f"[train] resumed at step {self.state.step} ({self.state.samples:,} samples) with "
                  f"{world_size} workers", flush=True)

    @property
    def micro_batches(self) -> int:
        return max(self.cfg.optim.grad_accum_steps, self.cfg.feature_accumulation)

    # ---- data -------------------------------------------------------------------------------------
    def _epoch_batches(self):
        """Yield this worker's micro-batches of the current epoch, skipping what was already trained on
        (the data position: samples of this epoch already seen, whatever the old world size)."""
        data = self.cfg.data
        per_step_rows = data.batch_size * self.world_size
        skip = self.state.samples_in_epoch // per_step_rows
        it = self.shard.iter_torch_batches(batch_size=data.batch_size, drop_last=True,
                                           local_shuffle_buffer_size=data.shuffle_buffer or None,
                                           prefetch_batches=data.prefetch_batches,
                                           dtypes={"pixels": torch.uint8, "input_ids": torch.long,
                                                   "attention_mask": torch.long})
        for i, batch in enumerate(it):
            if i >= skip:
                yield batch

    def _to_model(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"pixels": pixels_to_model(batch["pixels"].to(self.device, non_blocking=True)),
                "input_ids": batch["input_ids"].to(self.device, non_blocking=True),
                "attention_mask": batch["attention_mask"].to(self.device, non_blocking=True)}

    def _autocast(self):
        if self.bf16:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ---- one optimiser step -----------------------------------------------------------------------
    def _objective_losses(self, outputs, batch) -> tuple[torch.Tensor, dict[str, float], list]:
        """The weighted sum of every objective's loss, the parts to log, and the outputs (whose
        byte counters are complete only after backward)."""
        total, parts, outs = None, {}, []
        for name, objective in self.objectives.items():
            out = objective(outputs, batch)
            term = objective.cfg.weight * out.loss
            total = term if total is None else total + term
            parts[f"loss/{name}"] = out.loss.detach()
            outs.append(out)
        return total, parts, outs

    def _check_finite(self, total: torch.Tensor, parts: dict) -> torch.Tensor:
        """All ranks agree on the mean loss and on whether any rank went non-finite (one tiny
        all-reduce), so every rank stops at the same step with the same clear error."""
        value = total.detach().float()
        finite = torch.isfinite(value)
        summary = torch.stack([torch.where(finite, value, torch.zeros_like(value)),
                               (~finite).float()])  # on the device: NCCL reduces only GPU tensors
        summary = all_reduce_sum(summary)
        summary = summary.cpu()
        if summary[1] > 0:
            detail = ", ".join(f"{k}={float(v):.4g}" for k, v in parts.items())
            raise NonFiniteLossError(
                f"non-finite loss at step {self.state.step} on {int(summary[1])} of "
                f"{self.world_size} ranks (this rank: {detail}); lower optim.lr, check the data, or "
                f"resume from the last checkpoint")
        return summary[0] / self.world_size

    def _plain_step(self, micro: list[dict]) -> tuple[float, dict, int]:
        n, sent, logged = len(micro), 0, {}
        mean_loss = 0.0
        for i, batch in enumerate(micro):
            sync = contextlib.nullcontext() if i == n - 1 or not hasattr(self.ddp, "no_sync") \
                else self.ddp.no_sync()
            with sync:
                with self._autocast():
                    outputs = self.ddp(batch)
                    total, parts, outs = self._objective_losses(outputs, batch)
                mean_loss += float(self._check_finite(total, parts)) / n
                (total / n).backward()
            sent += sum(o.bytes_sent for o in outs)
            logged = {k: float(v) for k, v in parts.items()}
        return mean_loss, logged, sent

    def _feature_cache_step(self, micro: list[dict]) -> tuple[float, dict, int]:
        """GradCache: the contrastive loss over all micro-batches' features (more negatives), with the
        graph of only one micro-batch alive at a time."""
        n = len(micro)
        rng_states, cached = [], []
        with torch.no_grad(), self._autocast():
            for batch in micro:
                rng_states.append(torch.random.get_rng_state())
                cached.append(self.model(batch))
        pool = {key: torch.cat([c[key] for c in cached]).float().requires_grad_()
                for key in ("image_embeds", "text_embeds")}
        pool["logit_scale"] = self.model.scale().detach().requires_grad_()
        if self.model.logit_bias is not None:
            pool["logit_bias"] = self.model.logit_bias.detach().requires_grad_()
        total, parts, outs = self._objective_losses(pool, {})
        mean_loss = float(self._check_finite(total, parts))
        total.backward()
        sent = sum(o.bytes_sent for o in outs)
        sizes = [c["image_embeds"].shape[0] for c in cached]
        grads = {key: pool[key].grad.split(sizes) for key in ("image_embeds", "text_embeds")}
        for i, batch in enumerate(micro):
            sync = contextlib.nullcontext() if i == n - 1 or not hasattr(self.ddp, "no_sync") \
                else self.ddp.no_sync()
            with sync:
                torch.random.set_rng_state(rng_states[i])  # same dropout as the cached pass
                with self._autocast():
                    out = self.ddp(batch)
                surrogate = sum((out[key].float() * grads[key][i]).sum() for key in grads)
                # the scalars' gradients are split evenly so that every micro-batch uses them
                surrogate = surrogate + out["logit_scale"] * (pool["logit_scale"].grad / n)
                if "logit_bias" in pool:
                    surrogate = surrogate + out["logit_bias"] * (pool["logit_bias"].grad / n)
                surrogate.backward()
        return mean_loss, {k: float(v) for k, v in parts.items()}, sent

    def _optimizer_step(self) -> float:
        grad_norm = 0.0
        if self.cfg.optim.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                             self.cfg.optim.grad_clip))
        lr = lr_at(self.peak_lr, self.cfg.optim, self.state.step, self.state.samples / self.planned_samples)
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    # ---- the run ----------------------------------------------------------------------------------
    def run(self) -> None:
        sched = self.cfg.schedule
        step_fn = self._feature_cache_step if self.cfg.feature_accumulation > 1 else self._plain_step
        window = {"start": time.perf_counter(), "wait": 0.0, "samples": 0, "bytes": 0}
        status = "FAILED"
        try:
            while self.state.samples < self.planned_samples:
                micro = []
                batches = self._epoch_batches()
                while self.state.samples < self.planned_samples:
                    t0 = time.perf_counter()
                    batch = next(batches, None)
                    window["wait"] += time.perf_counter() - t0
                    if batch is None:
                        break  # end of this epoch's data
                    micro.append(self._to_model(batch))
                    if len(micro) < self.micro_batches:
                        continue
                    loss, parts, sent = step_fn(micro)
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
                self.state.epoch += 1
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
            "temperature": 1.0 / float(self.model.scale()),
            "grad_norm": grad_norm,
            "samples_per_second": window["samples"] / elapsed,
            "data_wait_fraction": window["wait"] / elapsed,
            "comm_bytes_per_step": window["bytes"] / max(1, self.cfg.schedule.log_every),
            "epoch": self.state.epoch,
            "world_size": self.world_size,
        }
        self.log.metrics(metrics, step=self.state.step)
        if self.rank == 0:
            print(f"[train] step {self.state.step:>5} epoch {self.state.epoch} loss {loss:.4f} "
                  f"lr {metrics['lr']:.2e} T {metrics['temperature']:.4f} "
                  f"{metrics['samples_per_second']:.0f} samples/s, data wait "
                  f"{100 * metrics['data_wait_fraction']:.0f}%", flush=True)
        window.update(start=time.perf_counter(), wait=0.0, samples=0, bytes=0)

    def _evaluate(self, final: bool) -> dict[str, float]:
        if self.rank != 0 or not (self.plan.eval_files or self.plan.classification):
            return {}
        from vlp.data.storage import Storage
        from vlp.eval.zero_shot import evaluate, recall_bar_chart

        metrics = evaluate(self.model, self.tokenizer, self.cfg.eval,
                           retrieval_files=self.plan.eval_files,
                           classification=self.plan.classification or None,
                           storage=Storage(self.cfg.data.storage), device=self.device)
        self.log.metrics({f"eval/{k}": v for k, v in metrics.items()}, step=self.state.step)
        if final:
            self.final_metrics = metrics
            self.log.dict(metrics, EVAL_FILE)
            if any(k.startswith("retrieval") for k in metrics):
                with tempfile.TemporaryDirectory() as tmp:
                    self.log.artifact(recall_bar_chart(metrics, os.path.join(tmp, "recall_at_k.png")),
                                      "plots")
        print(f"[train] eval at step {self.state.step}: " + ", ".join(
            f"{k} {v:.1f}" for k, v in metrics.items()
            if k.endswith(("mean_recall", "i2t_R1", "t2i_R1", "top1"))), flush=True)
        return metrics

    def _checkpoint(self, metrics: dict, final: bool = False) -> None:
        import ray.train

        metrics = {**metrics, "step": self.state.step, "samples": self.state.samples}
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if self.rank == 0:
                save_checkpoint(tmp, self.model, self.optimizer, self.state, self.cfg,
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
