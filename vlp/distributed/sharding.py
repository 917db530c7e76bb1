"""Sharded data parallelism (FSDP2) and the gradient bookkeeping that goes with it.

The ``torch.distributed`` side of ``scaling.strategy: fsdp``: which modules become FSDP units is the
caller's decision (``vlp.train.parallel`` knows the model); how they are sharded, how gradients are
synchronised, clipped and gathered is here, so that the training code never calls
``torch.distributed`` itself. What lives here:

- :func:`shard_modules`: rank 0's weights to every rank, then ``fully_shard`` on each unit
  (bottom-up) and on the root. Parameters with no dimension (the temperature, SigLIP's bias) cannot be
  sharded by FSDP2; they stay whole on every rank and their gradients are averaged by
  :func:`all_reduce_mean_` (the caller does it once per optimiser step).
- :func:`skip_gradient_sync`: gradient accumulation without communication, for DDP and FSDP alike.
- :func:`clip_grad_norm_`: clipping by the norm of the whole job's gradient, sharded or not.
- :func:`full_state_dict`: the whole model's weights gathered on rank 0 (for evaluation; checkpoints
  never do this, see :mod:`vlp.distributed.sharded_checkpoint`).
- :func:`local_numel`: elements a rank holds of a tensor (the memory a sharded tensor costs it).

Conventions as in :mod:`vlp.distributed.collectives`: without an initialised process group the
reductions are the identity.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from vlp.distributed.collectives import is_initialized, world_size

__all__ = [
    "all_reduce_mean_",
    "broadcast_module_state",
    "clip_grad_norm_",
    "full_state_dict",
    "full_tensor",
    "is_fsdp",
    "local_numel",
    "shard_modules",
    "skip_gradient_sync",
]


def is_fsdp(module: nn.Module) -> bool:
    """Whether ``module`` was sharded by ``fully_shard`` (FSDP2)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def broadcast_module_state(module: nn.Module, src: int = 0) -> None:
    """Overwrite every parameter and buffer with rank ``src``'s (what DDP does when it wraps a model),
    so that ranks that initialised differently start from one model."""
    if not is_initialized() or world_size() == 1:
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=src)


def shard_modules(root: nn.Module, units: Sequence[nn.Module], *, device: torch.device,
                  reshard_after_forward: bool = True, param_dtype: torch.dtype | None = None,
                  reduce_dtype: torch.dtype | None = None,
                  forward_methods: Sequence[str] = ()) -> list[nn.Parameter]:
    """Shard ``root`` in place with FSDP2: one unit per module of ``units``, then the root.

    Args:
        root: the model, already on ``device``; its weights are first made rank 0's everywhere.
        units: submodules that become their own FSDP units, innermost first (``fully_shard`` must be
            applied bottom-up: a unit takes the parameters that no unit inside it took).
        reshard_after_forward: free a unit's gathered parameters after its forward (the root keeps
            them, as FSDP2 does by default: backward needs them at once).
        param_dtype, reduce_dtype: the mixed-precision policy (None: the parameters' own dtype).
        forward_methods: methods of the units that the model calls instead of ``forward`` (a tower's
            ``encode_tokens``): each gathers the unit's parameters as ``forward`` does.

    Returns:
        The parameters left whole on every rank (those with no dimension: FSDP2 cannot shard a
        scalar). Their gradients are not reduced by FSDP: call :func:`all_reduce_mean_` on them
        before the optimiser step.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (
        MixedPrecisionPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    broadcast_module_state(root)
    replicated = [p for p in root.parameters() if p.ndim == 0]
    mesh = init_device_mesh(device.type, (world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    options = {"mesh": mesh, "mp_policy": policy, "ignored_params": set(replicated)}
    for unit in units:
        if not any(p.ndim > 0 for p in unit.parameters()):
            continue  # nothing to shard: its scalars stay whole, and FSDP would add hooks for nothing
        fully_shard(unit, reshard_after_forward=reshard_after_forward, **options)
        for name in forward_methods:
            if callable(getattr(unit, name, None)):
                register_fsdp_forward_method(unit, name)
    fully_shard(root, **options)  # the root keeps its parameters from forward to backward
    return replicated


@contextlib.contextmanager
def skip_gradient_sync(module: nn.Module) -> Iterator[None]:
    """Backward passes inside this context keep their gradients on this rank (accumulated), to be
    reduced with those of the next backward outside it: ``no_sync`` for DDP,
    ``set_requires_gradient_sync(False)`` for FSDP2, nothing for an unwrapped module."""
    if is_fsdp(module):
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    elif hasattr(module, "no_sync"):
        with module.no_sync():
            yield
    else:
        yield


def all_reduce_mean_(tensors: Iterable[torch.Tensor | None]) -> None:
    """Average each tensor over the ranks, in place (None entries are skipped); one all-reduce."""
    tensors = [t for t in tensors if t is not None]
    if not tensors or not is_initialized() or world_size() == 1:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a sharded one gathered from every rank (a collective), any other as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local_numel(tensor: torch.Tensor) -> int:
    """Elements this rank holds of ``tensor`` (its shard's for a sharded tensor)."""
    return tensor.to_local().numel() if isinstance(tensor, DTensor) else tensor.numel()


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[nn.Parameter], max_norm: float) -> float:
    """Scale the gradients so that their global L2 norm is at most ``max_norm``; returns the norm
    before clipping.

    Sharded gradients (DTensors) contribute the norm of the whole gradient, reduced over the ranks
    (each rank's shard norms alone would give each rank another clip factor, and the model would
    diverge between ranks); whole gradients (replicated, already averaged) count once. Without
    sharded gradients this is ``torch.nn.utils.clip_grad_norm_``.
    """
    parameters = [p for p in parameters if p.grad is not None]
    sharded = [p.grad for p in parameters if isinstance(p.grad, DTensor)]
    whole = [p.grad for p in parameters if not isinstance(p.grad, DTensor)]
    if not sharded:
        return float(torch.nn.utils.clip_grad_norm_(parameters, max_norm)) if parameters else 0.0
    squares = float(full_tensor(torch.nn.utils.get_total_norm(sharded))) ** 2
    if whole:
        squares += float(torch.nn.utils.get_total_norm(whole)) ** 2
    total = math.sqrt(squares)
    coef = max_norm / (total + 1e-6)  # as torch's clip_grad_norm_
    if coef < 1.0:
        for grads in (sharded, whole):
            if grads:
                torch._foreach_mul_(grads, coef)
    return total


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict, gathered on rank 0 in CPU memory (a collective: every rank calls
    it; the others get an empty dict). For evaluating a sharded model on rank 0 alone."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True,
                                                                 cpu_offload=True))
