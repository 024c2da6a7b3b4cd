"""Hardware utilisation: achieved FLOP/s of the encoder's forward + backward over the machine's measured GEMM peak.

The encoder (`relicv2.encoder.resnet` with the preset's architecture, in training mode) runs forward and backward on
one step's online views: L x B large and S x B small random views, one call per view size (`multicrop_forward`).
Its FLOPs are counted once with `torch.utils.flop_counter.FlopCounterMode` (convolutions and matrix products, forward
and backward; batch norm, ReLU and pooling count zero), its time is the median of several repeats. The peak is the
best of several large fp32 `torch.mm` (n x n, 2 n^3 FLOPs) in the same process at the same thread count. The
encoder is timed in the default (NCHW) memory format, in channels_last, and, with --compile, under torch.compile.
On a GPU, TF32 is switched off for both convolutions and the GEMM (fp32 against fp32) unless --tf32 is given.

Usage: python benchmarks/flops.py [--quick] [--threads N] [--device cpu|cuda] [--preset demo] [--compile] [--gemm-size 2048]
Prints the machine line, then `gemm_peak: ...` and `encoder_utilisation: ...`.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import _common as C
from relicv2.encoder import resnet
from relicv2.networks import multicrop_forward


def gemm_peak(n: int, repeats: int, device, sync) -> float:
    "Best FLOP/s of an n x n fp32 matrix product over `repeats` runs (after one warm-up)."
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g).to(device), torch.randn(n, n, generator=g).to(device)
    out = torch.empty(n, n, device=device)
    torch.mm(a, b, out=out); sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter(); torch.mm(a, b, out=out); sync(); best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def encoder_step(encoder, views):
    "Forward (one call per view size) and backward of the encoder; gradients dropped, not accumulated."
    out = multicrop_forward(encoder, views)
    torch.stack([o.float().sum() for o in out]).sum().backward()
    for p in encoder.parameters(): p.grad = None


def time_encoder(encoder, views, repeats: int, sync) -> float:
    "Median seconds of `encoder_step` after two warm-ups (the first of a compiled model compiles it)."
    for _ in range(2): encoder_step(encoder, views)
    sync(); ts = []
    for _ in range(repeats):
        t0 = time.perf_counter(); encoder_step(encoder, views); sync(); ts.append(time.perf_counter() - t0)
    return C.median(ts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    C.add_common_args(ap, "a short run (~15 s): batch 16, 2 repeats, GEMM 1024, no compile, 1 thread unless --threads is given")
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    ap.add_argument("--batch-size", type=int, default=None, help="images per step (default: the preset's; quick: 16)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5, quick 2)")
    ap.add_argument("--gemm-size", type=int, default=None, help="n of the n x n GEMM (default 2048, quick 1024)")
    ap.add_argument("--compile", action="store_true", help="also time the encoder under torch.compile (off by default)")
    ap.add_argument("--tf32", action="store_true", help="GPU: allow TF32 in convolutions and the GEMM")
    a = ap.parse_args(argv)
    device, threads = C.setup(a, "flops.py")
    sync = C.make_sync(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = a.tf32
    cfg = C.bench_config(a.preset, a.overrides)
    B = a.batch_size or (min(16, cfg.train.batch_size) if a.quick else cfg.train.batch_size)
    repeats, n = a.repeats or (2 if a.quick else 5), a.gemm_size or (1024 if a.quick else 2048)
    v, e = cfg.views, cfg.encoder
    C.header(device, threads)
    C.note(f"flops: preset {a.preset}, {e.arch} x{e.width:g}{' small stem' if e.small_stem else ''}, forward + backward of "
           f"{v.n_large}x{B} views @ {v.large_size} px + {v.n_small}x{B} @ {v.small_size} px, fp32, {repeats} repeats (median); "
           f"GEMM {n} x {n} fp32 (best of {repeats})" + (f", tf32 {'on' if a.tf32 else 'off'}" if device.type == "cuda" else "")
           + (", quick" if a.quick else ""))

    peak = gemm_peak(n, repeats, device, sync)
    C.summary("gemm_peak", gflops=peak / 1e9, n=n, threads=threads)

    g = torch.Generator().manual_seed(0)
    views = [torch.rand(v.n_large * B, 3, v.large_size, v.large_size, generator=g).to(device)]
    if v.n_small: views.append(torch.rand(v.n_small * B, 3, v.small_size, v.small_size, generator=g).to(device))
    torch.manual_seed(0)
    make = lambda channels_last: resnet(e.arch, e.width, e.small_stem, e.zero_init_residual, channels_last).to(device).train()
    encoder = make(False)
    with FlopCounterMode(display=False) as counter: encoder_step(encoder, views)
    flops = counter.get_total_flops()
    res = {"gflop_per_step": flops / 1e9}
    variants = [("nchw", encoder), ("channels_last", make(True))]
    if a.compile: variants.append(("compile", torch.compile(make(e.channels_last))))
    for name, model in variants:
        try: t = time_encoder(model, views, repeats, sync)
        except Exception as err:  # torch.compile needs a working C++ toolchain on the CPU
            C.note(f"{name}: failed ({type(err).__name__}: {str(err).splitlines()[0][:160]})"); continue
        res[f"{name}_gflops"] = flops / t / 1e9
        res[f"{name}_pct_of_peak"] = 100 * flops / t / peak
        res[f"{name}_images_per_s"] = B / t
    C.summary("encoder_utilisation", **res, batch=B, threads=threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
