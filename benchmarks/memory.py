"""Memory per image of a relicv2 training step, for the demo and the paper configurations.

Each (configuration, batch size) runs in a fresh Python process, so that peaks do not mix: it builds the networks,
the optimiser and one batch of random uint8 images with masks (memory does not depend on their content), then runs
a few full training steps (`_common.ReLICv2Step`: views, online and target passes, loss, backward, LARS, EMA).
CPU: the process's peak resident set size (`resource.getrusage(...).ru_maxrss`, which includes Python and torch
themselves) and its RSS just before the first step. GPU: `torch.cuda.max_memory_allocated` and the memory allocated
before the first step. Per configuration it reports the peak at the larger batch, what the steps added on top of
what was resident before them (`step_mib`), that per image, and the marginal memory of one more image (the slope
between the two batch sizes, free of the fixed costs: weights, gradients, optimiser state, scratch buffers).
The paper preset reads ImageNet; here its images are synthetic, of its `data.image_size` (224 px).

Usage: python benchmarks/memory.py [--quick] [--threads N] [--device cpu|cuda] [--presets demo,paper]
       [--demo-batches 64,128] [--paper-batches 2,4] [--set section.field=value]...
Prints the machine line, then `memory_<preset>: ...` per preset.
"""
from __future__ import annotations

import argparse
import gc
import os
import re
import resource
import subprocess
import sys

import torch

import _common as C

DEFAULT_BATCHES = {  # (cpu, cuda) x (full, quick); the loss needs 2 images at least
    "demo": {"cpu": ("64,128", "8,16"), "cuda": ("128,256", "32,64")},
    "paper": {"cpu": ("2,4", "2,3"), "cuda": ("32,64", "8,16")},
    "tiny": {"cpu": ("8,16", "4,8"), "cuda": ("16,32", "8,16")},
}


def rss_mib() -> float:
    "Resident set size of this process now (Linux: /proc/self/statm), MiB."
    with open("/proc/self/statm") as f: pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def maxrss_mib() -> float:
    "Peak resident set size of this process so far, MiB (ru_maxrss: KiB on Linux, bytes on macOS)."
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024


def child(a) -> int:
    "Measure one (preset, batch) in this process and print `child: peak_mib=... before_mib=...`."
    device, _ = C.setup(a, "memory.py")
    cfg = C.bench_config(a.presets, a.overrides, {"train.batch_size": a.batch})
    batch = C.random_batch(a.batch, cfg.data.image_size).to(device)
    torch.manual_seed(cfg.train.seed)
    step = C.ReLICv2Step(cfg, device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device); torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) / 2**20
    else: before = rss_mib()
    for _ in range(a.steps): step(batch)
    if device.type == "cuda": torch.cuda.synchronize(device); peak = torch.cuda.max_memory_allocated(device) / 2**20
    else: peak = maxrss_mib()
    print(f"child: peak_mib={peak:.3f} before_mib={before:.3f}", flush=True)
    return 0


def measure(a, preset: str, batch: int, threads: int) -> tuple[float, float]:
    "Run `child` in a fresh process: (peak MiB, MiB resident or allocated before the first step)."
    cmd = [sys.executable, __file__, "--child", "--presets", preset, "--batch", str(batch), "--steps", str(a.steps),
           "--threads", str(threads), "--device", a.device] + [x for s in a.overrides for x in ("--set", s)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    m = re.search(r"^child: peak_mib=([\d.]+) before_mib=([\d.]+)$", r.stdout, re.M)
    if r.returncode != 0 or not m:
        raise SystemExit(f"memory.py: the measurement of {preset} at batch {batch} failed (exit {r.returncode}):\n{r.stderr[-2000:]}")
    return float(m[1]), float(m[2])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    C.add_common_args(ap, "a short run (~30 s): demo at batches 8 and 16, paper at 2 and 3, 1 step, 1 thread unless --threads is given")
    ap.add_argument("--presets", default="demo,paper", help="comma-separated presets to measure")
    for p in DEFAULT_BATCHES:
        ap.add_argument(f"--{p}-batches", default=None, help=f"two batch sizes for the {p} preset (the slope between them is the marginal memory per image)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per measurement (default 2, quick 1)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="applied to every preset")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.steps = a.steps or (1 if a.quick else 2)
    if a.child: return child(a)
    device, threads = C.setup(a, "memory.py")
    presets = [p for p in a.presets.split(",") if p]
    plan = {}
    for p in presets:
        if p not in DEFAULT_BATCHES: raise SystemExit(f"memory.py: --presets must name some of {', '.join(DEFAULT_BATCHES)}, got {p!r}")
        text = getattr(a, f"{p}_batches") or DEFAULT_BATCHES[p][device.type][1 if a.quick else 0]
        try: b1, b2 = sorted(int(x) for x in text.split(","))
        except ValueError: raise SystemExit(f"memory.py: --{p}-batches must be two batch sizes like 2,4, got {text!r}") from None
        if not 2 <= b1 < b2: raise SystemExit(f"memory.py: --{p}-batches must be two different sizes >= 2, got {text!r}")
        plan[p] = (b1, b2)
    C.header(device, threads)
    what = "peak allocated (torch.cuda.max_memory_allocated)" if device.type == "cuda" else "peak RSS (ru_maxrss, whole process)"
    C.note(f"memory: {what}, one fresh process per (preset, batch), {a.steps} training step(s) each"
           + (f", overrides {' '.join(a.overrides)}" if a.overrides else "") + (", quick" if a.quick else ""))
    for p, (b1, b2) in plan.items():
        cfg = C.bench_config(p, a.overrides)
        v, e = cfg.views, cfg.encoder
        C.note(f"{p}: {e.arch} x{e.width:g}, {cfg.data.image_size} px images, {v.n_large} large @ {v.large_size} + "
               f"{v.n_small} small @ {v.small_size}, {cfg.train.precision}, channels_last={e.channels_last}, batches {b1} and {b2}")
        (peak1, before1), (peak2, before2) = measure(a, p, b1, threads), measure(a, p, b2, threads)
        step2 = peak2 - before2
        C.summary(f"memory_{p}", batch=b2, peak_mib=peak2, before_mib=before2, step_mib=step2, step_mib_per_image=step2 / b2,
                  marginal_mib_per_image=max(peak2 - peak1, 0.0) / (b2 - b1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
