"""Shared by the benchmark scripts (not a benchmark itself): the header line, summary lines, timing, synthetic data,
and relicv2's training step: the very `relicv2.train.train_step` that `fit` runs.

Output convention of every script: lines starting with `#` are context (machine, settings, notes); every other line
is one figure, `name: key=value key=value ...`, every value a number (parse with `parse_summary`).
"""
from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from relicv2 import items as ritems, synthetic as rsynthetic
from relicv2.config import load_config, update
from relicv2.distributed import DistEnv
from relicv2.optim import lr_schedule
from relicv2.target import momentum_schedule
from relicv2.checkpoint import ResumableSampler
from relicv2.memory import tune_malloc
from relicv2.train import build_step, train_step

HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------- machine, arguments, output
def cpu_model() -> str:
    "The CPU's model name (Linux), else what `platform` knows."
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"): return line.split(":", 1)[1].strip()
    except OSError: pass
    return platform.processor() or platform.machine()


def add_common_args(ap, quick_help: str):
    "--quick, --threads, --device: the flags every benchmark script takes."
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: 1 with --quick, whose run time must not depend on the machine's load; else torch's)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (timings synchronise the device)")


def setup(args, script: str) -> tuple[torch.device, int]:
    "Apply --threads, check --device; exit with a one-line message when the device is not usable."
    threads = args.threads if args.threads is not None else (1 if args.quick else torch.get_num_threads())
    if threads < 1: raise SystemExit(f"{script}: --threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    try: device = torch.device(args.device)
    except RuntimeError: raise SystemExit(f"{script}: --device must be cpu, cuda or cuda:N, got {args.device!r}") from None
    if device.type not in ("cpu", "cuda"): raise SystemExit(f"{script}: --device must be cpu, cuda or cuda:N, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"{script}: --device {args.device} was asked for, but torch sees no CUDA device")
    return device, threads


def header(device: torch.device, threads: int) -> None:
    "The first line of every script: machine, library versions, device, threads, load average."
    import torchvision
    parts = [f"# machine: {cpu_model()} ({os.cpu_count()} cpus), {platform.system()} {platform.machine()}",
             f"python {platform.python_version()}", f"torch {torch.__version__}", f"torchvision {torchvision.__version__}"]
    if device.type == "cuda": parts.append(f"gpu {torch.cuda.get_device_name(device)}")
    parts += [f"device {device}", f"threads {threads}", f"load {os.getloadavg()[0]:.2f}"]
    print(" | ".join(parts), flush=True)


def note(text: str) -> None:
    "A context line (not a figure)."
    print(f"# {text}", flush=True)


def _fmt(v) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)): raise TypeError(f"summary values must be numbers, got {v!r}")
    if isinstance(v, int): return str(v)
    return f"{v:.0f}" if abs(v) >= 1e4 else f"{v:.4g}"


def summary(name: str, **values) -> None:
    "Print one figure: `name: key=value ...` with numeric values."
    print(f"{name}: " + " ".join(f"{k}={_fmt(v)}" for k, v in values.items()), flush=True)


def parse_summary(text: str) -> dict[str, dict[str, float]]:
    "{figure: {key: value}} from a script's output (context lines skipped); ValueError on a malformed line."
    out = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"): continue
        name, sep, rest = line.partition(": ")
        pairs = [p.partition("=") for p in rest.split()]
        if not sep or not name.isidentifier() or not pairs or any(not k or not e for k, e, _ in pairs):
            raise ValueError(f"malformed summary line: {line!r}")
        out[name] = {k: float(v) for k, _, v in pairs}
    return out


def make_sync(device: torch.device):
    "A function that waits for the device (a no-op on the CPU)."
    if device.type == "cuda": return lambda: torch.cuda.synchronize(device)
    return lambda: None


def median(xs) -> float: return statistics.median(xs)


# ---------------------------------------------------------------- configs and data
def bench_config(preset: str, overrides: list[str] | dict | None = None, fields: dict | None = None):
    "A preset with `--set` overrides, then `fields` ({'section.field': value}), on synthetic images of the config's `data.image_size` (no dataset on disk needed)."
    cfg = load_config(preset, None, overrides)
    if cfg.data.dataset.partition(":")[0] != "synthetic":  # the paper preset reads ImageNet: time the same sizes on synthetic images
        cfg = update(cfg, {"data.dataset": "synthetic", "data.synthetic_size": cfg.data.image_size})
    return update(cfg, fields) if fields else cfg


def synthetic_images(n: int, size: int, seed: int = 0):
    "`n` synthetic training images (uint8, exact masks) generated in memory: nothing is read or written on disk."
    return rsynthetic.SyntheticShapes("train", size=size, n=n, seed=seed, cache_dir=False)


def random_batch(n: int, size: int, seed: int = 0) -> ritems.Batch:
    "A `Batch` of random uint8 images with a disc-shaped mask each: cheap at any size (memory does not depend on content)."
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    c = torch.rand(n, 2, generator=g) * size * 0.5 + size * 0.25
    r = (torch.rand(n, generator=g) * 0.2 + 0.2) * size
    masks = ((xx - c[:, 0, None, None]) ** 2 + (yy - c[:, 1, None, None]) ** 2 < r[:, None, None] ** 2)[:, None].to(torch.uint8)
    return ritems.Batch(images, masks, torch.ones(n, dtype=torch.bool), torch.full((n,), -1, dtype=torch.int64))


def relicv2_loader(dataset, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0, pin_memory: bool = False):
    "The DataLoader `fit` builds: uint8 images and masks, collated; no workers (`data.num_workers=0`), views made later."
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=ResumableSampler(dataset, world_size, rank, seed),
                                       drop_last=True, collate_fn=ritems.collate, num_workers=0, pin_memory=pin_memory)


# ---------------------------------------------------------------- relicv2's training step
class Marks:
    "Cumulative seconds per named part of a step, each boundary synchronised with the device."
    def __init__(self, sync):
        self.sync, self.parts, self.t = sync, {}, time.perf_counter()

    def reset(self): self.sync(); self.t = time.perf_counter()

    def __call__(self, name: str):
        self.sync(); now = time.perf_counter()
        self.parts[name] = self.parts.get(name, 0.0) + now - self.t
        self.t = now


class ReLICv2Step:
    """One step of `relicv2.train.fit`'s loop, as a callable on a `Batch` already on the device: `relicv2.train.train_step`
    itself (views on the device, one online pass per view size, DDP when distributed, target pass, negatives gathered
    across processes, the loss, the finiteness check, backward, optimiser step, EMA), on the parts `build_step` makes.
    Two things differ from a run, both on purpose: the whole benchmark stays inside the warm-up of a `total_steps`-long
    schedule (small learning rates: no divergence on random data), and a batch too small for `loss.n_negatives`
    (memory.py's) gets N - 1 negatives, the most it has, as the `#` line of the script says."""
    PARTS = ("views", "forward", "loss", "backward", "optimizer", "ema")

    def __init__(self, cfg, device: torch.device, total_steps: int = 1000, rank: int = 0, world_size: int = 1):
        if cfg.loss.objective == "supervised": raise ValueError("loss.objective='supervised' is not benchmarked; use relicv2, infonce or byol")
        B = cfg.train.batch_size
        if B % world_size: raise ValueError(f"train.batch_size={B} must be divisible by the number of processes ({world_size})")
        if cfg.loss.n_negatives is not None and cfg.loss.n_negatives > B - 1: cfg = update(cfg, {"loss.n_negatives": B - 1})
        self.cfg, self.device = cfg, device
        # as `fit`: on the CPU, glibc keeps freed memory mapped (process-wide: whatever else runs in this process gets it too)
        self.malloc_tuned = tune_malloc() if cfg.train.tune_malloc and device.type == "cpu" else False
        env = DistEnv(rank=rank, world_size=world_size, local_rank=rank, device=device)
        parts = build_step(cfg, env, 0, total_steps)
        self.parts = dataclasses.replace(parts, lrs=lr_schedule(cfg.optim.base_lr, B, total_steps, total_steps),
                                         momenta=momentum_schedule(total_steps, cfg.target.tau_base))
        self.online, self.target = self.parts.online, self.parts.target
        self.online.train(); self.target.train()
        self.step = 0

    def __call__(self, batch: ritems.Batch, mark=None) -> float:
        "Train on one batch (on the device); `mark(name)` is called at the end of each part of `PARTS`. Returns the loss."
        loss, _, _ = train_step(self.parts, batch, min(self.step, len(self.parts.lrs) - 1), mark)
        self.step += 1
        return loss.item()


def time_epoch(loader, step, warmup: int, steps: int, sync, barrier=None) -> float:
    """Seconds for `steps` steps of a fresh pass over `loader` (data loading included), after `warmup` untimed ones.
    The iterator is dropped at the end, which stops its workers: nothing keeps running while something else is timed."""
    it = iter(loader)
    for _ in range(warmup): step(next(it))
    sync()
    if barrier: barrier()
    t0 = time.perf_counter()
    for _ in range(steps): step(next(it))
    sync()
    if barrier: barrier()
    dt = time.perf_counter() - t0
    del it
    return dt
