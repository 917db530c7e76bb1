"""Worker side of the multi-process tests (spawned processes import these functions by name).

:func:`run_loss_checks` runs on every rank of a real Gloo group, computes every scenario the tests
check (losses and their gradients, raw collectives, DDP parameter gradients, bad configs) and saves
its raw results to ``<outdir>/rank<r>.pt``. The tests in ``test_losses.py`` load them and compare
against single-process references. :func:`run_fsdp_checks` (``test_fsdp.py``: one step under DDP and
under FSDP per recipe) and :func:`run_checkpoint_phase` (``test_distributed_checkpoint.py``: save,
resume and reshard) do the same for sharded training; :func:`spawn_ranks` starts their ranks. This
file only produces numbers, it asserts nothing.
"""

from __future__ import annotations

import dataclasses

import math
import os
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vlp.distributed import collectives
from vlp.losses import ContrastiveLossConfig, build_contrastive_loss

BATCH = 5  # per rank; odd on purpose
DIM = 16
LOGIT_SCALE = 14.0
LOGIT_BIAS = -2.0
TOWER_IN = 12


def make_features(world: int, batch: int = BATCH, dim: int = DIM, seed: int = 0):
    """The whole job's L2-normalised (image, text) features, rank r owns rows [r*B, (r+1)*B)."""
    gen = torch.Generator().manual_seed(seed + world)
    images = F.normalize(torch.randn(world * batch, dim, generator=gen), dim=1)
    # Texts correlated with their images, so the loss is not at chance level.
    texts = F.normalize(images + 0.7 * torch.randn(world * batch, dim, generator=gen), dim=1)
    return images, texts


def make_tower_inputs(world: int, batch: int = BATCH, seed: int = 1):
    """Raw inputs of the DDP towers for the whole job."""
    gen = torch.Generator().manual_seed(seed + world)
    images = torch.randn(world * batch, TOWER_IN, generator=gen)
    return images, images @ torch.randn(TOWER_IN, TOWER_IN, generator=gen) * 0.5


def collective_weights(world: int, rank: int, rows: int, dim: int) -> torch.Tensor:
    """A distinct upstream gradient per rank, so a wrong reduce-scatter cannot pass by symmetry."""
    gen = torch.Generator().manual_seed(1000 * world + rank)
    return torch.randn(rows, dim, generator=gen)


class TinyTowers(nn.Module):
    """Linear image and text towers plus the scale (and bias) parameters, as a model would own them."""

    def __init__(self, with_bias: bool, dim: int = DIM):
        super().__init__()
        self.image = nn.Linear(TOWER_IN, dim)
        self.text = nn.Linear(TOWER_IN, dim)
        self.log_scale = nn.Parameter(torch.tensor(math.log(LOGIT_SCALE)))
        self.bias = nn.Parameter(torch.tensor(LOGIT_BIAS)) if with_bias else None

    def forward(self, images, texts):
        return (F.normalize(self.image(images), dim=1), F.normalize(self.text(texts), dim=1),
                self.log_scale.exp(), self.bias)


NEGNCE = "negnce_"  # the prefix of the NegNCE scenarios
NEGNCE_WEIGHT = 0.5
NEGNCE_MARGIN = 0.1


def loss_configs(world: int) -> dict[str, ContrastiveLossConfig]:
    """Every loss scenario run at this world size, by name."""
    configs = {
        "global": ContrastiveLossConfig(mode="global"),
        "local": ContrastiveLossConfig(mode="local"),
        "sigmoid": ContrastiveLossConfig(mode="sigmoid"),
    }
    for k in (1, 2, 4):
        if world % k == 0:
            configs[f"grouped_k{k}"] = ContrastiveLossConfig(mode="grouped", group_size=k)
    # every softmax scenario again with NegNCE on (a margin > 0 exercises the cosine-to-logit step)
    configs.update({NEGNCE + name: dataclasses.replace(config, negnce_weight=NEGNCE_WEIGHT,
                                                       negnce_margin=NEGNCE_MARGIN)
                    for name, config in configs.items() if config.mode != "sigmoid"})
    return configs


def _one_loss(loss_fn, images, texts, bias_needed: bool) -> dict:
    images = images.clone().requires_grad_(True)
    texts = texts.clone().requires_grad_(True)
    scale = torch.tensor(LOGIT_SCALE, requires_grad=True)
    bias = torch.tensor(LOGIT_BIAS, requires_grad=True) if bias_needed else None
    out = loss_fn(images, texts, scale, bias)
    forward_bytes = out.comm.forward_bytes
    out.loss.backward()
    return {
        "loss": out.loss.detach(), "num_negatives": out.num_negatives,
        "grad_images": images.grad, "grad_texts": texts.grad, "grad_scale": scale.grad,
        "grad_bias": None if bias is None else bias.grad,
        "forward_bytes_before_backward": forward_bytes,
        "forward_bytes": out.comm.forward_bytes, "backward_bytes": out.comm.backward_bytes,
    }


def _loss_scenarios(world: int, rank: int, local_world_size: int | None) -> dict:
    images, texts = make_features(world)
    mine = slice(rank * BATCH, (rank + 1) * BATCH)
    results = {}
    for name, config in loss_configs(world).items():
        loss_fn = build_contrastive_loss(config, local_world_size=local_world_size)
        results[name] = _one_loss(loss_fn, images[mine], texts[mine], loss_fn.uses_logit_bias)
    # group_size=None takes the ranks per node from the caller.
    loss_fn = build_contrastive_loss(ContrastiveLossConfig(mode="grouped"), local_world_size=2)
    results["grouped_node"] = _one_loss(loss_fn, images[mine], texts[mine], False)
    # Every reduce-scatter implementation (the default on Gloo is all_to_all), forced in turn.
    backend = str(dist.get_backend())
    default = collectives._REDUCE_SCATTER_IMPL.get(backend)
    try:
        for impl in ("reduce_scatter", "all_reduce", "all_to_all"):
            collectives._REDUCE_SCATTER_IMPL[backend] = impl
            loss_fn = build_contrastive_loss(ContrastiveLossConfig(mode="grouped", group_size=2))
            results[f"grouped_k2_{impl}"] = _one_loss(loss_fn, images[mine], texts[mine], False)
    finally:
        collectives._REDUCE_SCATTER_IMPL[backend] = default
    return results


def _collective_scenarios(world: int, rank: int) -> dict:
    """Raw collectives in the world group and in groups of 2 (ranks {2, 3} exclude global rank 0)."""
    results = {}
    for k in (2, world) if world > 2 else (world,):
        group = collectives.new_rank_group(k)
        for name, collective in (("gather", collectives.gather_with_grad),
                                 ("ring", collectives.ring_exchange)):
            x = (torch.arange(3 * 4, dtype=torch.float32).reshape(3, 4) + 100 * rank).requires_grad_()
            counter = collectives.CommCounter()
            out = collective(x, group, counter=counter)
            (out * collective_weights(world, rank, *out.shape)).sum().backward()
            results[f"{name}_k{k}"] = {"out": out.detach(), "grad": x.grad.clone(),
                                       "forward_bytes": counter.forward_bytes,
                                       "backward_bytes": counter.backward_bytes,
                                       "by_group": dict(counter.by_group)}
    return results


def _ddp_scenarios(world: int, rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    images, texts = make_tower_inputs(world)
    mine = slice(rank * BATCH, (rank + 1) * BATCH)
    results = {}
    for name, config in loss_configs(world).items():
        if name == "grouped_k1":
            continue
        loss_fn = build_contrastive_loss(config)
        torch.manual_seed(7)
        model = DistributedDataParallel(TinyTowers(with_bias=loss_fn.uses_logit_bias))
        image_features, text_features, scale, bias = model(images[mine], texts[mine])
        loss_fn(image_features, text_features, scale, bias).loss.backward()
        results[name] = {n: p.grad.clone() for n, p in model.module.named_parameters()}
    return results


def _error_scenarios(world: int) -> dict:
    messages = {}
    for name, make in {
        "k_not_dividing": lambda: build_contrastive_loss(
            ContrastiveLossConfig(mode="grouped", group_size=3)),
        "k_unset": lambda: build_contrastive_loss(ContrastiveLossConfig(mode="grouped")),
    }.items():
        try:
            make()
            messages[name] = None
        except ValueError as e:
            messages[name] = str(e)
    return messages


def run_rank(rank: int, compute, world: int, port: int, outdir: str) -> None:
    """Entry point of one spawned rank (``mp.spawn(run_rank, args=(compute, world, port, outdir))``):
    join a gloo group on 127.0.0.1, save ``compute(rank, world)`` as ``rank<r>.pt`` (or the traceback
    as ``rank<r>.error``), leave the group. ``compute`` must be a module-level function."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    try:
        torch.save(compute(rank, world), os.path.join(outdir, f"rank{rank}.pt"))
    except Exception:
        with open(os.path.join(outdir, f"rank{rank}.error"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


# What every rank of the FSDP and checkpoint tests imports: loaded once by the fork server, so that a
# group of ranks starts in seconds instead of each rank importing torch and transformers anew (four
# ranks doing that on two cores take half a minute).
PRELOAD = ["torch", "torch.distributed.fsdp", "torch.distributed.checkpoint", "transformers",
           "transformers.models.vit.modeling_vit", "transformers.models.bert.modeling_bert",
           "tests.dist_workers", "vlp.objectives.pretraining", "vlp.train.parallel",
           "vlp.train.checkpoint", "vlp.train.steps"]


class RankFailed(RuntimeError):
    """A spawned rank raised; the message holds every failing rank's traceback."""


def spawn_ranks(entry, world: int, outdir: str, *args) -> list:
    """Run ``entry(rank, world, port, outdir, *args)`` on ``world`` processes (forked from a server
    that preloaded ``PRELOAD``) and return each rank's saved results (``rank<r>.pt``).

    Raises:
        RankFailed: a rank raised (its traceback is in the message).
    """
    import glob
    import multiprocessing

    import torch.multiprocessing as mp

    from tests.conftest import free_port

    multiprocessing.set_forkserver_preload(PRELOAD)  # no effect once the server runs: still correct
    try:
        mp.start_processes(entry, args=(world, free_port(), outdir, *args), nprocs=world, join=True,
                           start_method="forkserver")
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
        errors = []
        for path in sorted(glob.glob(os.path.join(outdir, "*.error"))):
            with open(path) as f:
                errors.append(f.read())
        raise RankFailed(f"world size {world}: a rank failed\n{''.join(errors) or e}") from None
    return [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False) for r in range(world)]


def loss_results(rank: int, world: int) -> dict:
    """Every loss, collective, DDP and error scenario of one rank."""
    return {
        "losses": _loss_scenarios(world, rank, local_world_size=None),
        "collectives": _collective_scenarios(world, rank),
        "ddp": _ddp_scenarios(world, rank),
        "errors": _error_scenarios(world),
    }


def run_loss_checks(rank: int, world: int, port: int, outdir: str) -> None:
    """Entry point of one spawned rank: run every scenario, save the results, leave the group."""
    run_rank(rank, loss_results, world, port, outdir)


# ------------------------------------------------------------------------------------------------
# FSDP against DDP, and distributed checkpoints (tests/test_fsdp.py, tests/test_distributed_checkpoint.py)
#
# Each scenario is a TrainConfig built as ``vlp train`` builds one, trained through the loop's own
# pieces (``build_pretraining``, ``wrap_model``, ``build_optimizer``, the step functions and
# ``optimizer_step``); the workers return losses, gradient norms and whole parameters, the tests compare.

# Narrow towers: the files run a dozen models' steps on 2 shared cores. No dropout, so that a rank's
# RNG draws only what both strategies draw alike (masks, negatives).
SMALL = "{hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 64"
NO_DROP = ", hidden_dropout_prob: 0.0, attention_probs_dropout_prob: 0.0}"
TEXT_LENGTH, IMAGE_SIZE, FRAMES = 8, 16, 2
STEP_LR = 1e-3
GRAD_CLIP = 0.05  # below the tiny models' gradient norms, so every step clips


def fsdp_scenarios() -> dict[str, list[str]]:
    """{name: TrainConfig overrides}: the recipes whose FSDP step must equal their DDP step."""
    dual = [f"model.image_size={IMAGE_SIZE}", f"model.max_text_length={TEXT_LENGTH}",
            "model.embed_dim=32",
            f"model.image.options={SMALL}, patch_size: 8{NO_DROP}",
            f"model.text.options={SMALL}{NO_DROP}", f"optim.grad_clip={GRAD_CLIP}"]
    return {
        # M2-Encoder's grouped loss on a ViT + BERT dual encoder, with activation checkpointing in
        # both towers (applied when they are built, before fully_shard)
        "dual_grouped": [*dual, "objectives={contrastive: {loss: {mode: grouped, group_size: 2}}}",
                         "model.image.gradient_checkpointing=true",
                         "model.text.gradient_checkpointing=true"],
        # GradCache: 2 micro-batches pooled as negatives (SigLIP's ring exchange, its scalar bias)
        "dual_feature_cache": [*dual, "objectives={contrastive: {loss: {mode: sigmoid}}}",
                               "model.init_logit_bias=-10.0", "feature_accumulation=2"],
        # SimVTP: a video tower over visible tubes, a joint fusion encoder, MAE + MLM + VTC + VTM
        "simvtp": [f"model.image_size={IMAGE_SIZE}", f"model.max_text_length={TEXT_LENGTH}",
                   "model.embed_dim=32", f"model.num_frames={FRAMES}",
                   "model.image.name=video_vit",
                   f"model.image.options={SMALL}, patch_size: 8}}",
                   "model.text.name=transformer",
                   ("model.text.options={hidden_size: 32, num_hidden_layers: 1, "
                    "num_attention_heads: 2, intermediate_size: 64}"),
                   "model.fusion={layers: 1, mode: joint, heads: 2}",
                   "masking={vision: {ratio: 0.5}, text: {ratio: 0.3}}",
                   ("objectives={mae: {source: fused, decoder_width: 32, decoder_heads: 2}, mlm: {}, "
                    "contrastive: {loss: {mode: local}}, matching: {negatives: hard}}"),
                   f"optim.grad_clip={GRAD_CLIP}"],
    }


def scenario_config(overrides: list[str], world: int):
    from vlp.config import load_config
    from vlp.train.config import TrainConfig

    return load_config(TrainConfig, None, ["data.batch_size=4", "optim.warmup_steps=0",
                                           f"scaling.num_workers={world}", *overrides])


def make_tokenizer(folder: str) -> str:
    """A small WordPiece tokenizer saved in ``folder`` (made once by the test, read by every rank)."""
    from vlp.data.tokenizer import TokenizerConfig, train_tokenizer

    words = ["a", "red", "green", "blue", "circle", "square", "star", "ring", "on", "the", "left",
             "right", "top", "of", "small", "big"]
    captions = [" ".join(words[(i * 7 + j) % len(words)] for j in range(6)) for i in range(60)]
    train_tokenizer(captions, TokenizerConfig(vocab_size=120)).save_pretrained(folder)
    return folder


def make_batch(cfg, tokenizer, rows: int, seed: int) -> dict[str, torch.Tensor]:
    """Pixels and captions (CLS ... SEP PAD, lengths varying) as the input pipeline delivers them."""
    gen = torch.Generator().manual_seed(seed)
    frames = cfg.model.num_frames
    shape = (rows, 3, IMAGE_SIZE, IMAGE_SIZE) if frames == 1 else (rows, frames, 3, IMAGE_SIZE,
                                                                   IMAGE_SIZE)
    ids = torch.randint(len(tokenizer.all_special_ids), len(tokenizer), (rows, TEXT_LENGTH),
                        generator=gen)
    ids[:, 0] = tokenizer.cls_token_id
    attn = torch.ones(rows, TEXT_LENGTH, dtype=torch.long)
    for i in range(rows):
        end = TEXT_LENGTH - i % 3
        ids[i, end - 1] = tokenizer.sep_token_id
        ids[i, end:] = tokenizer.pad_token_id
        attn[i, end:] = 0
    return {"pixels": torch.randn(shape, generator=gen), "input_ids": ids, "attention_mask": attn}


def build_parallel(cfg, tokenizer, strategy: str, *, reshard_after_forward: bool = True):
    """What the Trainer builds: the pretraining module from one seed (as rank 0's would be), wrapped
    for ``strategy``, and its optimiser."""
    from vlp.objectives.pretraining import build_pretraining
    from vlp.train.optim import build_optimizer
    from vlp.train.parallel import wrap_model

    torch.manual_seed(cfg.seed)
    pretraining = build_pretraining(cfg, tokenizer, local_world_size=2)
    parallel = wrap_model(pretraining, strategy, device="cpu",
                          reshard_after_forward=reshard_after_forward)
    return parallel, build_optimizer(pretraining, cfg.optim)


def train_step(cfg, parallel, optimizer, micro: list[dict], *, rng_seed: int, step: int = 0) -> dict:
    """One optimiser step as the loop runs it; the RNG is seeded first so that both strategies draw
    the same masks and negatives."""
    import contextlib

    from vlp.train.optim import optimizer_step
    from vlp.train.steps import StepContext, feature_cache_step, plain_step

    ctx = StepContext(model=parallel.model, ddp=parallel.module, autocast=contextlib.nullcontext,
                      world_size=collectives.world_size(), step=step)
    torch.manual_seed(rng_seed)
    step_fn = feature_cache_step if cfg.feature_accumulation > 1 else plain_step
    result = step_fn(ctx, micro)
    grad_norm = optimizer_step(optimizer, parallel, lr=STEP_LR, grad_clip=cfg.optim.grad_clip)
    return {"loss": result.loss, "grad_norm": grad_norm}


def full_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter whole (sharded ones gathered: a collective)."""
    from vlp.distributed.sharding import full_tensor

    return {name: full_tensor(p.detach()).clone() for name, p in model.named_parameters()}


def shard_sizes(parallel, optimizer) -> dict:
    """Elements this rank holds of the parameters and of AdamW's moments, against the whole model's
    and the most a rank could hold of it (each sharded tensor's largest shard, FSDP's padded size)."""
    from torch.distributed.tensor import DTensor

    from vlp.distributed.sharding import local_numel

    world = collectives.world_size()
    params = list(parallel.model.parameters())
    moments = [optimizer.state[p][key] for p in params if p in optimizer.state
               for key in ("exp_avg", "exp_avg_sq")]
    total = sum(p.numel() for p in params)
    bound = 0
    for p in params:
        if isinstance(p, DTensor):
            rows = p.shape[0]
            bound += -(-rows // world) * (p.numel() // max(rows, 1))
        else:
            bound += p.numel()
    return {"params": sum(local_numel(p) for p in params),
            "moments": sum(local_numel(m) for m in moments),
            "total": total, "bound": bound,
            "sharded": sum(isinstance(p, DTensor) for p in params), "count": len(params)}


def fsdp_results(rank: int, world: int, tokenizer_dir: str) -> dict:
    """Every scenario's one step under DDP and under FSDP (and FSDP keeping gathered parameters
    from forward to backward) on this rank's batches."""
    from vlp.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    results = {}
    for name, overrides in fsdp_scenarios().items():
        cfg = scenario_config(overrides, world)
        micro = [make_batch(cfg, tokenizer, 4, seed=100 * rank + i)
                 for i in range(cfg.feature_accumulation)]
        runs = {}
        for label, strategy, reshard in (("ddp", "ddp", True), ("fsdp", "fsdp", True),
                                         ("fsdp_keep", "fsdp", False)):
            if label == "fsdp_keep" and name != "simvtp":
                continue
            parallel, optimizer = build_parallel(cfg, tokenizer, strategy,
                                                 reshard_after_forward=reshard)
            out = train_step(cfg, parallel, optimizer, micro, rng_seed=1000 + rank)
            out["params"] = full_parameters(parallel.model)
            out["sizes"] = shard_sizes(parallel, optimizer)
            runs[label] = out
        results[name] = runs
    return results


def run_fsdp_checks(rank: int, world: int, port: int, outdir: str, tokenizer_dir: str) -> None:
    """Entry point of one spawned rank for tests/test_fsdp.py."""
    import functools

    run_rank(rank, functools.partial(fsdp_results, tokenizer_dir=tokenizer_dir), world, port, outdir)


# The checkpoint scenario: a dual encoder with the global contrastive loss on a fixed global batch split
# evenly over the ranks, so that the loss (the mean of the ranks' losses) and the update do not depend
# on the world size and runs at 2 and 4 ranks can continue each other.
GLOBAL_BATCH = 8


def checkpoint_config(world: int, seed: int = 0):
    dual = [f"model.image_size={IMAGE_SIZE}", f"model.max_text_length={TEXT_LENGTH}",
            "model.embed_dim=32", f"model.image.options={SMALL}, patch_size: 8{NO_DROP}",
            f"model.text.options={SMALL}{NO_DROP}", f"optim.grad_clip={GRAD_CLIP}",
            "objectives={contrastive: {loss: {mode: global}}}", f"seed={seed}"]
    return scenario_config(dual, world)


def _train(cfg, parallel, optimizer, tokenizer, steps, rank: int, world: int) -> list[float]:
    """Steps ``steps`` (numbers name the global batches), this rank on its slice of each."""
    rows = GLOBAL_BATCH // world
    losses = []
    for step in steps:
        batch = make_batch(cfg, tokenizer, GLOBAL_BATCH, seed=10_000 + step)
        mine = {k: v[rank * rows:(rank + 1) * rows] for k, v in batch.items()}
        losses.append(train_step(cfg, parallel, optimizer, [mine], rng_seed=step, step=step)["loss"])
    return losses


def _state(world: int):
    from vlp.train.checkpoint import TrainState

    return TrainState(step=1, samples=GLOBAL_BATCH, mlflow_run_id="run", world_size=world)


def _merge_rank_folders(root: str, name: str, rank: int, world: int) -> str:
    """What Ray Train does with the folders every rank reported: one checkpoint folder holding all
    their files."""
    import shutil

    merged = os.path.join(root, name)
    dist.barrier()
    if rank == 0:
        for r in range(world):
            shutil.copytree(os.path.join(root, f"{name}-rank{r}"), merged, dirs_exist_ok=True)
    dist.barrier()
    return merged


def checkpoint_results(rank: int, world: int, tokenizer_dir: str, root: str, phase: str) -> dict:
    """One phase of the resharding test (see tests/test_distributed_checkpoint.py)."""
    from vlp.data.tokenizer import load_tokenizer
    from vlp.distributed.sharded_checkpoint import new_checkpoint_group
    from vlp.train.checkpoint import (
        restore_checkpoint,
        save_checkpoint,
        save_sharded_checkpoint,
    )

    tokenizer = load_tokenizer(tokenizer_dir)
    group = new_checkpoint_group()
    cfg = checkpoint_config(world)
    out: dict = {}

    def uninterrupted(name: str, strategy: str) -> list[float]:
        """Step 1, checkpoint, steps 2 and 3; the checkpoint is written while steps 2 and 3 run."""
        parallel, optimizer = build_parallel(cfg, tokenizer, strategy)
        _train(cfg, parallel, optimizer, tokenizer, [1], rank, world)
        if strategy == "fsdp":
            writing = save_sharded_checkpoint(
                os.path.join(root, f"{name}-rank{rank}"), parallel.module, optimizer, _state(world),
                cfg, tokenizer_dir, rank=rank, strategy=strategy, group=group, asynchronous=True)
            out[f"{name}_saved"] = full_parameters(parallel.model)  # as it was saved
            losses = _train(cfg, parallel, optimizer, tokenizer, [2, 3], rank, world)
            writing.result()
            _merge_rank_folders(root, name, rank, world)
        else:
            if rank == 0:
                save_checkpoint(os.path.join(root, name), parallel.model, optimizer, _state(world),
                                cfg, tokenizer_dir)
            dist.barrier()
            losses = _train(cfg, parallel, optimizer, tokenizer, [2, 3], rank, world)
        return losses

    def resumed(name: str, strategy: str) -> dict:
        """A run built from another seed that restores checkpoint ``name``, then steps 2 and 3."""
        other = checkpoint_config(world, seed=1)
        parallel, optimizer = build_parallel(other, tokenizer, strategy)
        state = restore_checkpoint(os.path.join(root, name), parallel, optimizer, group=group)
        return {"step": state.step,
                "losses": _train(cfg, parallel, optimizer, tokenizer, [2, 3], rank, world)}

    if phase == "first":  # 2 ranks
        out["fsdp2"] = uninterrupted("fsdp2", "fsdp")
        out["ddp2"] = uninterrupted("ddp2", "ddp")
        out["ddp2_into_fsdp"] = resumed("ddp2", "fsdp")
        parallel, optimizer = build_parallel(checkpoint_config(world, seed=1), tokenizer, "fsdp")
        out["not_restored"] = _train(cfg, parallel, optimizer, tokenizer, [2, 3], rank, world)
    elif phase == "grow":  # 4 ranks
        out["fsdp2_into_fsdp"] = resumed("fsdp2", "fsdp")
        out["fsdp2_into_ddp"] = resumed("fsdp2", "ddp")
        out["fsdp4"] = uninterrupted("fsdp4", "fsdp")
    elif phase == "shrink":  # 2 ranks
        out["fsdp4_into_fsdp"] = resumed("fsdp4", "fsdp")
    if rank:  # every rank's losses agree; rank 0's whole weights are enough
        out = {k: v for k, v in out.items() if not k.endswith("_saved")}
    return out


def run_checkpoint_phase(rank: int, world: int, port: int, outdir: str, tokenizer_dir: str,
                         root: str, phase: str) -> None:
    """Entry point of one spawned rank for tests/test_distributed_checkpoint.py."""
    import functools

    run_rank(rank, functools.partial(checkpoint_results, tokenizer_dir=tokenizer_dir, root=root,
                                     phase=phase), world, port, outdir)
