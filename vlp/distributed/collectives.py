"""Cross-rank collectives: process groups, differentiable gathers and exchanges, byte counting.

Every tensor the losses move between ranks goes through here (the rest of ``vlp.distributed`` holds
the trainer's small metric reductions), so that there is one place to read what a training step
sends, one place that counts it, and one place to fix backend quirks. What lives here:

- process-group helpers: :func:`rank_groups` (the contiguous layout), :func:`new_rank_group` (creates
  the subgroups, returns this rank's), :func:`world_size`, :func:`group_size`, :func:`group_rank` and
  :func:`barrier`;
- differentiable collectives, each its own ``torch.autograd.Function``: :func:`gather_with_grad`
  (all-gather forward, reduce-scatter with SUM backward) and :func:`ring_exchange` (send to the next
  rank of the group, receive from the previous; the gradient travels the other way);
- byte accounting: :class:`CommCounter` (also per process group, so a trainer that knows each rank's
  node tells the bytes that crossed nodes from those that stayed on one); :func:`all_gather_object`
  and :func:`node_groups` describe the layout of ranks on nodes.

Conventions:

- ``group=None`` means the default (WORLD) group, as in ``torch.distributed``. When the process group
  is not initialised, or the group has one member, every collective is the identity and sends 0 bytes,
  so the same code runs in a single process.
- Ranks inside a group are group-local (``dist.get_rank(group)``); peers of point-to-point ops are
  translated to global ranks with ``dist.get_global_rank``.

Byte accounting counts the logical payload *this rank sends*, independent of how the backend
implements the collective (ring, tree, all-to-all, or an all-reduce fallback):

- all-gather of a ``(B, ...)`` tensor in a group of k: ``(k - 1) * tensor bytes`` (every other member
  needs my slice);
- reduce-scatter of the gathered ``(k * B, ...)`` gradient: ``(k - 1) * slice bytes`` (every other
  member needs the part of my gradient that belongs to it);
- one ring exchange: ``tensor bytes``.

A :class:`CommCounter` is passed in explicitly (``counter=``); a differentiable collective keeps it and
adds its backward traffic when autograd runs the backward, so a counter read after ``backward()``
holds the whole step. New collectives go here, each with its counting rule in its docstring.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

__all__ = [
    "CommCounter",
    "all_gather_object",
    "all_reduce_sum",
    "barrier",
    "gather_with_grad",
    "group_rank",
    "group_size",
    "is_initialized",
    "new_rank_group",
    "node_groups",
    "rank_groups",
    "ring_exchange",
    "world_size",
]


@dataclass
class CommCounter:
    """Bytes this rank sent, split by the autograd pass that sent them.

    Attributes:
        forward_bytes: payload sent by collectives called in the forward pass.
        backward_bytes: payload sent by the backward of differentiable collectives.
        calls: collectives that sent something (forward and backward).
        by_group: the same bytes (forward plus backward) by the process group that carried them, keyed
            by the group's global ranks in order.
    """

    forward_bytes: int = 0
    backward_bytes: int = 0
    calls: int = 0
    by_group: dict[tuple[int, ...], int] = field(default_factory=dict)

    @property
    def bytes_sent(self) -> int:
        """Forward plus backward bytes so far."""
        return self.forward_bytes + self.backward_bytes

    def add(self, nbytes: int, *, backward: bool, ranks: tuple[int, ...] = ()) -> None:
        """Record one collective that sent ``nbytes`` in the group of global ``ranks``."""
        if nbytes <= 0:
            return
        if backward:
            self.backward_bytes += nbytes
        else:
            self.forward_bytes += nbytes
        self.calls += 1
        self.by_group[ranks] = self.by_group.get(ranks, 0) + nbytes

    def reset(self) -> None:
        """Start counting from zero (e.g. at the start of a step)."""
        self.forward_bytes = self.backward_bytes = self.calls = 0
        self.by_group = {}


def _count(counter: CommCounter | None, nbytes: int, *, backward: bool, group: ProcessGroup) -> None:
    if counter is not None:
        counter.add(nbytes, backward=backward, ranks=tuple(dist.get_process_group_ranks(group)))


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


# ---------------------------------------------------------------------------------------------
# Process groups


def is_initialized() -> bool:
    """Whether a default process group exists (False also when torch has no distributed support)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Ranks in the job; 1 when the process group is not initialised."""
    return dist.get_world_size() if is_initialized() else 1


def group_size(group: ProcessGroup | None = None) -> int:
    """Members of ``group`` (None: the default group); 1 when not initialised."""
    return dist.get_world_size(group) if is_initialized() else 1


def group_rank(group: ProcessGroup | None = None) -> int:
    """This rank's index inside ``group`` (group-local, not global); 0 when not initialised."""
    return dist.get_rank(group) if is_initialized() else 0


def rank_groups(world_size: int, group_size: int) -> list[list[int]]:
    """The contiguous layout of ranks into groups: ``[g * k, (g + 1) * k)`` for each group g.

    With ranks numbered node by node (as torchrun and Ray Train do), ``group_size`` equal to the ranks
    per node puts each group on one node.

    Raises:
        ValueError: ``group_size`` < 1, or ``world_size`` is not a multiple of it.
    """
    if group_size < 1:
        raise ValueError(f"group size must be >= 1, got {group_size}")
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    if world_size % group_size:
        raise ValueError(
            f"world size {world_size} is not divisible by group size {group_size}: "
            f"contiguous groups of {group_size} ranks cannot cover {world_size} ranks"
        )
    return [list(range(g * group_size, (g + 1) * group_size)) for g in range(world_size // group_size)]


def node_groups(node_of_rank: list) -> list[list[int]]:
    """The ranks on each node, nodes in the order of their first rank: ``node_of_rank[r]`` names the
    node of global rank r (any hashable, e.g. Ray Train's node rank)."""
    groups: dict = {}
    for rank, node in enumerate(node_of_rank):
        groups.setdefault(node, []).append(rank)
    return list(groups.values())


def all_gather_object(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in a single process. A collective
    of the default group, for small facts gathered once (which node a rank is on), not tensors."""
    if not is_initialized():
        return [obj]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def new_rank_group(group_size: int) -> ProcessGroup | None:
    """Create the contiguous subgroups of ``group_size`` ranks and return the one this rank is in.

    This is a collective over the whole job: ``dist.new_group`` must be called by every rank for every
    group, in the same order, so every rank must call this with the same ``group_size``. Call it once
    per run and keep the result (each call creates new communicators).

    Returns:
        This rank's group; None (the default group, by ``torch.distributed``'s convention) when
        ``group_size`` equals the world size or the process group is not initialised (then
        ``group_size`` must be 1).

    Raises:
        ValueError: see :func:`rank_groups`.
    """
    n = world_size()
    layout = rank_groups(n, group_size)  # validates before any rank creates a group
    if not is_initialized() or group_size == n:
        return None
    mine = None
    rank = dist.get_rank()
    for ranks in layout:
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = group
    return mine


def barrier(group: ProcessGroup | None = None) -> None:
    """Wait until every member of ``group`` gets here (sends no payload); no-op in a single process."""
    if is_initialized() and group_size(group) > 1:
        dist.barrier(group=group)


def _resolve(group: ProcessGroup | None) -> ProcessGroup:
    return dist.group.WORLD if group is None else group


# ---------------------------------------------------------------------------------------------
# Reduce-scatter, implemented per backend


# How each backend runs a reduce-scatter with SUM. Backends not listed try "reduce_scatter" and switch
# to "all_reduce" if it raises "unsupported". All three move different amounts on the wire but give
# the same result; the byte counter records the logical payload either way.
# - reduce_scatter: the native collective (NCCL).
# - all_to_all: every rank sends each member that member's slice, then sums what it received. On
#   Gloo in torch 2.13 reduce_scatter costs as much as a full all_reduce, about twice an all-to-all
#   of the same tensor at 4 and 8 ranks (measured on the benchmark machine).
# - all_reduce: sum everything everywhere, keep my slice (works on every backend).
_REDUCE_SCATTER_IMPL: dict[str, str] = {"nccl": "reduce_scatter", "gloo": "all_to_all"}
_REDUCE_SCATTER_IMPL_LOCK = threading.Lock()


def _reduce_scatter_sum(full: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Sum ``full`` over the group and return this rank's slice along dim 0 (group-local rank)."""
    k, r = dist.get_world_size(group), dist.get_rank(group)
    full = full.contiguous()
    chunk = full.shape[0] // k
    backend = str(dist.get_backend(group))
    impl = _REDUCE_SCATTER_IMPL.get(backend, "reduce_scatter")
    if impl == "all_to_all":
        received = torch.empty_like(full)
        dist.all_to_all_single(received, full, group=group)
        return received.view(k, chunk, *full.shape[1:]).sum(dim=0)
    if impl == "reduce_scatter":
        out = full.new_empty((chunk, *full.shape[1:]))
        try:
            dist.reduce_scatter_single(out, full, op=dist.ReduceOp.SUM, group=group)
            return out
        except (RuntimeError, NotImplementedError) as e:
            # A backend without reduce_scatter raises locally, before anything is sent, identically on
            # every rank, so switching to all_reduce here keeps the ranks in step.
            if "support" not in str(e).lower():
                raise
            with _REDUCE_SCATTER_IMPL_LOCK:
                _REDUCE_SCATTER_IMPL[backend] = "all_reduce"
    summed = full.clone()
    dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=group)
    return summed[r * chunk:(r + 1) * chunk]


# ---------------------------------------------------------------------------------------------
# Differentiable all-gather


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0; backward reduce-scatters (SUM) the gradient of the gathered tensor.

    Written here rather than taken from ``torch.distributed.nn.functional.all_gather``: in torch 2.13
    on Gloo the backward of that one fails for a subgroup without global rank 0 ("Global rank 0 is not
    part of group"), which is exactly the grouped loss's case.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: ProcessGroup, counter: CommCounter | None):
        ctx.group, ctx.counter = group, counter
        k = dist.get_world_size(group)
        tensor = tensor.contiguous()
        out = tensor.new_empty((k * tensor.shape[0], *tensor.shape[1:]))
        dist.all_gather_single(out, tensor, group=group)
        _count(counter, (k - 1) * _nbytes(tensor), backward=False, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        k = dist.get_world_size(ctx.group)
        grad = _reduce_scatter_sum(grad_output, ctx.group)
        _count(ctx.counter, (k - 1) * _nbytes(grad), backward=True, group=ctx.group)
        return grad, None, None


def gather_with_grad(tensor: torch.Tensor, group: ProcessGroup | None = None, *,
                     counter: CommCounter | None = None) -> torch.Tensor:
    """Concatenate every group member's ``tensor`` along dim 0, in group-rank order, with gradients.

    The tensor must have the same shape on every member. Backward: each member receives, for its own
    slice, the SUM over the group of the gradients flowing into that slice, so a member's gradient is
    the gradient of the sum of all members' losses.

    Args:
        tensor: this rank's ``(B, ...)`` tensor.
        group: the process group; None for the default group.
        counter: where to add the bytes sent: ``(k - 1) * B * ... * element size`` in forward and the
            same again in backward (when the input needs a gradient).

    Returns:
        A ``(k * B, ...)`` tensor; ``tensor`` itself when the group has one member or the process group
        is not initialised.
    """
    if not is_initialized() or group_size(group) == 1:
        return tensor
    return _GatherWithGrad.apply(tensor, _resolve(group), counter)


# ---------------------------------------------------------------------------------------------
# Differentiable ring (neighbour) exchange


def _exchange(tensor: torch.Tensor, group: ProcessGroup, send_to: int, recv_from: int) -> torch.Tensor:
    """Send ``tensor`` to group rank ``send_to`` while receiving one like it from ``recv_from``."""
    tensor = tensor.contiguous()
    received = torch.empty_like(tensor)
    ops = [
        dist.P2POp(dist.isend, tensor, dist.get_global_rank(group, send_to), group=group),
        dist.P2POp(dist.irecv, received, dist.get_global_rank(group, recv_from), group=group),
    ]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    return received


class _RingExchange(torch.autograd.Function):
    """Forward: send to the next group rank, receive from the previous. Backward: the reverse."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: ProcessGroup, counter: CommCounter | None):
        k, r = dist.get_world_size(group), dist.get_rank(group)
        ctx.group, ctx.counter = group, counter
        ctx.next, ctx.prev = (r + 1) % k, (r - 1) % k
        out = _exchange(tensor, group, send_to=ctx.next, recv_from=ctx.prev)
        _count(counter, _nbytes(tensor), backward=False, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        # My output came from the previous rank, so its gradient belongs there; the gradient of what I
        # sent comes back from the next rank.
        grad = _exchange(grad_output, ctx.group, send_to=ctx.prev, recv_from=ctx.next)
        _count(ctx.counter, _nbytes(grad), backward=True, group=ctx.group)
        return grad, None, None


def ring_exchange(tensor: torch.Tensor, group: ProcessGroup | None = None, *,
                  counter: CommCounter | None = None) -> torch.Tensor:
    """Pass ``tensor`` one step around the group's ring, with gradients.

    Group rank r sends to r + 1 and receives from r - 1 (mod k), with one batched isend/irecv. Calling
    it k - 1 times, each time on the previous result, shows every rank every member's tensor.

    Args:
        tensor: this rank's tensor; same shape and dtype on every member.
        group: the process group; None for the default group.
        counter: where to add the bytes sent: the tensor's bytes in forward, and the same in backward.

    Returns:
        The previous rank's tensor; ``tensor`` itself when the group has one member or the process
        group is not initialised.
    """
    if not is_initialized() or group_size(group) == 1:
        return tensor
    return _RingExchange.apply(tensor, _resolve(group), counter)


def all_reduce_sum(tensor: torch.Tensor, group: ProcessGroup | None = None, *,
                   counter: CommCounter | None = None) -> torch.Tensor:
    """The sum of ``tensor`` over the group's ranks, not differentiable (for the trainer's loss
    bookkeeping: the mean loss to log, whether any rank went non-finite).

    Returns a new tensor (the input is left alone); a copy of it on a single process. Counted as
    (k - 1) x the tensor's bytes, the logical payload a rank must share.
    """
    out = tensor.clone()
    if not is_initialized() or group_size(group) == 1:
        return out
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=_resolve(group))
    _count(counter, (group_size(group) - 1) * _nbytes(out), backward=False, group=_resolve(group))
    return out
