"""The GPU code paths, checked against plain references on the GPU itself (``pytest -m gpu``; the
default run deselects them, and each skips with its reason where CUDA is missing). ``make gpu-check``
runs them first on a GPU machine.

- bf16 autocast: a training step's loss under autocast tracks the fp32 step's;
- fused AdamW: ``build_optimizer`` picks the fused kernel on CUDA, and its step equals the plain one;
- CUDA RNG in GradCache: the re-encoding pass replays the CUDA generator, so dropout masks match and
  one cached micro-batch gives plain backprop's gradients;
- FSDP2 on the GPU (one rank, NCCL): a sharded step equals the unsharded one; with bf16 parameters
  it tracks it;
- pinned host memory: a batch from host to device through pinned memory, normalised there, equals the
  CPU's result;
- NCCL across two GPUs, where two exist.
"""

from __future__ import annotations

import contextlib
import copy
import socket

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device on this machine")
DROPOUT = {"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}


def _model(dropout: dict | None = None, seed: int = 0):
    from vlp.models import DualEncoder, DualEncoderConfig, EncoderConfig
    from vlp.objectives.pretraining import MaskingConfig, PretrainingModel

    torch.manual_seed(seed)
    options = dropout or {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    cfg = DualEncoderConfig(image_size=32, max_text_length=12, embed_dim=32,
                            image=EncoderConfig(name="vit", options={"patch_size": 8, **options}),
                            text=EncoderConfig(name="bert", options=options))
    return PretrainingModel(DualEncoder(cfg, vocab_size=100), {"contrastive": {"loss": {"mode": "global"}}},
                            MaskingConfig(), special_ids=[0], mask_id=1).train()


def _batch(n: int = 16, device: str = "cuda") -> dict:
    g = torch.Generator().manual_seed(7)
    return {"pixels": torch.randn(n, 3, 32, 32, generator=g).to(device),
            "input_ids": torch.randint(4, 100, (n, 12), generator=g).to(device),
            "attention_mask": torch.ones(n, 12, dtype=torch.long).to(device)}


def _ctx(model, autocast=contextlib.nullcontext, forward=None):
    from vlp.train.steps import StepContext

    return StepContext(model=model, ddp=forward or model, autocast=autocast)


def _grads(model) -> dict:
    return {k: p.grad.detach().float().cpu().clone() for k, p in model.named_parameters() if p.grad is not None}


@needs_cuda
def test_bf16_autocast_step_tracks_the_fp32_step():
    from vlp.train.steps import plain_step

    model = _model().cuda()
    fp32 = plain_step(_ctx(model), [_batch()])
    reference = _grads(model)
    model.zero_grad(set_to_none=True)
    bf16 = plain_step(_ctx(model, lambda: torch.autocast("cuda", dtype=torch.bfloat16)), [_batch()])
    ours = _grads(model)
    assert bf16.loss == pytest.approx(fp32.loss, rel=2e-2)
    assert set(ours) == set(reference)
    for name in reference:
        assert torch.isfinite(ours[name]).all(), name
        cos = torch.nn.functional.cosine_similarity(ours[name].flatten(), reference[name].flatten(), dim=0)
        assert reference[name].norm() == 0 or cos > 0.95, name


@needs_cuda
def test_build_optimizer_uses_fused_adamw_on_cuda_and_it_equals_the_plain_step():
    from vlp.train.config import OptimConfig
    from vlp.train.optim import build_optimizer
    from vlp.train.steps import plain_step

    model = _model().cuda()
    twin = copy.deepcopy(model)
    fused = build_optimizer(model, OptimConfig())
    assert fused.defaults.get("fused") is True
    plain = torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]}
                               for g in build_optimizer(twin, OptimConfig()).param_groups],
                              lr=fused.defaults["lr"], betas=fused.defaults["betas"], eps=fused.defaults["eps"],
                              foreach=False, fused=False)
    for net, opt in ((model, fused), (twin, plain)):
        plain_step(_ctx(net), [_batch()])
        opt.step()
    for (name, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@needs_cuda
def test_gradcache_replays_the_cuda_generator_so_dropout_masks_match():
    """One micro-batch through GradCache (encode without a graph, then again with one) equals plain
    backprop from the same RNG state only if the second pass draws the same CUDA dropout masks."""
    from vlp.train.steps import feature_cache_step, plain_step

    model = _model(DROPOUT).cuda()
    torch.manual_seed(123)
    plain = plain_step(_ctx(model), [_batch()])
    reference = _grads(model)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    cached = feature_cache_step(_ctx(model), [_batch()])
    assert cached.loss == pytest.approx(plain.loss, rel=1e-5)
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, reference[name], rtol=1e-4, atol=1e-6, msg=name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_cuda
def test_fsdp2_on_the_gpu_equals_the_unsharded_step():
    import torch.distributed as dist

    from vlp.train.config import OptimConfig
    from vlp.train.optim import build_optimizer, optimizer_step
    from vlp.train.parallel import wrap_model
    from vlp.train.steps import plain_step

    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        results = {}
        for strategy, bf16 in (("ddp", False), ("fsdp", False), ("fsdp", True)):
            parallel = wrap_model(_model(), strategy, device="cuda", bf16=bf16)
            optimizer = build_optimizer(parallel.model, OptimConfig())
            autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
            loss = plain_step(_ctx(parallel.model, autocast, parallel.module), [_batch()]).loss
            optimizer_step(optimizer, parallel, lr=1e-3, grad_clip=1.0)
            results[(strategy, bf16)] = loss, {k: v.float().cpu() for k, v in parallel.full_state_dict().items()}
        (ref_loss, ref), (loss, ours), (low_loss, _) = (results[k] for k in
                                                        (("ddp", False), ("fsdp", False), ("fsdp", True)))
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        assert set(ours) == set(ref)
        for name in ref:
            torch.testing.assert_close(ours[name], ref[name], rtol=1e-5, atol=1e-5, msg=name)
        assert low_loss == pytest.approx(ref_loss, rel=2e-2)
    finally:
        dist.destroy_process_group()


@needs_cuda
def test_a_batch_through_pinned_memory_arrives_and_normalises_as_on_the_cpu():
    from vlp.data.transforms import pixels_to_model

    pixels = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    host = torch.from_numpy(pixels).pin_memory()
    assert host.is_pinned()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):  # the copy overlaps work on the default stream
        on_device = host.to("cuda", non_blocking=True)
        normalised = pixels_to_model(on_device)
    stream.synchronize()
    torch.testing.assert_close(normalised.cpu(), pixels_to_model(torch.from_numpy(pixels)))


def _nccl_rank(rank: int, port: int, out) -> None:
    import torch.distributed as dist

    from vlp.distributed.collectives import all_reduce_sum

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        total = all_reduce_sum(torch.full((4,), float(rank + 1), device="cuda"))
        out[rank] = total.cpu().tolist()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not CUDA or torch.cuda.device_count() < 2, reason="NCCL across GPUs needs two GPUs")
def test_nccl_all_reduce_across_two_gpus():
    import torch.multiprocessing as mp

    manager = mp.get_context("spawn").Manager()
    out = manager.dict()
    mp.spawn(_nccl_rank, args=(_free_port(), out), nprocs=2, join=True)
    assert dict(out) == {0: [3.0] * 4, 1: [3.0] * 4}
