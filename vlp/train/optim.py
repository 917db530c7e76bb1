"""AdamW with linear warmup and cosine decay, driven by training progress in samples.

The schedule reads progress as samples seen over samples planned, not as a step count, so it stays
right when an elastic run changes its world size (and so its global batch) halfway through.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vlp.train.config import OptimConfig


def scaled_lr(cfg: OptimConfig, world_size: int) -> float:
    """The peak learning rate for ``world_size`` workers (the config's lr is for base_world_size)."""
    ratio = world_size / cfg.base_world_size
    factor = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[cfg.lr_scaling]
    return cfg.lr * factor


def lr_at(peak: float, cfg: OptimConfig, step: int, progress: float) -> float:
    """Warmup over the first ``warmup_steps`` steps, then cosine from ``peak`` to
    ``peak * min_lr_ratio`` as ``progress`` (fraction of planned samples) goes from 0 to 1."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    progress = min(max(progress, 0.0), 1.0)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW (fused on CUDA); no weight decay on biases, norms, embeddings' scalars and the logit
    scale/bias."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue  # a locked tower
        leaf = name.rsplit(".", 1)[-1]
        (no_decay if param.ndim < 2 or leaf.startswith("logit_") else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # On GPUs the fused kernel updates every tensor in one launch (the default, foreach, takes several)
    on_cuda = bool(decay + no_decay) and all(p.is_cuda for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             fused=True if on_cuda else None)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def optimizer_step(optimizer: torch.optim.Optimizer, parallel, *, lr: float, grad_clip: float) -> float:
    """The update that ends a training step, the same under every strategy: average what the strategy
    left unreduced, clip by the global gradient norm (when ``grad_clip`` > 0), set the learning rate,
    step, zero the gradients.

    Args:
        parallel: the ``vlp.train.parallel.ParallelModel`` the gradients came from.

    Returns:
        The global gradient norm before clipping (0 when clipping is off).
    """
    parallel.finish_gradients()
    grad_norm = parallel.clip_grad_norm_(grad_clip) if grad_clip > 0 else 0.0
    set_lr(optimizer, lr)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm
