"""Small reductions the trainer needs beside the losses' gathers (part of ``vlp.distributed``, the
one package that calls ``torch.distributed``)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over all ranks (a copy; the input is left alone); identity on one process."""
    out = tensor.clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out
