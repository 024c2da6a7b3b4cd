"""Views per second: relicv2's batched view generator vs the same ops per image with torchvision.transforms.v2.

Both pipelines make, for every image of one batch, L large views (BYOL's two pipelines alternating, background
removal with probability p_m on large views) and S small views: random resized crop (bicubic), horizontal flip,
colour jitter (p 0.8), grayscale (p 0.2), gaussian blur (p 1.0 / 0.1), solarize (p 0.0 / 0.2). The baseline is
the usual way: a Python loop over images and views calling torchvision.transforms.v2 (what a DataLoader worker
would do), with the mask applied per image; it runs on float images, which is faster here than on uint8 ones. Timings alternate the two pipelines, repeat by
repeat, in one process, so that a change of machine load hits both; the figure for each is the median.

Usage: python benchmarks/views.py [--quick] [--threads 2,1] [--mask-prob 0.1] [--device cpu|cuda] [--batch-size 256] ...
Prints a header line, then for each thread count one summary line per figure: batched views/s, per-image views/s,
speedup.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torchvision.transforms import v2

from relicv2.memory import tune_malloc
from relicv2.augment import blur_kernel_size
from relicv2.views import ViewGenerator


def make_batch(n: int, size: int, seed: int = 0):
    "Random uint8 images with a disc-shaped foreground mask each (covering about 10-40% of the image)."
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    c = torch.rand(n, 2, generator=g) * size * 0.5 + size * 0.25
    r = (torch.rand(n, generator=g) * 0.2 + 0.2) * size
    masks = ((xx - c[:, 0, None, None]) ** 2 + (yy - c[:, 1, None, None]) ** 2 < r[:, None, None] ** 2)
    return images, masks[:, None].to(torch.uint8)


def torchvision_pipelines(gen: ViewGenerator, uint8: bool = False) -> dict:
    "The per-image torchvision.transforms.v2 pipelines, for uint8 or float inputs: (large|small, view type) -> Compose."
    c, bicubic = gen.cfg, v2.InterpolationMode.BICUBIC
    def pipe(size, scale, t):
        return v2.Compose([
            v2.RandomResizedCrop(size, scale=scale, ratio=c.ratio, interpolation=bicubic, antialias=False),  # no antialiasing, as ours (and BYOL's)
            v2.RandomHorizontalFlip(c.flip_prob),
            v2.RandomApply([v2.ColorJitter(c.brightness, c.contrast, c.saturation, c.hue)], p=c.jitter_prob),
            v2.RandomGrayscale(c.grayscale_prob),
            v2.RandomApply([v2.GaussianBlur(blur_kernel_size(size), sigma=c.blur_sigma)], p=c.blur_prob[t]),
            v2.RandomSolarize(threshold=128 if uint8 else 0.5, p=c.solarize_prob[t]),
        ] + ([v2.ToDtype(torch.float32, scale=True)] if uint8 else []))
    return {(k, t): pipe(c.large_size if k == "large" else c.small_size, c.large_scale if k == "large" else c.small_scale, t)
            for k in ("large", "small") for t in (0, 1)}


def per_image_views(images, masks, gen: ViewGenerator, pipes: dict):
    "The same views made one image and one view at a time (float pipelines: faster here than uint8 ones)."
    c, large, small = gen.cfg, [], []
    for img, m in zip(images, masks):
        x = img.float().div_(255)
        usable = m.float().mean() >= c.min_mask_coverage
        for i in range(c.n_large):
            src = x * m if usable and torch.rand(()) < c.mask_prob else x  # background to zeros
            large.append(pipes[("large", i % 2)](src))
        for i in range(c.n_small):
            small.append(pipes[("small", i % 2)](x))
    return large, small


def measure(gen, pipes, images, masks, d_images, d_masks, n_base, repeats, sync, seed=0):
    "Median seconds per call of the batched pipeline (whole batch) and of the per-image loop (n_base images)."
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    gen(d_images, d_masks, generator=g); sync()  # warm-up
    per_image_views(images[:4], masks[:4], gen, pipes)
    t_batched, t_loop = [], []
    for _ in range(repeats):  # alternate, so that a change of machine load hits both
        t0 = time.perf_counter(); gen(d_images, d_masks, generator=g); sync(); t_batched.append(time.perf_counter() - t0)
        t0 = time.perf_counter(); per_image_views(images[:n_base], masks[:n_base], gen, pipes); t_loop.append(time.perf_counter() - t0)
    return statistics.median(t_batched), statistics.median(t_loop)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="a short run (< 30 s): 3 repeats, baseline on 32 images, 1 thread unless --threads is given")
    ap.add_argument("--device", default="cpu", help="device of the batched pipeline (the baseline always runs on the CPU)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--large-size", type=int, default=32)
    ap.add_argument("--small-size", type=int, default=16)
    ap.add_argument("--n-large", type=int, default=4)
    ap.add_argument("--n-small", type=int, default=2)
    ap.add_argument("--mask-prob", type=float, default=0.1, help="p_m (default: the config's 0.1)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats of each pipeline (default 7, quick 3)")
    ap.add_argument("--threads", default=None, help="comma-separated torch thread counts to measure, e.g. 2,1 (default: "
                    "torch's; 1 with --quick, whose run time must not depend on how busy the machine is)")
    ap.add_argument("--tune-malloc", action="store_true", help="glibc: no heap trimming (see BENCHMARKS.md)")
    a = ap.parse_args(argv)
    tuned = tune_malloc() if a.tune_malloc else False  # relicv2.memory.tune_malloc, what `fit` does on the CPU
    threads = [int(t) for t in a.threads.split(",")] if a.threads else [1 if a.quick else torch.get_num_threads()]
    repeats = a.repeats or (3 if a.quick else 7)
    n_base = min(a.batch_size, 32) if a.quick else a.batch_size  # images per baseline repeat
    device = torch.device(a.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    gen = ViewGenerator(n_large=a.n_large, n_small=a.n_small, large_size=a.large_size, small_size=a.small_size,
                        mask_prob=a.mask_prob)
    pipes = torchvision_pipelines(gen)
    images, masks = make_batch(a.batch_size, a.image_size)
    d_images, d_masks = images.to(device), masks.to(device)
    views_per_image = a.n_large + a.n_small
    print(f"# views benchmark: batch {a.batch_size} x {a.image_size} px, {a.n_large} large @ {a.large_size} px + "
          f"{a.n_small} small @ {a.small_size} px, mask_prob {a.mask_prob}, device {device}, torch {torch.__version__}, "
          f"{platform.machine()}, {repeats} repeats, median" + (", quick" if a.quick else "") + (", tuned malloc" if tuned else ""))
    for t in threads:
        torch.set_num_threads(t)
        tb, tl = measure(gen, pipes, images, masks, d_images, d_masks, n_base, repeats, sync)
        vb, vl = views_per_image * a.batch_size / tb, views_per_image * n_base / tl
        print(f"threads={t} batched relicv2.views.ViewGenerator: {vb:.0f} views/s ({tb * 1e3:.1f} ms per batch of {a.batch_size})")
        print(f"threads={t} per-image torchvision.transforms.v2 loop: {vl:.0f} views/s ({tl * 1e3:.1f} ms per {n_base} images)")
        print(f"threads={t} speedup batched / per-image: {vb / vl:.1f}x")


if __name__ == "__main__":
    main()
