"""Training checkpoints: one folder that holds everything to resume, or to evaluate, a run.

    model.pt       the unwrapped model's state dict (the DualEncoder: what ``vlp eval`` loads)
    objectives.pt  the objectives' own heads (decoders, fusion-side heads), when they have any
    optimizer.pt   AdamW state
    state.json     step, epoch, samples seen (in total and in the current epoch), MLflow run id
    config.json    the full experiment config
    tokenizer/     the tokenizer the model was trained with (so a checkpoint is self-contained)
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass

import torch

from vlp.config import from_dict, to_dict


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
    """``{file: module}``: a PretrainingModel splits into its model and its objectives' heads."""
    if hasattr(module, "objectives") and hasattr(module, "model"):
        return {"model.pt": module.model, "objectives.pt": module.objectives}
    return {"model.pt": module}


def save_checkpoint(folder: str, model, optimizer, state: TrainState, config, tokenizer_dir: str) -> str:
    os.makedirs(folder, exist_ok=True)
    for name, part in _parts(model).items():
        torch.save(part.state_dict(), os.path.join(folder, name))
    if optimizer is not None:
        torch.save(optimizer.state_dict(), os.path.join(folder, "optimizer.pt"))
    with open(os.path.join(folder, "state.json"), "w") as f:
        json.dump(asdict(state), f, indent=2)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(to_dict(config), f, indent=2, ensure_ascii=False)
    if tokenizer_dir and os.path.isdir(tokenizer_dir):
        shutil.copytree(tokenizer_dir, os.path.join(folder, "tokenizer"), dirs_exist_ok=True)
    return folder


def load_state(folder: str) -> TrainState:
    with open(os.path.join(folder, "state.json")) as f:
        return TrainState(**json.load(f))


def load_checkpoint(folder: str, model, optimizer) -> TrainState:
    for name, part in _parts(model).items():
        path = os.path.join(folder, name)
        if os.path.exists(path) or name == "model.pt":
            part.load_state_dict(torch.load(path, map_location="cpu"))
    opt_path = os.path.join(folder, "optimizer.pt")
    if optimizer is not None and os.path.exists(opt_path):
        optimizer.load_state_dict(torch.load(opt_path, map_location="cpu"))
    return load_state(folder)


def load_trained_model(folder: str, device: str | torch.device = "cpu"):
    """A checkpoint folder -> (model in eval mode, tokenizer, TrainConfig), for ``vlp eval``."""
    pretraining, tokenizer, config = load_trained_pretraining(folder, device)
    return pretraining.model, tokenizer, config


def load_trained_pretraining(folder: str, device: str | torch.device = "cpu"):
    """A checkpoint folder -> (PretrainingModel in eval mode, with the objectives' heads; tokenizer;
    TrainConfig): what the evaluations of the heads (captioning, masked-word QA) need."""
    from vlp.config import ConfigError
    from vlp.data.tokenizer import load_tokenizer
    from vlp.objectives.pretraining import build_pretraining
    from vlp.train.config import TrainConfig

    if not os.path.isfile(os.path.join(folder, "model.pt")):
        raise ConfigError(f"{folder} is not a training checkpoint (no model.pt in it)")
    with open(os.path.join(folder, "config.json")) as f:
        config = from_dict(TrainConfig, json.load(f))
    tokenizer = load_tokenizer(os.path.join(folder, "tokenizer"))
    pretraining = build_pretraining(config, tokenizer)
    load_checkpoint(folder, pretraining, None)
    return pretraining.to(device).eval(), tokenizer, config
