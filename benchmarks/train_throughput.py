"""Training throughput of relicv2's own loop (`relicv2.train.fit`): images/s and peak memory.

Runs `fit` for a few steps on any preset with `--set` overrides, on whatever device the config names, and prints one
summary line: the median images/s over the logged steps after warm-up, and the peak memory (CUDA: max allocated;
CPU: peak RSS of this process). Used by gpu_check.sh; works on a CPU too.

    python benchmarks/train_throughput.py --preset tiny --steps 8
    python benchmarks/train_throughput.py --preset paper --set data.dataset=synthetic --steps 20 --warmup 5
"""
import argparse
import resource
import statistics
import sys
import tempfile
import time

import torch

from relicv2.config import load_config, update
from relicv2.train import MetricsLog, fit


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    p.add_argument("--steps", type=int, default=8, help="steps to time (after warm-up)")
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
    p.add_argument("--label", default=None, help="name printed at the start of the summary line")
    args = p.parse_args(argv)
    cfg = load_config(args.preset, None, args.overrides)
    with tempfile.TemporaryDirectory() as d:
        cfg = update(cfg, {"train.out_dir": d, "train.log_every": 1, "train.epochs": max(cfg.train.epochs, 1000), "train.ckpt_every": 10**9, "train.monitor_steps": 0})
        total = args.steps + args.warmup
        if torch.cuda.is_available(): torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        res = fit(cfg, max_steps=total, progress=False)
        wall = time.perf_counter() - t0
        rows = [r for r in MetricsLog.read(f"{d}/metrics.jsonl") if "images_per_s" in r][args.warmup:]
    if not rows:
        print("train_throughput: no timed steps (is the dataset smaller than one batch?)", file=sys.stderr)
        return 1
    ips = statistics.median(r["images_per_s"] for r in rows)
    wait = statistics.median(r["data_wait"] for r in rows)
    dev = next(res.online.parameters()).device
    if dev.type == "cuda":
        mem, what = torch.cuda.max_memory_allocated(dev) / 2**20, f"peak allocated on {torch.cuda.get_device_name(dev)}"
    else:
        mem, what = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak RSS (CPU)"
    label = args.label or args.preset
    print(f"{label}: {ips:.1f} images/s (median of {len(rows)} steps, batch {cfg.train.batch_size}, "
          f"{cfg.views.n_large}x{cfg.views.large_size}px + {cfg.views.n_small}x{cfg.views.small_size}px views, "
          f"{cfg.encoder.arch} x{cfg.encoder.width:g}, {cfg.train.precision}, channels_last={cfg.encoder.channels_last}), "
          f"data wait {100 * wait:.1f}%, {what} {mem:.0f} MiB, {mem / cfg.train.batch_size:.2f} MiB/image, wall {wall:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
