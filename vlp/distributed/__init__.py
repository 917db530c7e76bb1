"""Cross-rank communication: the one package that calls ``torch.distributed``.

:mod:`vlp.distributed.collectives` holds process groups, the differentiable collectives the losses
use, the trainer's small non-differentiable reductions, and byte counting (all re-exported here).
"""

from vlp.distributed.collectives import (
    CommCounter,
    all_reduce_sum,
    barrier,
    gather_with_grad,
    group_rank,
    group_size,
    is_initialized,
    new_rank_group,
    rank_groups,
    ring_exchange,
    world_size,
)

__all__ = [
    "CommCounter",
    "all_reduce_sum",
    "barrier",
    "gather_with_grad",
    "group_rank",
    "group_size",
    "is_initialized",
    "new_rank_group",
    "rank_groups",
    "ring_exchange",
    "world_size",
]
