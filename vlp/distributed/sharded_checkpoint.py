"""Sharded training state on disk: ``torch.distributed.checkpoint`` (DCP) for model and optimiser.

Each rank writes only what it holds (its shards of a sharded model; tensors every rank holds alike are
written once) into one folder, and a job with any world size reads it back, each rank reading the
pieces its own shards need (resharding on load). No rank ever gathers the whole model. What lives
here (the checkpoint folder's layout and its other files are ``vlp.train.checkpoint``'s):

- :func:`new_checkpoint_group`: a Gloo group of every rank for DCP's own coordination, so that a save
  that finishes in a background thread never interleaves its collectives with the training step's
  (which use the default group, NCCL on GPUs);
- :func:`save_sharded`: ``{"model": ..., "optim": ...}`` from ``get_state_dict``, saved synchronously
  or with ``async_save`` (the step loop only waits for the copy to CPU memory);
- :func:`load_sharded`: the same keys back into a live (DDP, FSDP or plain) model and optimiser with
  ``set_state_dict``, whatever world size wrote them;
- :func:`load_model_weights`: the model's weights into a plain module in a single process, with no
  process group (``vlp eval``, ``vlp export``, ``vlp score``): consolidation without a cluster.

State dict keys are the unwrapped model's names (``get_state_dict`` drops DDP's ``module.``), so a
checkpoint written under one strategy loads under the other.
"""

from __future__ import annotations

from concurrent.futures import Future

import torch
import torch.distributed as dist
from torch import nn

from vlp.distributed.collectives import is_initialized

__all__ = ["load_model_weights", "load_sharded", "new_checkpoint_group", "save_sharded",
           "set_full_state"]

MODEL_KEY, OPTIM_KEY = "model", "optim"


def new_checkpoint_group():
    """A Gloo group of all ranks for checkpoint coordination (a collective: every rank calls it, once
    per run); None without a process group."""
    if not is_initialized():
        return None
    return dist.new_group(backend="gloo")


def _state(module: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
    )

    if optimizer is None:
        return {MODEL_KEY: get_model_state_dict(module)}
    model_state, optim_state = get_state_dict(module, optimizer)
    return {MODEL_KEY: model_state, OPTIM_KEY: optim_state}


def save_sharded(path: str, module: nn.Module, optimizer: torch.optim.Optimizer | None, *,
                 group=None, asynchronous: bool = False) -> Future | None:
    """Write this rank's part of the model (and optimiser) state into the folder ``path``.

    A collective: every rank calls it with the same ``path`` (on shared storage) or with a folder of
    its own (Ray Train merges the ranks' folders into one checkpoint). Rank 0 also writes the
    ``.metadata`` index.

    Args:
        group: the process group DCP coordinates over (:func:`new_checkpoint_group`); None: default.
        asynchronous: copy the state to CPU memory now and write it in a background thread.

    Returns:
        With ``asynchronous``, a future that completes when this rank's files are written (its
        ``result()`` raises the writer's error); else None, after the files are written.
    """
    import torch.distributed.checkpoint as dcp

    state = _state(module, optimizer)
    if asynchronous:
        return dcp.async_save(state, checkpoint_id=path, process_group=group)
    dcp.save(state, checkpoint_id=path, process_group=group)
    return None


def load_sharded(path: str, module: nn.Module, optimizer: torch.optim.Optimizer | None, *,
                 group=None) -> None:
    """Load a folder written by :func:`save_sharded` (at any world size) into the live ``module`` and
    ``optimizer`` (a collective: every rank calls it). Each rank reads the pieces its shards cover."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_state_dict,
    )

    state = _state(module, optimizer)
    dcp.load(state, checkpoint_id=path, process_group=group)
    if optimizer is None:
        set_model_state_dict(module, state[MODEL_KEY])
    else:
        set_state_dict(module, optimizer, model_state_dict=state[MODEL_KEY],
                       optim_state_dict=state[OPTIM_KEY])


def set_full_state(module: nn.Module, optimizer: torch.optim.Optimizer | None,
                   model_state: dict, optim_state: dict | None) -> None:
    """Load whole (unsharded) state dicts, keyed by parameter name, into a live DDP, FSDP or plain
    model and optimiser: every rank passes the whole state and keeps its own shards of it (how a
    checkpoint written whole, by ``strategy: ddp``, resumes under ``fsdp``)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(module, model_state, options=options)
    if optimizer is not None and optim_state is not None:
        set_optimizer_state_dict(module, optimizer, optim_state, options=options)


def load_model_weights(path: str, module: nn.Module) -> None:
    """Load the model part of a :func:`save_sharded` folder into a plain ``module`` in this process
    alone, reading every rank's shards (no process group needed, none used if one exists)."""
    import warnings

    import torch.distributed.checkpoint as dcp

    state = module.state_dict()
    with warnings.catch_warnings():  # it warns that it loads in one process, which is the point
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({MODEL_KEY: state}, checkpoint_id=path, no_dist=True)
    module.load_state_dict(state)
