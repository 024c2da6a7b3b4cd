"""Scaling of relicv2's training step: 1 vs 2 processes (gloo on the CPU, nccl on GPUs), batch size, number of views.

- processes: the same global batch trained by W processes (W = 1, 2), each on its share, started like torchrun
  (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK) with torch.multiprocessing and
  `relicv2.distributed.init_distributed`; each runs `_common.ReLICv2Step` (what `fit` runs: DDP, negatives gathered
  across processes, loss check all-reduced) on its shard of a `ResumableSampler`, `--threads` threads each. Images/s
  are global, timed by rank 0 between barriers. Every repeat starts fresh process groups, W = 1 and W = 2 alternating.
- batch: step time (views + forward + backward + optimiser + EMA, one process, batch already in memory) against the
  batch size, with a least-squares fit step_ms = fixed_ms + ms_per_image * batch.
- views: step time against (L large, S small) views per image at a fixed batch; with 3 or more settings, a fit
  step_ms = fixed_ms + ms_per_large_view * L + ms_per_small_view * S.
The settings of a sweep alternate, repeat by repeat; figures are medians.

Usage: python benchmarks/scaling.py [--quick] [--threads N] [--device cpu|cuda] [--preset demo] [--worlds 1,2]
       [--batches 32,64,128,256] [--views 2x0,2x2,4x2,2x6] [--set section.field=value]...
Prints the machine line, then `scaling_processes: ...`, `scaling_batch: ...` and `scaling_views: ...`.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import _common as C
from relicv2 import items as ritems
from relicv2.distributed import init_distributed, shutdown_distributed


def free_port() -> int:
    "A TCP port that is free now on this machine."
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg, device: str, threads: int, warmup: int, steps: int, queue):
    "One process of a W-process job: torchrun's environment, relicv2's step on its shard; rank 0 reports seconds."
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(threads)
    env = init_distributed(device, timeout_s=300)
    try:
        B = cfg.train.batch_size
        dataset = C.synthetic_images((warmup + steps) * B, cfg.data.image_size, seed=cfg.train.seed)
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every process
        step = C.ReLICv2Step(cfg, env.device, rank=rank, world_size=world)
        loader = C.relicv2_loader(dataset, B // world, rank, world, cfg.train.seed, pin_memory=env.device.type == "cuda")
        dt = C.time_epoch(loader, lambda b: step(b.to(env.device, non_blocking=True)), warmup, steps, C.make_sync(env.device),
                          barrier=dist.barrier if env.distributed else None)
        if env.is_main: queue.put(dt)
    finally:
        shutdown_distributed()


def time_world(cfg, world: int, device: str, threads: int, warmup: int, steps: int) -> float:
    "Seconds for `steps` global steps of a fresh `world`-process job."
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(world, free_port(), cfg, device, threads, warmup, steps, queue), nprocs=world,
                       join=True, start_method="spawn")
    return queue.get()


def sweep(cfgs: dict, device, batches: dict, warmup: int, steps: int, repeats: int, sync) -> dict:
    "Median ms per step of each config (name -> cfg), one process, settings alternating repeat by repeat."
    runs = {}
    for name, cfg in cfgs.items():
        torch.manual_seed(cfg.train.seed)
        runs[name] = C.ReLICv2Step(cfg, device, total_steps=1000)
        for _ in range(warmup): runs[name](batches[name])
    times = {name: [] for name in cfgs}
    for _ in range(repeats):
        for name, step in runs.items():
            sync(); t0 = time.perf_counter()
            for _ in range(steps): step(batches[name])
            sync(); times[name].append(1e3 * (time.perf_counter() - t0) / steps)
    return {name: C.median(ts) for name, ts in times.items()}


def lstsq(rows: list[list[float]], y: list[float]) -> list[float] | None:
    "Least-squares coefficients, or None when the rows do not determine them."
    A, b = torch.tensor(rows, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)[:, None]
    if torch.linalg.matrix_rank(A) < A.shape[1]: return None
    return torch.linalg.lstsq(A, b).solution[:, 0].tolist()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    C.add_common_args(ap, "a short run (~30 s): batch 16, batches 8,16, views 2x0,2x1 at batch 8, 1 repeat of 2 steps, 1 thread per process unless --threads is given")
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    ap.add_argument("--worlds", default="1,2", help="numbers of processes to compare (CPU: gloo; CUDA: nccl, one GPU each)")
    ap.add_argument("--batch-size", type=int, default=None, help="global batch of the process comparison and of the views sweep "
                    "(default: the preset's; quick: 16 and 8)")
    ap.add_argument("--batches", default=None, help="batch sizes of the batch sweep (default 32,64,128,256; quick 8,16)")
    ap.add_argument("--views", default=None, help="LxS settings of the views sweep (default 2x0,2x2,4x2,2x6; quick 2x0,2x1)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per repeat (default 10 for processes and 5 for sweeps; quick 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2, quick 1)")
    ap.add_argument("--repeats", type=int, default=None, help="repeats (default 3, quick 1)")
    a = ap.parse_args(argv)
    device, threads = C.setup(a, "scaling.py")
    sync = C.make_sync(device)
    cfg = C.bench_config(a.preset, a.overrides)
    try:
        worlds = [int(w) for w in a.worlds.split(",")]
        batches = [int(b) for b in (a.batches or ("8,16" if a.quick else "32,64,128,256")).split(",")]
        views = [tuple(int(x) for x in s.lower().split("x")) for s in (a.views or ("2x0,2x1" if a.quick else "2x0,2x2,4x2,2x6")).split(",")]
    except ValueError: raise SystemExit("scaling.py: --worlds and --batches take integers like 1,2; --views takes LxS settings like 2x0,4x2") from None
    if any(w < 1 for w in worlds) or any(b < 2 for b in batches) or any(len(v) != 2 or v[0] < 1 or v[1] < 0 for v in views):
        raise SystemExit("scaling.py: --worlds must be >= 1, --batches >= 2, --views LxS with L >= 1 and S >= 0")
    if device.type == "cuda" and max(worlds) > torch.cuda.device_count():
        raise SystemExit(f"scaling.py: --worlds {a.worlds} needs {max(worlds)} GPUs, torch sees {torch.cuda.device_count()}")
    B = a.batch_size or (16 if a.quick else cfg.train.batch_size)
    steps, warmup, repeats = a.steps or (2 if a.quick else None), a.warmup if a.warmup is not None else (1 if a.quick else 2), a.repeats or (1 if a.quick else 3)
    e, v = cfg.encoder, cfg.views
    C.header(device, threads)
    C.note(f"scaling: preset {a.preset}, {e.arch} x{e.width:g}, {cfg.data.image_size} px images, {v.n_large} large @ {v.large_size} + "
           f"{v.n_small} small @ {v.small_size}, {repeats} repeats (median), {threads} thread(s) per process" + (", quick" if a.quick else ""))

    # ---------------- processes: the same global batch, W processes
    if any(B % w for w in worlds): raise SystemExit(f"scaling.py: the batch {B} must be divisible by every W in --worlds {a.worlds}")
    pcfg = C.update(cfg, {"train.batch_size": B})
    times = {w: [] for w in worlds}
    for _ in range(repeats):
        for w in worlds: times[w].append(time_world(pcfg, w, str(device), threads, warmup, steps or 10))
    ips = {w: B * (steps or 10) / C.median(ts) for w, ts in times.items()}
    res = {f"w{w}_images_per_s": x for w, x in ips.items()}
    if 1 in ips and len(ips) > 1:
        w = max(ips); res.update(speedup=ips[w] / ips[1], efficiency=ips[w] / ips[1] / w)
    C.summary("scaling_processes", **res, batch=B, threads_per_process=threads)

    # ---------------- batch size
    cfgs = {f"b{b}": C.update(cfg, {"train.batch_size": b}) for b in batches}
    data = C.random_batch(max(batches), cfg.data.image_size).to(device)
    pick = lambda n: ritems.Batch(*(t[:n] for t in data))
    ms = sweep(cfgs, device, {f"b{b}": pick(b) for b in batches}, warmup, steps or 5, repeats, sync)
    res = {f"{k}_step_ms": x for k, x in ms.items()}
    fit = lstsq([[1.0, b] for b in batches], [ms[f"b{b}"] for b in batches])
    if fit: res.update(fixed_ms=fit[0], ms_per_image=fit[1])
    C.summary("scaling_batch", **res)

    # ---------------- views per image
    Bv = a.batch_size or (8 if a.quick else cfg.train.batch_size)
    cfgs = {f"l{l}s{s}": C.update(cfg, {"train.batch_size": Bv, "views.n_large": l, "views.n_small": s}) for l, s in views}
    ms = sweep(cfgs, device, {k: pick(Bv) if Bv <= max(batches) else C.random_batch(Bv, cfg.data.image_size).to(device) for k in cfgs},
               warmup, steps or 5, repeats, sync)
    res = {f"{k}_step_ms": x for k, x in ms.items()}
    fit = lstsq([[1.0, l, s] for l, s in views], [ms[f"l{l}s{s}"] for l, s in views])
    if fit: res.update(fixed_ms=fit[0], ms_per_large_view=fit[1], ms_per_small_view=fit[2])
    C.summary("scaling_views", **res, batch=Bv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
