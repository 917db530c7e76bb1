"""One optimiser step's forward and backward, in its two forms (the optimiser update is the loop's).

- ``plain_step``: each micro-batch is its own forward and backward (gradient accumulation when there
  are several; DDP and FSDP sync on the last one only). Negatives come from one micro-batch.
- ``feature_cache_step``: GradCache-style batch accumulation for contrastive objectives: encode every
  micro-batch without a graph, take the loss over all their features at once (negatives from the whole
  pool), then re-encode each micro-batch with a graph and push the cached feature gradients through
  it. Memory holds one micro-batch's graph; the negatives are those of the whole pool.

Both call the registered objectives and sum their weighted losses; neither knows which objectives run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from vlp.distributed.collectives import all_reduce_sum
from vlp.distributed.sharding import skip_gradient_sync


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite: training stops instead of going on with broken weights."""


@dataclass
class StepResult:
    loss: float  # the mean over ranks of the weighted total loss
    parts: dict[str, float]  # this rank's unweighted loss per objective
    bytes_sent: int  # this rank's cross-rank traffic in the step (forward and backward)
    # the same by process group (its global ranks): which of it crossed nodes
    bytes_by_group: dict[tuple[int, ...], int] = field(default_factory=dict)


@dataclass
class StepContext:
    model: nn.Module  # the unwrapped PretrainingModel (model + objectives)
    # what runs the forward: DDP around ``model``, or ``model`` itself (alone, or sharded in place by
    # FSDP: ``vlp.train.parallel``)
    ddp: nn.Module
    autocast: Callable[[], contextlib.AbstractContextManager]
    step: int = 0  # for error messages
    world_size: int = 1


def weighted_total(objectives: dict, results: dict):
    """The weighted sum of the objectives' losses and the parts to log (unweighted, detached)."""
    total, parts = None, {}
    for name, out in results.items():
        term = objectives[name].cfg.weight * out.loss
        total = term if total is None else total + term
        parts[f"loss/{name}"] = out.loss.detach()
        for key, value in out.metrics.items():
            parts[f"{name}/{key}"] = value
    return total, parts


def mean_loss_or_raise(ctx: StepContext, total: torch.Tensor, parts: dict) -> float:
    """All ranks agree on the mean loss and on whether any rank went non-finite (one tiny
    all-reduce), so every rank stops at the same step with the same clear error."""
    value = total.detach().float()
    finite = torch.isfinite(value)
    summary = torch.stack([torch.where(finite, value, torch.zeros_like(value)), (~finite).float()])
    summary = all_reduce_sum(summary).cpu()  # reduced on the device: NCCL reduces only GPU tensors
    if summary[1] > 0:
        detail = ", ".join(f"{k}={float(v):.4g}" for k, v in parts.items())
        raise NonFiniteLossError(
            f"non-finite loss at step {ctx.step} on {int(summary[1])} of {ctx.world_size} ranks "
            f"(this rank: {detail}); lower optim.lr, check the data, or resume from the last "
            "checkpoint")
    return float(summary[0]) / ctx.world_size


def _sync_on_last(ctx: StepContext, i: int, n: int):
    if i == n - 1:
        return contextlib.nullcontext()
    # gradients are averaged (DDP) or reduce-scattered (FSDP) across ranks once, after the last
    # micro-batch; before it they accumulate on each rank
    return skip_gradient_sync(ctx.ddp)


def _add_traffic(by_group: dict, results: dict) -> int:
    """Add the objectives' bytes by group into ``by_group``; returns their bytes in all (read after
    backward: the differentiable collectives count their gradients' traffic there)."""
    for out in results.values():
        for ranks, nbytes in out.bytes_by_group.items():
            by_group[ranks] = by_group.get(ranks, 0) + nbytes
    return sum(o.bytes_sent for o in results.values())


def plain_step(ctx: StepContext, micro: list[dict]) -> StepResult:
    n, sent, loss = len(micro), 0, 0.0
    parts: dict = {}
    by_group: dict = {}
    for i, batch in enumerate(micro):
        with _sync_on_last(ctx, i, n):
            with ctx.autocast():
                _, results = ctx.ddp(batch)
                total, parts = weighted_total(ctx.model.objectives, results)
            loss += mean_loss_or_raise(ctx, total, parts) / n
            (total / n).backward()
        sent += _add_traffic(by_group, results)
    return StepResult(loss, {k: float(v) for k, v in parts.items()}, sent, by_group)


def _rng_state():
    """The CPU generator's state and, when CUDA is in use, every device's (dropout and masks are
    drawn on the training device)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.random.get_rng_state(), cuda


def _set_rng_state(state) -> None:
    cpu, cuda = state
    torch.random.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


FEATURE_KEYS = ("image_embeds", "text_embeds")
SCALAR_KEYS = ("logit_scale", "logit_bias")


def feature_cache_step(ctx: StepContext, micro: list[dict]) -> StepResult:
    n = len(micro)
    rng_states, cached = [], []
    with torch.no_grad(), ctx.autocast():
        for batch in micro:
            rng_states.append(_rng_state())
            cached.append(ctx.model(batch, encode_only=True))
    pool = {key: torch.cat([c[key] for c in cached]).float().requires_grad_() for key in FEATURE_KEYS}
    for key in SCALAR_KEYS:
        if key in cached[0]:
            pool[key] = cached[0][key].detach().float().requires_grad_()
    objectives = ctx.model.objectives
    results = {name: objective(pool, {}, ctx.model.model) for name, objective in objectives.items()}
    total, parts = weighted_total(objectives, results)
    loss = mean_loss_or_raise(ctx, total, parts)
    total.backward()
    by_group: dict = {}
    sent = _add_traffic(by_group, results)
    sizes = [c[FEATURE_KEYS[0]].shape[0] for c in cached]
    grads = {key: pool[key].grad.split(sizes) for key in FEATURE_KEYS}
    for i, batch in enumerate(micro):
        with _sync_on_last(ctx, i, n):
            _set_rng_state(rng_states[i])  # the same dropout and masks as the cached pass
            with ctx.autocast():
                out = ctx.ddp(batch, encode_only=True)
            surrogate = sum((out[key].float() * grads[key][i]).sum() for key in FEATURE_KEYS)
            for key in SCALAR_KEYS:
                if key in pool and pool[key].grad is not None:
                    # shared scalars: their gradient is spread over the micro-batches, so that every
                    # backward uses every parameter (DDP expects that) and the sum is exact
                    surrogate = surrogate + out[key].float() * (pool[key].grad / n)
            surrogate.backward()
    return StepResult(loss, {k: float(v) for k, v in parts.items()}, sent, by_group)
