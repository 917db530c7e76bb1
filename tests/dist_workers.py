"""Worker side of the multi-process loss tests (spawned processes import these functions by name).

:func:`run_loss_checks` runs on every rank of a real Gloo group, computes every scenario the tests
check (losses and their gradients, raw collectives, DDP parameter gradients, bad configs) and saves
its raw results to ``<outdir>/rank<r>.pt``. The tests in ``test_losses.py`` load them and compare
against single-process references; this file only produces numbers, it asserts nothing.
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
                                       "backward_bytes": counter.backward_bytes}
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
