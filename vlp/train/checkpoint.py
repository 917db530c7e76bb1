"""Training checkpoints: one folder that holds everything to resume, or to evaluate, a run.

Two formats, told apart by ``checkpoint.json`` (``{"format": ...}``; a folder without it is ``torch``,
as every checkpoint was before sharding):

``torch`` (``scaling.strategy: ddp``; rank 0 writes it all)::

    model.pt       the unwrapped model's state dict (the DualEncoder: what ``vlp eval`` loads)
    objectives.pt  the objectives' own heads (decoders, fusion-side heads), when they have any
    optimizer.pt   AdamW state

``dcp`` (``scaling.strategy: fsdp``; every rank writes its own shards, ``vlp.distributed.
sharded_checkpoint``, and no rank gathers the whole model)::

    sharded/       torch.distributed.checkpoint: .metadata (rank 0) and one __<rank>_0.distcp per rank,
                   holding {"model": the model and heads, "optim": AdamW state} by parameter name

and in both, written by rank 0::

    checkpoint.json  the format, the strategy and world size that wrote it
    state.json       step, epoch, samples seen (in total and in the current epoch), MLflow run id
    config.json      the full experiment config
    tokenizer/       the tokenizer the model was trained with (so a checkpoint is self-contained)

Either format resumes under either strategy and at any world size (``restore_checkpoint``: a sharded
one is resharded on load), and either loads in a plain process for evaluation and export
(``load_trained_pretraining``: a sharded one is consolidated there, without a cluster).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass

import torch

from vlp.config import ConfigError, from_dict, to_dict

FORMAT_FILE = "checkpoint.json"
TORCH_FORMAT, SHARDED_FORMAT = "torch", "dcp"
SHARDED_DIR = "sharded"


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    samples: int = 0  # samples seen in total (global, all workers)
    # samples seen in the current pass over the data stream (``data.epochs_per_pass`` epochs): where
    # the data position resumes
    samples_in_epoch: int = 0
    mlflow_run_id: str = ""
    world_size: int = 0


def _parts(module) -> dict:
    """``{file: (name prefix, module)}``: a PretrainingModel splits into its model and its objectives'
    heads (the prefix turns a part's keys into the whole module's)."""
    if hasattr(module, "objectives") and hasattr(module, "model"):
        return {"model.pt": ("model.", module.model), "objectives.pt": ("objectives.", module.objectives)}
    return {"model.pt": ("", module)}


def checkpoint_format(folder: str) -> str | None:
    """``torch`` or ``dcp`` (see the module doc); None when ``folder`` is not a training checkpoint."""
    marker = os.path.join(folder, FORMAT_FILE)
    if os.path.isfile(marker):
        with open(marker) as f:
            return json.load(f)["format"]
    if os.path.isfile(os.path.join(folder, "model.pt")):
        return TORCH_FORMAT  # written before checkpoints said their format
    return None


def is_checkpoint(folder: str) -> bool:
    return checkpoint_format(folder) is not None


def write_checkpoint_metadata(folder: str, state: TrainState, config, tokenizer_dir: str, *,
                              fmt: str, strategy: str = "ddp", world_size: int = 1) -> None:
    """The files every format has (rank 0 writes them): format marker, state, config, tokenizer."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, FORMAT_FILE), "w") as f:
        json.dump({"format": fmt, "strategy": strategy, "world_size": world_size}, f, indent=2)
    with open(os.path.join(folder, "state.json"), "w") as f:
        json.dump(asdict(state), f, indent=2)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(to_dict(config), f, indent=2, ensure_ascii=False)
    if tokenizer_dir and os.path.isdir(tokenizer_dir):
        shutil.copytree(tokenizer_dir, os.path.join(folder, "tokenizer"), dirs_exist_ok=True)


def save_checkpoint(folder: str, model, optimizer, state: TrainState, config, tokenizer_dir: str) -> str:
    """A ``torch``-format checkpoint of an unsharded model (rank 0 alone writes it)."""
    os.makedirs(folder, exist_ok=True)
    for name, (_, part) in _parts(model).items():
        torch.save(part.state_dict(), os.path.join(folder, name))
    if optimizer is not None:
        torch.save(optimizer.state_dict(), os.path.join(folder, "optimizer.pt"))
    write_checkpoint_metadata(folder, state, config, tokenizer_dir, fmt=TORCH_FORMAT,
                              world_size=state.world_size or 1)
    return folder


def save_sharded_checkpoint(folder: str, module, optimizer, state: TrainState, config,
                            tokenizer_dir: str, *, rank: int, strategy: str, group=None,
                            asynchronous: bool = False):
    """A ``dcp``-format checkpoint: every rank calls this (a collective) with a folder of its own or a
    shared one; each writes its shards under ``sharded/``, rank 0 also the other files.

    Args:
        module: the live model as the strategy wrapped it (``ParallelModel.module``).
        group: DCP's process group (``vlp.distributed.sharded_checkpoint.new_checkpoint_group``).
        asynchronous: return once the state is copied to CPU memory, writing in the background.

    Returns:
        With ``asynchronous``, a future that completes when this rank's shards are written; else None.
    """
    from vlp.distributed.sharded_checkpoint import save_sharded

    if rank == 0:
        write_checkpoint_metadata(folder, state, config, tokenizer_dir, fmt=SHARDED_FORMAT,
                                  strategy=strategy, world_size=state.world_size or 1)
    os.makedirs(folder, exist_ok=True)
    return save_sharded(os.path.join(folder, SHARDED_DIR), module, optimizer, group=group,
                        asynchronous=asynchronous)


def load_state(folder: str) -> TrainState:
    with open(os.path.join(folder, "state.json")) as f:
        return TrainState(**json.load(f))


def load_checkpoint(folder: str, model, optimizer) -> TrainState:
    """Load a checkpoint into a plain (unwrapped, unsharded) model, in this process alone: a ``torch``
    one file by file, a ``dcp`` one consolidated from every rank's shards (the model only: an
    optimiser resumes through ``restore_checkpoint``)."""
    fmt = checkpoint_format(folder)
    if fmt == SHARDED_FORMAT:
        from vlp.distributed.sharded_checkpoint import load_model_weights

        if optimizer is not None:
            raise ValueError("a sharded checkpoint's optimiser state loads with restore_checkpoint")
        load_model_weights(os.path.join(folder, SHARDED_DIR), model)
        return load_state(folder)
    for name, (_, part) in _parts(model).items():
        path = os.path.join(folder, name)
        if os.path.exists(path) or name == "model.pt":
            part.load_state_dict(torch.load(path, map_location="cpu"))
    opt_path = os.path.join(folder, "optimizer.pt")
    if optimizer is not None and os.path.exists(opt_path):
        optimizer.load_state_dict(torch.load(opt_path, map_location="cpu"))
    return load_state(folder)


def restore_checkpoint(folder: str, parallel, optimizer, *, group=None) -> TrainState:
    """Resume the live model (a ``vlp.train.parallel.ParallelModel``) and its optimiser from a
    checkpoint of either format, written under either strategy at any world size. A collective under
    ``fsdp`` and for ``dcp`` checkpoints: every rank calls it."""
    fmt = checkpoint_format(folder)
    if fmt is None:
        raise ConfigError(f"{folder} is not a training checkpoint")
    if fmt == SHARDED_FORMAT:
        from vlp.distributed.sharded_checkpoint import load_sharded

        load_sharded(os.path.join(folder, SHARDED_DIR), parallel.module, optimizer, group=group)
        return load_state(folder)
    if not parallel.sharded:
        return load_checkpoint(folder, parallel.model, optimizer)
    # a whole checkpoint (ddp) into a sharded model: every rank reads it all and keeps its shards
    from vlp.distributed.sharded_checkpoint import set_full_state

    model_state = {}
    for name, (prefix, _) in _parts(parallel.model).items():
        path = os.path.join(folder, name)
        if os.path.exists(path) or name == "model.pt":
            model_state.update({prefix + k: v for k, v in
                                torch.load(path, map_location="cpu").items()})
    opt_path = os.path.join(folder, "optimizer.pt")
    optim_state = None
    if optimizer is not None and os.path.exists(opt_path):
        optim_state = _by_parameter_name(torch.load(opt_path, map_location="cpu"), optimizer,
                                         parallel.model)
    set_full_state(parallel.module, optimizer, model_state, optim_state)
    return load_state(folder)


def _by_parameter_name(saved: dict, optimizer, model) -> dict:
    """An ``optimizer.state_dict()`` (parameters numbered in group order) keyed by parameter names
    instead, as ``set_optimizer_state_dict`` takes it; the live ``optimizer`` has the same groups
    (``build_optimizer`` builds them the same way under every strategy)."""
    names = {id(p): name for name, p in model.named_parameters()}
    state, groups = {}, []
    if len(saved["param_groups"]) != len(optimizer.param_groups):
        raise ConfigError("the checkpoint's optimiser has other parameter groups than this run's")
    for saved_group, group in zip(saved["param_groups"], optimizer.param_groups):
        if len(saved_group["params"]) != len(group["params"]):
            raise ConfigError("the checkpoint's optimiser holds other parameters than this run's")
        fqns = [names[id(p)] for p in group["params"]]
        for index, fqn in zip(saved_group["params"], fqns):
            if index in saved["state"]:
                state[fqn] = saved["state"][index]
        groups.append({**saved_group, "params": fqns})
    return {"state": state, "param_groups": groups}


def load_trained_model(folder: str, device: str | torch.device = "cpu"):
    """A checkpoint folder -> (model in eval mode, tokenizer, TrainConfig), for ``vlp eval``."""
    pretraining, tokenizer, config = load_trained_pretraining(folder, device)
    return pretraining.model, tokenizer, config


def load_trained_pretraining(folder: str, device: str | torch.device = "cpu"):
    """A checkpoint folder -> (PretrainingModel in eval mode, with the objectives' heads; tokenizer;
    TrainConfig): what the evaluations of the heads (captioning, masked-word QA) need."""
    from vlp.data.tokenizer import load_tokenizer
    from vlp.objectives.pretraining import build_pretraining
    from vlp.train.config import TrainConfig

    if not is_checkpoint(folder):
        raise ConfigError(f"{folder} is not a training checkpoint (no model.pt or {FORMAT_FILE} in it)")
    with open(os.path.join(folder, "config.json")) as f:
        config = from_dict(TrainConfig, json.load(f))
    tokenizer = load_tokenizer(os.path.join(folder, "tokenizer"))
    pretraining = build_pretraining(config, tokenizer)
    load_checkpoint(folder, pretraining, None)
    return pretraining.to(device).eval(), tokenizer, config
