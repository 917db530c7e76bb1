"""Benchmark: contrastive loss strategies across world sizes, against OpenCLIP's ClipLoss and SigLipLoss.

    python benchmarks/bench_losses.py [--world-sizes 2 4 8] [--batch 256] [--dim 512] [--quick]

For each world size W, W processes form a Gloo group on this machine (CPU; NCCL is not used even where
CUDA exists, so that runs compare) and run, in the same processes and interleaved in rounds so that
machine noise falls on all of them alike:

- ours (``vlp.losses``): ``global``, ``local``, ``grouped`` with k = 2 and k = 4 where k divides W,
  and ``sigmoid``;
- OpenCLIP 3.3.0's ``loss.py`` (loaded from the wheel under ``.bench/``, never vendored):
  ``ClipLoss(local_loss=True, gather_with_grad=True)`` (the peer of ``local``),
  ``ClipLoss(local_loss=False, gather_with_grad=True)`` (the peer of ``global``) and ``SigLipLoss``
  (its default bidirectional ring; the peer of ``sigmoid``).

Per strategy and world size:

- **step time**: loss forward + backward on ``(B, D)`` L2-normalised float32 leaf features per rank,
  after a barrier; a step's time is the slowest rank's; the median (and p90) over the timed steps,
  after warm-up. One intra-op thread per rank.
- **CPU ms per rank**: the process CPU time of one rank's step (all its threads, Gloo's included),
  median over steps of the mean over ranks; it does not grow when W ranks share the cores.
- **saved for backward**: bytes of the distinct storages autograd keeps for backward during one step
  (``torch.autograd.graph.saved_tensors_hooks``), not counting the caller's own input features, scale
  and bias, which exist whatever the loss. This is the memory a strategy holds between forward and
  backward (the gathered features, logits and softmax/sigmoid intermediates).
- **peak live tensors**: the peak of the bytes of live tensors created during one forward + backward
  step (``torch.distributed._tools.mem_tracker.MemTracker``, a private PyTorch tool that follows
  tensor allocations through the dispatcher; its transient peak includes temporaries and gradients).
- **bytes sent per rank and step**: ours from ``ContrastiveOutput.comm`` after backward, checked
  against the documented formula (pass/fail); the peers' from the same formulas applied to their
  collectives (not measured: they have no counter).

One step of ``local`` is also checked against OpenCLIP's local loss (value and feature gradients), and
``sigmoid`` against ``SigLipLoss``, so the timings compare equal work.

Results: a markdown table on stdout and ``benchmarks/results/losses.json`` (``--quick``:
``losses_quick.json``, ignored by git). The OpenCLIP wheel is downloaded once into ``.bench/pkgs/``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.provenance import git_head  # noqa: E402

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

BENCH_DIR = os.path.join(REPO, ".bench")
OPENCLIP_VERSION = "3.3.0"
OPENCLIP_DIR = os.path.join(BENCH_DIR, "pkgs", f"open_clip_{OPENCLIP_VERSION}")
RESULTS = os.path.join(REPO, "benchmarks", "results", "losses.json")
CLIP_SCALE, SIGLIP_SCALE, SIGLIP_BIAS = 1 / 0.07, 10.0, -10.0
OURS_PEER = {"global": "openclip_global", "local": "openclip_local", "sigmoid": "openclip_siglip"}


# ------------------------------------------------------------------------------------------------
# The peer


def ensure_openclip() -> str:
    """Path of OpenCLIP's ``loss.py``, downloading and unpacking the wheel once."""
    loss_py = os.path.join(OPENCLIP_DIR, "open_clip", "loss.py")
    if not os.path.exists(loss_py):
        pkgs = os.path.dirname(OPENCLIP_DIR)
        subprocess.run([sys.executable, "-m", "pip", "download", f"open_clip_torch=={OPENCLIP_VERSION}",
                        "--no-deps", "-d", pkgs], check=True)
        wheel = os.path.join(pkgs, f"open_clip_torch-{OPENCLIP_VERSION}-py3-none-any.whl")
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(OPENCLIP_DIR)
    return loss_py


def load_openclip_loss(path: str):
    # `import open_clip` pulls in torchvision; loss.py alone only needs torch.
    spec = importlib.util.spec_from_file_location("openclip_loss_peer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------------
# Formulas


def expected_bytes(name: str, world: int, batch: int, dim: int, elem: int = 4) -> int:
    """Bytes one rank sends per step (forward + backward), as documented in vlp/losses/contrastive.py.

    OpenCLIP's gather_with_grad is the same all-gather forward and, on Gloo, an all-to-all of the same
    size backward; its bidirectional SigLIP ring sends the same W - 1 blocks as ours.
    """
    chunk = batch * dim * elem
    if name in ("global", "local", "openclip_global", "openclip_local"):
        return 4 * (world - 1) * chunk
    if name.startswith("grouped_k"):
        return 4 * (int(name[len("grouped_k"):]) - 1) * chunk
    if name in ("sigmoid", "openclip_siglip"):
        return 2 * (world - 1) * chunk
    raise ValueError(name)


def strategy_names(world: int) -> list[str]:
    names = ["global", "openclip_global", "local", "openclip_local"]
    names += [f"grouped_k{k}" for k in (2, 4) if world % k == 0]
    return names + ["sigmoid", "openclip_siglip"]


# ------------------------------------------------------------------------------------------------
# Worker (one per rank)


def _build(name: str, world: int, rank: int, openclip):
    """A function (images, texts) -> (loss, counter or None) with fresh scale/bias leaves."""
    from vlp.losses import ContrastiveLossConfig, build_contrastive_loss

    if name.startswith("openclip_"):
        if name == "openclip_siglip":
            peer = openclip.SigLipLoss(rank=rank, world_size=world)
        else:
            peer = openclip.ClipLoss(local_loss=name == "openclip_local", gather_with_grad=True,
                                     cache_labels=True, rank=rank, world_size=world)
        sigmoid = name == "openclip_siglip"
    else:
        mode, k = (name, None) if not name.startswith("grouped_k") else (
            "grouped", int(name[len("grouped_k"):]))
        ours = build_contrastive_loss(ContrastiveLossConfig(mode=mode, group_size=k))
        sigmoid = mode == "sigmoid"

    def run(images, texts):
        scale = torch.tensor(SIGLIP_SCALE if sigmoid else CLIP_SCALE, requires_grad=True)
        bias = torch.tensor(SIGLIP_BIAS, requires_grad=True) if sigmoid else None
        if name.startswith("openclip_"):
            loss = peer(images, texts, scale, bias) if sigmoid else peer(images, texts, scale)
            return loss, None, (scale, bias)
        out = ours(images, texts, scale, bias)
        return out.loss, out.comm, (scale, bias)

    return run


def _features(world: int, rank: int, batch: int, dim: int):
    gen = torch.Generator().manual_seed(1000 * world + rank)
    images = F.normalize(torch.randn(batch, dim, generator=gen), dim=1)
    texts = F.normalize(images + torch.randn(batch, dim, generator=gen), dim=1)
    return images.requires_grad_(True), texts.requires_grad_(True)


def _saved_for_backward_bytes(run, images, texts) -> int:
    """Distinct storages autograd saves during one step, less the caller's inputs."""
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _, leaves = run(images, texts)
    inputs = {t.untyped_storage().data_ptr() for t in (images, texts, *leaves) if t is not None}
    loss.backward()
    return sum(n for ptr, n in saved.items() if ptr not in inputs)


def _peak_live_bytes(run, images, texts) -> int | None:
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError:
        return None
    tracker = MemTracker()
    with tracker:
        loss, _, _ = run(images, texts)
        loss.backward()
    return int(tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"])


def _agreement(ours_run, peer_run, images, texts) -> dict:
    """Relative differences between ours and the peer on the same inputs (value, image and text grads)."""
    results = []
    for run in (ours_run, peer_run):
        i, t = images.detach().clone().requires_grad_(True), texts.detach().clone().requires_grad_(True)
        loss, _, _ = run(i, t)
        loss.backward()
        results.append((loss.detach(), i.grad, t.grad))
    (l1, i1, t1), (l2, i2, t2) = results

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    return {"loss": rel(l1, l2), "grad_images": rel(i1, i2), "grad_texts": rel(t1, t2)}


def worker(rank: int, world: int, port: int, cfg: dict, outdir: str) -> None:
    from vlp.distributed import barrier

    torch.set_num_threads(1)
    # OpenCLIP's gather goes through torch.distributed.nn.all_gather, deprecated in torch 2.13.
    warnings.filterwarnings("ignore", message=".*all_gather is deprecated", category=FutureWarning)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world)
    openclip = load_openclip_loss(cfg["openclip_loss_py"])
    batch, dim = cfg["batch"], cfg["dim"]
    names = strategy_names(world)
    runs = {name: _build(name, world, rank, openclip) for name in names}
    images, texts = _features(world, rank, batch, dim)

    def step(run):
        images.grad = texts.grad = None
        loss, counter, _ = run(images, texts)
        loss.backward()
        return counter

    result = {"rank": rank, "strategies": {}}
    for name in names:
        for _ in range(cfg["warmup"]):
            step(runs[name])
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu_times: dict[str, list[float]] = {name: [] for name in names}
    per_round = max(1, cfg["steps"] // cfg["rounds"])
    for _ in range(cfg["rounds"]):
        for name in names:
            for _ in range(per_round):
                barrier()
                t0, c0 = time.perf_counter(), time.process_time()
                step(runs[name])
                times[name].append(time.perf_counter() - t0)
                cpu_times[name].append(time.process_time() - c0)
    for name in names:
        counter = step(runs[name])
        entry = {"times_s": times[name], "cpu_times_s": cpu_times[name],
                 "saved_for_backward_bytes": _saved_for_backward_bytes(runs[name], images, texts)}
        entry["peak_live_bytes"] = _peak_live_bytes(runs[name], images, texts)
        if counter is not None:
            entry.update(forward_bytes=counter.forward_bytes, backward_bytes=counter.backward_bytes)
        result["strategies"][name] = entry
    result["agreement"] = {ours: _agreement(runs[ours], runs[peer], images, texts)
                           for ours, peer in (("local", "openclip_local"), ("global", "openclip_global"),
                                              ("sigmoid", "openclip_siglip"))}
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    torch.distributed.destroy_process_group()


# ------------------------------------------------------------------------------------------------
# Driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(world: int, cfg: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"bench-losses-{world}-") as outdir:
        t0 = time.monotonic()
        mp.spawn(worker, args=(world, _free_port(), cfg, outdir), nprocs=world, join=True)
        wall = time.monotonic() - t0
        ranks = []
        for r in range(world):
            with open(os.path.join(outdir, f"rank{r}.json")) as f:
                ranks.append(json.load(f))
    summary = {"wall_s": round(wall, 1), "strategies": {}, "agreement_with_openclip": {}}
    for name in strategy_names(world):
        per_rank = [r["strategies"][name] for r in ranks]
        step_times = [max(ts) for ts in zip(*(p["times_s"] for p in per_rank))]  # slowest rank
        entry = {
            "step_ms_median": 1000 * statistics.median(step_times),
            "step_ms_p90": 1000 * sorted(step_times)[int(0.9 * (len(step_times) - 1))],
            # CPU time of one rank's process (all its threads, Gloo's included), mean over ranks:
            # unlike wall time it does not grow because W ranks share 2 cores.
            "cpu_ms_per_rank_median": 1000 * statistics.median(
                statistics.fmean(c) for c in zip(*(p["cpu_times_s"] for p in per_rank))),
            "timed_steps": len(step_times),
            "saved_for_backward_bytes": max(p["saved_for_backward_bytes"] for p in per_rank),
            "peak_live_bytes": max((p["peak_live_bytes"] or 0) for p in per_rank) or None,
            "bytes_expected": expected_bytes(name, world, cfg["batch"], cfg["dim"]),
        }
        if "forward_bytes" in per_rank[0]:
            sent = {p["forward_bytes"] + p["backward_bytes"] for p in per_rank}
            entry["bytes_sent"] = max(sent)
            entry["bytes_source"] = "measured (CommCounter)"
            entry["bytes_check"] = "pass" if sent == {entry["bytes_expected"]} else "FAIL"
        else:
            entry["bytes_sent"] = entry["bytes_expected"]
            entry["bytes_source"] = "formula"
        summary["strategies"][name] = entry
    for ours in ("local", "global", "sigmoid"):
        summary["agreement_with_openclip"][ours] = {
            key: max(r["agreement"][ours][key] for r in ranks) for key in ("loss", "grad_images",
                                                                           "grad_texts")}
    return summary


def ratios(results: dict[int, dict]) -> dict:
    """Ours vs OpenCLIP (time and memory) per world size, and grouped's growth with W."""
    out: dict = {"vs_openclip": {}, "grouped_scaling": {}}
    for world, summary in results.items():
        s = summary["strategies"]
        for ours, peer in OURS_PEER.items():
            out["vs_openclip"][f"{ours}@W={world}"] = {
                "time": s[ours]["step_ms_median"] / s[peer]["step_ms_median"],
                "cpu": s[ours]["cpu_ms_per_rank_median"] / s[peer]["cpu_ms_per_rank_median"],
                "saved_for_backward": s[ours]["saved_for_backward_bytes"]
                / s[peer]["saved_for_backward_bytes"],
                "peak_live": (s[ours]["peak_live_bytes"] / s[peer]["peak_live_bytes"]
                              if s[ours]["peak_live_bytes"] and s[peer]["peak_live_bytes"] else None),
            }
    worlds = sorted(results)
    for name in ("grouped_k2", "grouped_k4", "local"):
        have = [w for w in worlds if name in results[w]["strategies"]]
        if len(have) < 2:
            continue
        lo, hi = have[0], have[-1]
        a, b = results[lo]["strategies"][name], results[hi]["strategies"][name]
        out["grouped_scaling"][name] = {
            "worlds": [lo, hi],
            "bytes_ratio": b["bytes_sent"] / a["bytes_sent"],
            "cpu_ratio": b["cpu_ms_per_rank_median"] / a["cpu_ms_per_rank_median"],
            "saved_for_backward_ratio": b["saved_for_backward_bytes"] / a["saved_for_backward_bytes"],
            "peak_live_ratio": (b["peak_live_bytes"] / a["peak_live_bytes"]
                                if a["peak_live_bytes"] and b["peak_live_bytes"] else None),
        }
    return out


def targets(results: dict[int, dict], rat: dict) -> list[dict]:
    rows = []
    for key, r in rat["vs_openclip"].items():
        ours = key.split("@")[0]
        if ours == "sigmoid":
            continue  # no target for sigmoid; its ratios are context
        for metric in ("time", "saved_for_backward", "peak_live"):
            if r[metric] is not None:
                rows.append({"target": f"{key}: {metric} vs OpenCLIP", "ratio": r[metric],
                             "threshold": "<= 1.1", "met": r[metric] <= 1.1})
    for name, g in rat["grouped_scaling"].items():
        if name == "local":
            continue
        lo, hi = g["worlds"]
        for metric in ("bytes_ratio", "saved_for_backward_ratio", "peak_live_ratio"):
            if g[metric] is not None:
                rows.append({"target": f"{name}: {metric.removesuffix('_ratio')} at W={hi} vs W={lo}",
                             "ratio": g[metric], "threshold": "<= 1.1 (flat in W)",
                             "met": g[metric] <= 1.1})
    for world, summary in results.items():
        for name, s in summary["strategies"].items():
            if "bytes_check" in s:
                rows.append({"target": f"{name}@W={world}: bytes sent == formula",
                             "ratio": s["bytes_sent"] / s["bytes_expected"], "threshold": "== 1",
                             "met": s["bytes_check"] == "pass"})
    return rows


def markdown(results: dict[int, dict], rows: list[dict]) -> str:
    mib = 2 ** 20
    lines = [("| W | strategy | step ms (median) | p90 | CPU ms/rank | saved for backward MiB "
              "| peak live MiB | bytes sent/rank/step MiB | bytes |"),
             "|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for world, summary in results.items():
        for name, s in summary["strategies"].items():
            peak = f"{s['peak_live_bytes'] / mib:.2f}" if s["peak_live_bytes"] else "n/a"
            source = s.get("bytes_check", "formula")
            lines.append(f"| {world} | {name} | {s['step_ms_median']:.1f} | {s['step_ms_p90']:.1f} "
                         f"| {s['cpu_ms_per_rank_median']:.1f} "
                         f"| {s['saved_for_backward_bytes'] / mib:.2f} | {peak} "
                         f"| {s['bytes_sent'] / mib:.2f} | {source} |")
    lines += ["", "| target | ratio | threshold | met |", "|---|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r['target']} | {r['ratio']:.2f} | {r['threshold']} | "
                     f"{'yes' if r['met'] else '**no**'} |")
    return "\n".join(lines)



def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--batch", type=int, default=256, help="samples per rank")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--steps", type=int, default=32, help="timed steps per strategy")
    p.add_argument("--rounds", type=int, default=8, help="interleaved rounds the steps are split into")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="W 2 and 4, B=64, D=128, 4 steps")
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.world_sizes, args.batch, args.dim, args.steps, args.rounds, args.warmup = (
            [2, 4], 64, 128, 4, 2, 1)
    output = args.output or (RESULTS.replace(".json", "_quick.json") if args.quick else RESULTS)
    cfg = {"batch": args.batch, "dim": args.dim, "steps": args.steps, "rounds": args.rounds,
           "warmup": args.warmup, "openclip_loss_py": ensure_openclip()}
    load_before = os.getloadavg()
    results = {}
    for world in args.world_sizes:
        print(f"W={world} ...", flush=True)
        results[world] = run_world(world, cfg)
    rat = ratios(results)
    rows = targets(results, rat)
    report = {
        "benchmark": "contrastive loss strategies",
        "date": _dt.date.today().isoformat(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "backend": "gloo (CPU)", "threads_per_rank": 1,
                    "note": "W ranks share the machine's cores: W > cores is oversubscribed",
                    # Other tenants' load makes absolute times noisy; the interleaved ratios less so.
                    "loadavg_1_5_15_before": [round(x, 2) for x in load_before],
                    "loadavg_1_5_15_after": [round(x, 2) for x in os.getloadavg()]},
        "code": git_head(),
        "peer": f"open_clip_torch {OPENCLIP_VERSION} loss.py",
        "config": {k: v for k, v in cfg.items() if k != "openclip_loss_py"},
        "results": {str(w): r for w, r in results.items()},
        "ratios": rat,
        "targets": rows,
    }
    os.makedirs(os.path.dirname(output), exist_ok=True)
    with open(output, "w") as f:
        json.dump(report, f, indent=1)
    print(markdown(results, rows))
    for world, summary in results.items():
        print(f"W={world} agreement with OpenCLIP (max relative difference over ranks):",
              json.dumps({k: {m: f"{v:.1e}" for m, v in d.items()}
                          for k, d in summary["agreement_with_openclip"].items()}))
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
