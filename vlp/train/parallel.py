"""How the model is spread over the workers (``scaling.strategy``), decided in one place.

``wrap_model`` turns the pretraining module (model + objectives' heads) into a ``ParallelModel``; the
one training loop (``vlp.train.loop``) and the step functions (``vlp.train.steps``) then run the same
code under either strategy:

- ``ddp``: every rank holds the whole model; ``DistributedDataParallel`` all-reduces the gradients in
  backward.
- ``fsdp``: FSDP2 (``fully_shard``) shards parameters, gradients and AdamW state over the ranks. One
  unit per transformer block (each element of a ``ModuleList`` of layers, wherever it sits: ViT and
  BERT layers, our ``Stack`` blocks, the video tower's blocks, the heads' decoders), then one per tower
  (visual, text, fusion) and per objective head with weights, then the root (projections, the rest).
  Each unit's parameters are gathered just before it runs and freed after (``reshard_after_forward``),
  gradients are reduce-scattered, so a rank holds about 1/W of the weights and optimiser state. The
  towers' ``encode_tokens`` gather like ``forward`` (the token-level objectives call it).
  Activation checkpointing (``model.*.gradient_checkpointing``) is applied when the towers are built,
  so before ``fully_shard``, as FSDP2 requires. On GPU with bf16 precision the gathered parameters are
  bf16 and gradients are reduced in fp32 (``MixedPrecisionPolicy``); on CPU everything stays fp32.

Scalars (the temperature, SigLIP's bias) cannot be sharded by FSDP2; they stay whole on every rank and
``finish_gradients`` averages their gradients before each optimiser step. ``clip_grad_norm_`` clips by
the norm of the whole job's gradient under both strategies.

A new strategy (tensor or pipeline parallelism) is a new branch of ``wrap_model`` and of the methods
of ``ParallelModel``, nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from vlp.distributed import world_size
from vlp.distributed.sharding import all_reduce_mean_, clip_grad_norm_, full_state_dict

# Methods of a tower that the model calls instead of ``forward`` (``DualEncoder`` and the objectives
# ask for tokens): under FSDP they must gather the tower's weights as ``forward`` does.
TOWER_FORWARD_METHODS = ("encode_tokens",)


@dataclass
class ParallelModel:
    """The wrapped model and what a training step needs to know about the strategy.

    Attributes:
        module: what runs the forward: ``DistributedDataParallel(model)``, or the model itself
            (sharded in place by FSDP2, or alone on a single worker).
        model: the unwrapped model (the same object as ``module`` under ``fsdp``).
        strategy: ``ddp`` or ``fsdp``.
        replicated: parameters held whole on every rank whose gradients no wrapper reduces (the
            scalars under ``fsdp``).
    """

    module: nn.Module
    model: nn.Module
    strategy: str
    replicated: list[nn.Parameter] = field(default_factory=list)

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp"

    def finish_gradients(self) -> None:
        """Average the gradients that the wrapper left unreduced (call after the last backward of a
        step, before clipping and the optimiser step)."""
        all_reduce_mean_(p.grad for p in self.replicated)

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Clip by the global gradient norm (over every rank's shards); returns it before clipping."""
        return clip_grad_norm_(self.model.parameters(), max_norm)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights: under ``fsdp`` gathered on rank 0 (every rank must call it; the
        others get ``{}``), else this rank's own."""
        if self.sharded:
            return full_state_dict(self.model)
        return self.model.state_dict()


def sharding_units(model: nn.Module) -> list[nn.Module]:
    """The FSDP units of a pretraining module, innermost first: every layer of a stack (an element
    of a ``ModuleList`` whose elements are all of one class), then the towers, then the objectives'
    heads (those with weights). Works on a bare ``DualEncoder`` too (no heads)."""
    layers = []
    for stack in model.modules():
        if isinstance(stack, nn.ModuleList) and len(stack) and len({type(m) for m in stack}) == 1:
            layers += [m for m in stack if any(True for _ in m.parameters())]
    depth = {m: name.count(".") for name, m in model.named_modules()}
    layers.sort(key=lambda m: -depth[m])  # a stack inside a layer: its layers first
    dual = getattr(model, "model", model)
    towers = [m for m in (getattr(dual, "image_encoder", None), getattr(dual, "text_encoder", None),
                          getattr(dual, "fusion", None)) if m is not None]
    objectives = getattr(model, "objectives", None)
    heads = [o for o in objectives.values() if any(True for _ in o.parameters())] if objectives else []
    seen, units = set(), []
    for unit in layers + towers + heads:
        if unit not in seen:
            seen.add(unit)
            units.append(unit)
    return units


def wrap_model(model: nn.Module, strategy: str = "ddp", *, device: torch.device | str = "cpu",
               reshard_after_forward: bool = True, bf16: bool = False) -> ParallelModel:
    """Move ``model`` to ``device`` and wrap it for ``strategy`` (``ScalingConfig.strategy``).

    Every rank calls this with a model built the same way; under either strategy rank 0's initial
    weights become every rank's. Build the optimiser afterwards, on ``model``'s parameters (FSDP
    replaces them with their shards).

    Args:
        reshard_after_forward: ``scaling.fsdp.reshard_after_forward``.
        bf16: the run computes in bf16 (``precision``); on a GPU, FSDP then gathers parameters in bf16
            and reduces gradients in fp32. Ignored on CPU (fp32 throughout) and by ``ddp`` (autocast
            does the casting there).
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # FSDP's mesh and NCCL use the current device
    model = model.to(device)
    if strategy == "ddp":
        if world_size() == 1:
            return ParallelModel(module=model, model=model, strategy=strategy)
        from torch.nn.parallel import DistributedDataParallel

        kwargs = {"device_ids": [device], "output_device": device} if device.type == "cuda" else {}
        return ParallelModel(module=DistributedDataParallel(model, **kwargs), model=model,
                             strategy=strategy)
    if strategy == "fsdp":
        from vlp.distributed.sharding import shard_modules

        low = bf16 and device.type == "cuda"
        replicated = shard_modules(model, sharding_units(model), device=device,
                                   reshard_after_forward=reshard_after_forward,
                                   param_dtype=torch.bfloat16 if low else None,
                                   reduce_dtype=torch.float32 if low else None,
                                   forward_methods=TOWER_FORWARD_METHODS)
        return ParallelModel(module=model, model=model, strategy=strategy, replicated=replicated)
    raise ValueError(f"unknown strategy {strategy!r}: ddp | fsdp")
