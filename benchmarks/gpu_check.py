"""The GPU check: one script that a session with a GPU machine runs as it is (``make gpu-check``), and
whose report goes into ``benchmarks/README.md``. Under 8 minutes on one H100.

    python benchmarks/gpu_check.py [--budget-s 420] [--peak-tflops N] [--smoke]

1. **The ``gpu`` tests** (``pytest -m gpu tests/test_gpu.py``): bf16 autocast, fused AdamW, CUDA RNG
   in GradCache, FSDP2 on the GPU, pinned-memory host-to-device copies, NCCL where two GPUs exist.
2. **Training throughput and MFU** of a ViT-B/16 (224 px) + BERT-base (77 tokens) dual encoder with the
   grouped contrastive loss, in bf16 autocast with fused AdamW: the largest batch that fits (doubling
   until out of memory), with and without activation checkpointing, ``torch.compile`` off and on; peak
   memory. FLOPs per sample are counted by ``torch.utils.flop_counter`` on one eager step (forward and
   backward), MFU = FLOPs per sample x samples/s / the GPU's bf16 dense peak (a table by device name,
   or ``--peak-tflops``).
3. **Input headroom**: the real input pipeline's per-read work (``pipelines.train_data.read_shards``:
   Parquet, JPEG decode, random crop, tokenise) on a process pool of the machine's CPUs (all but one),
   over curated-format shards of 256 px photos, in samples/s; the data stall the GPU would see at its
   best training rate is ``max(0, 1 - input / training)``. (The GPU machines have no Ray installed and
   only 64 MiB travels there, so this runs the pipeline's own work without Ray's transport; on the
   2-core VM, ``bench_train_input.py`` measures the whole Ray Data path.)

Targets set before the first GPU session (issue 17): MFU at least 45 % of the bf16 peak; data stall
under 5 %; the peer is OpenCLIP's ViT-B/16 rate, about 340 samples/s per A100 (312 TFLOP/s bf16),
scaled to the GPU at hand by peak FLOPs.

``--smoke`` runs every part tiny on the CPU (ViT/BERT ``tiny``, fp32, a few steps): a check that the
script itself works, which the test suite runs. Results: a table on stdout and
``benchmarks/results/gpu_check.json`` (``--smoke``: ``gpu_check_smoke.json``, ignored by git).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results", "gpu_check.json")

# bf16 dense peak TFLOP/s by device name (vendor data sheets; no sparsity)
PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0,
               "A10G": 70.0, "L4": 121.0}
OPENCLIP_B16_A100 = 340.0  # samples/s per A100, from OpenCLIP's model card (GPU-hours per sample)
VOCAB = 30522


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    for key, value in PEAK_TFLOPS.items():  # the more specific names first
        if key in name:
            return value
    return None


# --------------------------------------------------------------------------------------------------
# Training throughput


def build_step(*, smoke: bool, checkpointing: bool, compiled: bool, device):
    """A dual encoder (ViT-B/16 + BERT-base, or tiny ones) with the grouped loss, fused AdamW, and one
    optimiser step as the training loop takes it (``plain_step``, then the optimiser)."""
    import torch

    from vlp.models import DualEncoder, DualEncoderConfig, EncoderConfig
    from vlp.objectives.pretraining import MaskingConfig, PretrainingModel
    from vlp.train.steps import StepContext, plain_step

    torch.manual_seed(0)
    image, text = ("tiny", "tiny") if smoke else ("b-16", "base")
    cfg = DualEncoderConfig(image_size=32 if smoke else 224, max_text_length=16 if smoke else 77,
                            embed_dim=32 if smoke else 512,
                            image=EncoderConfig(name="vit", preset=image, gradient_checkpointing=checkpointing),
                            text=EncoderConfig(name="bert", preset=text, gradient_checkpointing=checkpointing))
    net = DualEncoder(cfg, vocab_size=VOCAB)
    model = PretrainingModel(net, {"contrastive": {"loss": {"mode": "grouped"}}}, MaskingConfig(),
                             special_ids=[0], mask_id=1).to(device).train()
    cuda = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    # --smoke compiles with the eager backend: it checks the wiring, not Inductor's minutes on a CPU
    forward = torch.compile(model, backend="eager" if smoke else "inductor") if compiled else model
    autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext)
    ctx = StepContext(model=model, ddp=forward, autocast=autocast)

    def batch(size: int) -> dict:
        g = torch.Generator(device=device).manual_seed(size)
        return {"pixels": torch.randn(size, 3, cfg.image_size, cfg.image_size, device=device, generator=g),
                "input_ids": torch.randint(4, VOCAB, (size, cfg.max_text_length), device=device, generator=g),
                "attention_mask": torch.ones(size, cfg.max_text_length, dtype=torch.long, device=device)}

    def step(b: dict) -> float:
        result = plain_step(ctx, [b])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return result.loss

    return model, step, batch


def flops_per_sample(step, batch, size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step(batch(size))
    return counter.get_total_flops() / size


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_rate(step, b: dict, device, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step(b)
    _sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        step(b)
    _sync(device)
    return steps * b["pixels"].shape[0] / (time.perf_counter() - t)


def largest_batch(step, batch, device, start: int, limit: int) -> int:
    """The largest batch (doubling from ``start``) that takes two steps without running out of memory."""
    import torch

    best, size = 0, start
    while size <= limit:
        try:
            b = batch(size)
            step(b)
            step(b)
            _sync(device)
            best = size
            del b
            size *= 2
        except torch.OutOfMemoryError:
            break
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return best


def measure_training(args, device, deadline: float) -> list[dict]:
    import torch

    rows, sizes, flops = [], {}, {}
    for compiled in (False, True):
        for checkpointing in (False, True):
            label = f"checkpointing {'on' if checkpointing else 'off'}, compile {'on' if compiled else 'off'}"
            if time.monotonic() > deadline:
                rows.append({"variant": label, "skipped": "time budget spent"})
                continue
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            model, step, batch = build_step(smoke=args.smoke, checkpointing=checkpointing,
                                            compiled=compiled, device=device)
            if checkpointing not in sizes:  # eager finds the batch; compile reuses it
                sizes[checkpointing] = (4 if args.smoke else
                                        largest_batch(step, batch, device, 128, args.max_batch))
            size = sizes[checkpointing]
            row = {"variant": label, "batch": size}
            if size:
                if checkpointing not in flops:  # eager; the same model's FLOPs under compile
                    flops[checkpointing] = flops_per_sample(step, batch, min(size, 8))
                t0 = time.monotonic()
                row["samples_per_s"] = timed_rate(step, batch(size), device, 1 if args.smoke else 3,
                                                  2 if args.smoke else 10)
                row["seconds"] = round(time.monotonic() - t0, 1)
                row["flops_per_sample"] = flops[checkpointing]
                if device.type == "cuda":
                    row["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            rows.append(row)
            del model, step
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------------------------------
# Input headroom


def _read_all(task) -> tuple[int, float]:
    path, rows, prepare = task
    from pipelines.train_data import read_shards
    import pyarrow as pa

    from vlp.data.storage import Storage

    t, n = time.perf_counter(), 0
    reads = pa.Table.from_pylist([{"path": path, "rows": rows, "kind": "image-text"}])
    for out in read_shards(reads, storage=Storage(), rows_per_batch=64, prepare=prepare):
        n += len(out["input_ids"])
    return n, time.perf_counter() - t


def measure_input(args) -> dict:
    from multiprocessing import get_context

    from score_inputs import all_captions, prepare_shards
    from vlp.data.shards import ShardFolder
    from vlp.data.tokenizer import TokenizerConfig, train_tokenizer

    rows = 256 if args.smoke else 8192
    folder = prepare_shards(rows, 256 if args.smoke else 1024)
    tok_dir = os.path.join(os.path.dirname(folder), "tokenizer")
    if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        train_tokenizer(all_captions() * 4, TokenizerConfig(vocab_size=1000)).save_pretrained(tok_dir)
    prepare = dict(image_size=32 if args.smoke else 224, max_text_length=16 if args.smoke else 77,
                   tokenizer_path=tok_dir, min_crop_scale=0.5, num_frames=1, significant_words=None)
    tasks = [(s.path, s.rows, prepare) for s in ShardFolder.open(folder).shards]
    processes = max(1, (os.cpu_count() or 2) - 1)
    t = time.perf_counter()
    with get_context("spawn").Pool(processes) as pool:
        done = pool.map(_read_all, tasks, chunksize=1)
    wall = time.perf_counter() - t
    samples = sum(n for n, _ in done)
    # spawn start-up is in ``wall``; the per-process rates exclude it
    steady = sum(n / s for n, s in done) / len(done) * min(processes, len(tasks))
    return {"rows": samples, "processes": processes, "wall_s": round(wall, 1),
            "samples_per_s_end_to_end": samples / wall, "samples_per_s_steady": steady}


# --------------------------------------------------------------------------------------------------


def run_gpu_tests(smoke: bool) -> dict:
    if smoke:
        return {"skipped": "--smoke (CPU)"}
    t = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-q",
                           "-p", "no:cacheprovider", "-o", "addopts="], cwd=REPO, capture_output=True,
                          text=True, timeout=240)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    return {"rc": proc.returncode, "summary": lines[-1] if lines else "", "seconds": round(time.monotonic() - t),
            "failures": [line for line in lines if line.startswith(("FAILED", "ERROR", "SKIPPED"))]}


def render(report: dict) -> str:
    out = [f"GPU check, {report['date']}: {report['device']} (peak bf16 {report['peak_tflops']} TFLOP/s), "
           f"torch {report['torch']}, commit {report['commit']}", "",
           f"gpu tests: {report['tests'].get('summary') or report['tests'].get('skipped')}", "",
           "| variant | batch | samples/s | TFLOP/s | MFU | peak memory GB |", "|---|---:|---:|---:|---:|---:|"]
    for r in report["training"]:
        if not r.get("batch"):
            out.append(f"| {r['variant']} | {r.get('skipped', 'nothing fits')} | | | | |")
            continue
        tf = r["samples_per_s"] * (r.get("flops_per_sample") or 0) / 1e12
        mfu = f"{tf / report['peak_tflops']:.1%}" if report["peak_tflops"] and tf else "–"
        out.append(f"| {r['variant']} | {r['batch']} | {r['samples_per_s']:.1f} | {tf:.1f} | {mfu} | "
                   f"{r.get('peak_memory_gb', '–')} |")
    best = max((r["samples_per_s"] for r in report["training"] if r.get("batch")), default=0.0)
    inp = report["input"]
    stall = max(0.0, 1 - inp["samples_per_s_steady"] / best) if best else None
    report["data_stall_estimate"] = stall
    out += ["", f"input pipeline: {inp['samples_per_s_steady']:.0f} samples/s steady on {inp['processes']} "
                f"processes ({inp['samples_per_s_end_to_end']:.0f} end to end); data stall at the best "
                f"training rate {best:.0f} samples/s: {stall:.1%}" if stall is not None else "input: –"]
    if report.get("peer_samples_per_s"):
        out.append(f"peer: OpenCLIP ViT-B/16 scaled to this GPU: {report['peer_samples_per_s']:.0f} samples/s; "
                   f"ours {best:.0f} ({best / report['peer_samples_per_s']:.2f}x)")
    out.append("targets: MFU >= 45%, data stall < 5%")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget-s", type=float, default=420, help="stop starting training variants after this")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's bf16 dense peak")
    ap.add_argument("--max-batch", type=int, default=2048)
    ap.add_argument("--smoke", action="store_true", help="tiny, on the CPU: checks the script itself")
    ap.add_argument("--output", default=None)
    args = ap.parse_args(argv)
    import torch

    started = time.monotonic()
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print("gpu_check: no CUDA device here; run it on a GPU machine, or pass --smoke", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu"
    peak = peak_tflops(name, args.peak_tflops) if cuda else None
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    report = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "device": name, "peak_tflops": peak,
              "torch": torch.__version__, "commit": commit, "cpus": os.cpu_count()}
    report["tests"] = run_gpu_tests(args.smoke)
    print(f"[gpu-check] tests: {report['tests']}", flush=True)
    report["training"] = measure_training(args, device, started + args.budget_s)
    print(f"[gpu-check] training: {report['training']}", flush=True)
    report["input"] = measure_input(args)
    if peak:
        report["peer_samples_per_s"] = OPENCLIP_B16_A100 * peak / PEAK_TFLOPS["A100"]
    print(render(report), flush=True)
    report["seconds"] = round(time.monotonic() - started)
    output = args.output or (RESULTS.replace(".json", "_smoke.json") if args.smoke else RESULTS)
    os.makedirs(os.path.dirname(output), exist_ok=True)
    with open(output, "w") as f:
        json.dump(report, f, indent=1)
    print(f"[gpu-check] {report['seconds']} s; written {os.path.relpath(output, REPO)}", flush=True)
    return 0 if report["tests"].get("rc", 0) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
