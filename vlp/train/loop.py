"""The one training loop, run by every Ray Train worker.

``train_worker`` is the thin Ray Train entry point: read the context, get this worker's dataset
shard, build a ``Trainer`` and run it. The ``Trainer`` owns the run: data position, optimiser
updates, logging, evaluation, checkpoints. The step's forward and backward are in ``vlp.train.steps``
(they call the registered objectives and sum their weighted losses); how the model is spread over the
workers (``scaling.strategy``: DDP or FSDP) is decided once, by ``vlp.train.parallel.wrap_model``, and
the loop is the same under both. Nothing here talks to other ranks except through ``vlp.distributed``
(the losses gather; DDP averages parameter gradients, FSDP reduce-scatters them).

Checkpoints follow the strategy (``vlp.train.checkpoint``): under ``ddp`` rank 0 writes the whole
state; under ``fsdp`` every rank writes its shards with ``torch.distributed.checkpoint``'s
``async_save`` and the step loop waits only for the copy to CPU memory and Ray Train's report: the
files are written in the background, and Ray Train's checkpoint upload (``checkpoint_upload_mode=
ASYNC``) waits for them before copying them to the run's storage. Each checkpoint logs
``checkpoint/blocked_s`` (what the step loop waited) and ``checkpoint/total_s`` (until it was in the
run's storage) to MLflow.
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
from vlp.train.checkpoint import (
    SHARDED_DIR,
    TrainState,
    restore_checkpoint,
    save_checkpoint,
    save_sharded_checkpoint,
)
from vlp.train.config import TrainConfig
from vlp.train.optim import build_optimizer, lr_at, optimizer_step, scaled_lr
from vlp.train.parallel import wrap_model
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
            local_world_size=ctx.get_local_world_size(), node_rank=ctx.get_node_rank(),
            shard=ray.train.get_dataset_shard("train")).run()


def _evaluation_config(config: TrainConfig) -> TrainConfig:
    """The config of rank 0's evaluation copy of a sharded model. Rank 0 builds it alone, so nothing
    in it may create a process group (a grouped contrastive loss does: a collective of every rank);
    evaluation never computes the contrastive loss (it reads embeddings and the heads), which has no
    weights, so the copy gets the local loss, which needs no group."""
    from dataclasses import replace

    objectives = dict(config.objectives)
    if "contrastive" in objectives:
        contrastive = objectives["contrastive"]
        objectives["contrastive"] = replace(contrastive, loss=replace(
            contrastive.loss, mode="local", group_size=None, negnce_weight=0.0))
    return replace(config, objectives=objectives)


def check_groups_follow_nodes(config: TrainConfig, node_of_rank: list, local_world_size: int) -> None:
    """A grouped contrastive loss without ``group_size`` groups the ranks of each node: its groups are
    contiguous runs of ``local_world_size`` ranks, which are the nodes only when every node holds
    that many ranks, numbered node by node (as Ray Train numbers them). Every rank checks the same
    gathered layout, so all of them raise alike instead of some waiting in a group that never forms.

    Raises:
        ConfigError: the nodes hold different numbers of workers (or ranks are not node by node).
    """
    from vlp.config import ConfigError
    from vlp.distributed.collectives import node_groups, rank_groups

    grouped_by_node = [name for name, objective in config.objectives.items()
                       if getattr(getattr(objective, "loss", None), "mode", None) == "grouped"
                       and objective.loss.group_size is None]
    if not grouped_by_node:
        return
    by_node = node_groups(node_of_rank)
    world = len(node_of_rank)
    contiguous = rank_groups(world, local_world_size) if world % local_world_size == 0 else None
    if by_node != contiguous:
        raise ConfigError(
            f"objectives.{grouped_by_node[0]}.loss.group_size is null, so each node's ranks form a "
            f"group, but the workers sit on the nodes as {[len(g) for g in by_node]}: uneven groups "
            "give ranks different negatives. Set the group size (one that divides "
            f"{len(node_of_rank)}), or give every node as many workers (scaling.cpus_per_worker, "
            "node resources)")


class Trainer:
    def __init__(self, config: TrainConfig, plan: RunPlan, *, rank: int, world_size: int,
                 local_world_size: int, shard, node_rank: int = 0):
        import ray.train.torch

        from vlp.distributed.collectives import all_gather_object

        self.cfg, self.plan, self.shard = config, plan, shard
        self.rank, self.world_size = rank, world_size
        # which node each rank is on (one small collective): the default groups of the grouped loss
        # are the nodes, and the bytes the losses send are told apart by whether they crossed nodes
        self.node_of_rank = all_gather_object(node_rank)
        check_groups_follow_nodes(config, self.node_of_rank, local_world_size)
        self.layout_logged = False
        if plan.pid_dir:
            os.makedirs(plan.pid_dir, exist_ok=True)
            with open(os.path.join(plan.pid_dir, f"rank-{rank}.pid"), "w") as f:
                f.write(str(os.getpid()))
        torch.manual_seed(config.seed * 1000 + rank)
        self.device = ray.train.torch.get_device()
        self.bf16 = config.precision == "bf16" or (config.precision == "auto" and self.device.type == "cuda")
        self.tokenizer = cached_tokenizer(plan.tokenizer_dir)
        # the model and the objectives' own heads, as one module: what DDP wraps, FSDP shards and
        # checkpoints hold
        self.pretraining = build_pretraining(config, self.tokenizer, local_world_size=local_world_size)
        self.model = self.pretraining.model
        scaling = config.scaling
        self.parallel = wrap_model(self.pretraining, scaling.strategy, device=self.device,
                                   reshard_after_forward=scaling.fsdp.reshard_after_forward,
                                   bf16=self.bf16)
        self.ddp = self.parallel.module  # what runs the forward
        # after wrapping: FSDP replaces the parameters with their shards
        self.optimizer = build_optimizer(self.pretraining, config.optim)
        # DCP coordinates over a Gloo group of its own: an asynchronous save's collectives then never
        # meet the training step's
        self.checkpoint_group = None
        if self.parallel.sharded:
            from vlp.distributed.sharded_checkpoint import new_checkpoint_group

            self.checkpoint_group = new_checkpoint_group()
        self.writing = None  # the last asynchronous save's future (one at a time)
        self.uploads: list[dict] = []  # checkpoints handed to Ray Train, their times not yet logged
        self.eval_copy = None  # rank 0's whole model for evaluating a sharded one
        self.state = TrainState(mlflow_run_id=plan.mlflow_run_id, world_size=world_size)
        checkpoint = ray.train.get_checkpoint()
        if checkpoint:
            with checkpoint.as_directory() as folder:
                previous = restore_checkpoint(folder, self.parallel, self.optimizer,
                                              group=self.checkpoint_group)
            self.state = TrainState(**{**previous.__dict__, "world_size": world_size,
                                       "mlflow_run_id": plan.mlflow_run_id})
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
        if checkpoint:
            # the MLflow record of a restart (a lost worker or node, an elastic resize, a rerun)
            self.log.metrics({"resumed_at_step": self.state.step, "resumed_world_size": world_size},
                             step=self.state.step)
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
                                           # pinned host memory lets the copy to the GPU run async
                                           pin_memory=self.device.type == "cuda",
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
        lr = lr_at(self.peak_lr, self.cfg.optim, self.state.step, self.state.samples / self.planned_samples)
        return optimizer_step(self.optimizer, self.parallel, lr=lr, grad_clip=self.cfg.optim.grad_clip)

    # ---- the run ----------------------------------------------------------------------------------
    def run(self) -> None:
        sched = self.cfg.schedule
        step_fn = feature_cache_step if self.cfg.feature_accumulation > 1 else plain_step
        ctx = StepContext(model=self.pretraining, ddp=self.ddp,
                          autocast=self._autocast, world_size=self.world_size)
        window = {"start": time.perf_counter(), "wait": 0.0, "samples": 0, "bytes": 0,
                  "cross_node_bytes": 0, "groups": set()}
        status = "FAILED"
        try:
            while self.state.samples < self.planned_samples:
                micro = []
                batches = self._epoch_batches()
                steps_before = self.state.step
                # a checkpoint taken after a pass's last step, before the loop saw its end, resumes
                # with the whole pass to skip: that pass is over, not empty
                resumed_in_pass = self.state.samples_in_epoch > 0
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
                    self._count_traffic(window, result.bytes_by_group)
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
                if self.state.step == steps_before and not resumed_in_pass:
                    raise RuntimeError(f"rank {self.rank} got no full batch from a whole pass over the "
                                       "data: lower data.batch_size or add data")
                self.state.epoch += self.cfg.data.epochs_per_pass
                self.state.samples_in_epoch = 0
            metrics = self._evaluate(final=True)
            self._checkpoint({"loss": float("nan"), **metrics}, final=True)
            status = "FINISHED"
        finally:
            self.log.close(status)

    def _spans_nodes(self, ranks) -> bool:
        return len({self.node_of_rank[r] for r in ranks}) > 1

    def _count_traffic(self, window: dict, by_group: dict) -> None:
        for ranks, nbytes in by_group.items():
            window["groups"].add(ranks)
            if self._spans_nodes(ranks):
                window["cross_node_bytes"] += nbytes

    def _log_layout(self, groups: set) -> None:
        """Once per attempt, at the first log: which node each rank is on and the process groups the
        objectives' collectives sent in (gathered from every rank: a collective), as
        ``process_layout/step-N.json`` in the MLflow run."""
        from vlp.distributed.collectives import all_gather_object, node_groups

        used = sorted({tuple(g) for mine in all_gather_object(sorted(groups)) for g in mine})
        self.layout_logged = True
        self.log.dict({"step": self.state.step, "world_size": self.world_size,
                       "node_of_rank": self.node_of_rank, "ranks_by_node": node_groups(self.node_of_rank),
                       "collective_groups": [list(g) for g in used],
                       "cross_node_groups": [list(g) for g in used if self._spans_nodes(g)]},
                      f"process_layout/step-{self.state.step:07d}.json")

    def _log_window(self, window: dict, loss: float, parts: dict, grad_norm: float) -> None:
        if not self.layout_logged:
            self._log_layout(window["groups"])
        elapsed = max(time.perf_counter() - window["start"], 1e-9)
        steps = max(1, self.cfg.schedule.log_every)
        metrics = {
            "loss/total": loss, **parts,
            "lr": self.optimizer.param_groups[0]["lr"],
            "temperature": 1.0 / float(self.model.scale().detach()),
            "grad_norm": grad_norm,
            "samples_per_second": window["samples"] / elapsed,
            "data_wait_fraction": window["wait"] / elapsed,
            "comm_bytes_per_step": window["bytes"] / steps,
            # of those, the bytes sent in groups that span nodes (the grouped loss keeps it at 0)
            "comm_cross_node_bytes_per_step": window["cross_node_bytes"] / steps,
            "epoch": self.state.samples / max(1, self.plan.train_rows),
            "world_size": self.world_size,
        }
        self.log.metrics(metrics, step=self.state.step)
        if self.rank == 0:
            print(f"[train] step {self.state.step:>5} epoch {metrics['epoch']:.1f} loss {loss:.4f} "
                  f"lr {metrics['lr']:.2e} T {metrics['temperature']:.4f} "
                  f"{metrics['samples_per_second']:.0f} samples/s, data wait "
                  f"{100 * metrics['data_wait_fraction']:.0f}%", flush=True)
        window.update(start=time.perf_counter(), wait=0.0, samples=0, bytes=0, cross_node_bytes=0)

    def _evaluation_model(self):
        """The whole pretraining module for rank 0 to evaluate: the live one, or under ``fsdp`` a copy
        that every rank helps gather (a collective; the other ranks get None)."""
        if not self.parallel.sharded:
            return self.pretraining
        state = self.parallel.full_state_dict()
        if self.rank != 0:
            return None
        if self.eval_copy is None:
            with torch.random.fork_rng(devices=[]):  # building it must not move the training RNG
                self.eval_copy = build_pretraining(_evaluation_config(self.cfg),
                                                   self.tokenizer).to(self.device)
        self.eval_copy.load_state_dict(state)
        return self.eval_copy

    def _evaluate(self, final: bool) -> dict[str, float]:
        if not (self.plan.eval_files or self.plan.classification):
            return {}
        pretraining = self._evaluation_model()
        if self.rank != 0:
            return {}
        from vlp.data.storage import Storage
        from vlp.eval.summary import headline_metrics
        from vlp.eval.zero_shot import evaluate, recall_bar_chart

        texts: dict[str, str] = {}  # readable examples of the heads' output (decoded captions)
        metrics = evaluate(pretraining.model, self.tokenizer, self.cfg.eval,
                           retrieval_files=self.plan.eval_files,
                           classification=self.plan.classification or None,
                           storage=Storage(self.cfg.data.storage), device=self.device,
                           pretraining=pretraining, texts=texts)
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

        started = time.perf_counter()
        metrics = {k: v for k, v in {**metrics, "step": self.state.step,
                                     "samples": self.state.samples}.items()
                   if not (isinstance(v, float) and math.isnan(v))}
        if self.parallel.sharded:
            self._sharded_checkpoint(metrics, final, started)
            return
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if self.rank == 0:
                save_checkpoint(tmp, self.pretraining, self.optimizer, self.state, self.cfg,
                                self.tokenizer.name_or_path)
                self._write_final_metrics(tmp, final)
                self._log_checkpoint_files(tmp, final)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)
        seconds = time.perf_counter() - started  # written and uploaded before training goes on
        self.log.metrics({"checkpoint/blocked_s": seconds, "checkpoint/total_s": seconds},
                         step=self.state.step)

    def _sharded_checkpoint(self, metrics: dict, final: bool, started: float) -> None:
        """Every rank writes its shards into a folder of its own, which Ray Train merges into one
        checkpoint. Only copying the state to CPU memory and the report (a barrier) hold up the step
        loop: the shards are written in a background thread, and Ray Train's asynchronous upload
        waits for them before copying them to the run's storage. The final checkpoint is written and
        uploaded before the run ends."""
        import ray.train
        from ray.train import CheckpointUploadMode

        if self.writing is not None:
            self.writing.result()  # one save at a time: two would share the checkpoint group
        folder = tempfile.mkdtemp(prefix="vlp-checkpoint-")
        writing = save_sharded_checkpoint(
            folder, self.parallel.module, self.optimizer, self.state, self.cfg,
            self.tokenizer.name_or_path, rank=self.rank, strategy=self.parallel.strategy,
            group=self.checkpoint_group, asynchronous=not final)
        if self.rank == 0:
            self._write_final_metrics(folder, final)
            self._log_checkpoint_files(folder, final)
        self.writing = writing
        record = {"step": self.state.step, "started": started}

        storage = ray.train.get_context().get_storage()

        def upload(checkpoint, dir_name: str):  # runs in Ray Train's upload thread
            if writing is not None:
                writing.result()  # this rank's shards are on disk (raises the writer's error)
            persisted = storage.persist_current_checkpoint(checkpoint, dir_name)  # Ray's own copy
            record["done"] = time.perf_counter()
            return persisted

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                         checkpoint_upload_mode=(CheckpointUploadMode.SYNC if final
                                                 else CheckpointUploadMode.ASYNC),
                         delete_local_checkpoint_after_upload=True, checkpoint_upload_fn=upload)
        record["blocked"] = time.perf_counter() - started
        self.uploads.append(record)
        self._log_uploads()

    def _log_uploads(self) -> None:
        """Log the times of the checkpoints whose upload finished since the last call."""
        for record in [r for r in self.uploads if "done" in r]:
            # a synchronous (final) upload finishes inside the report, before the loop moves on
            done = max(record["done"], record["started"] + record["blocked"])
            self.log.metrics({"checkpoint/blocked_s": record["blocked"],
                              "checkpoint/total_s": done - record["started"]},
                             step=record["step"])
            self.uploads.remove(record)

    def _write_final_metrics(self, folder: str, final: bool) -> None:
        if final:
            with open(os.path.join(folder, EVAL_FILE), "w") as f:
                json.dump(getattr(self, "final_metrics", {}), f, indent=2)

    def _log_checkpoint_files(self, folder: str, final: bool) -> None:
        """Rank 0's checkpoint files to MLflow: the whole checkpoint under ``ddp``; under ``fsdp``
        the small files (config, state, tokenizer, format, eval), as the shards are spread over the
        ranks (the whole checkpoint is in Ray Train's storage: ``output_dir/run_name``)."""
        if not self.cfg.tracking.log_checkpoints:
            return
        name = "final" if final else f"step-{self.state.step:07d}"
        if not self.parallel.sharded:
            self.log.artifacts(folder, f"checkpoints/{name}")
            return
        for entry in sorted(os.listdir(folder)):
            path = os.path.join(folder, entry)
            if entry == SHARDED_DIR:
                continue
            if os.path.isdir(path):
                self.log.artifacts(path, f"checkpoints/{name}/{entry}")
            else:
                self.log.artifact(path, f"checkpoints/{name}")
