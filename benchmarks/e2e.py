"""End-to-end training throughput: relicv2's loop (batched views on the device) vs the conventional lightly pipeline.

Both sides train the same backbone (`relicv2.encoder.resnet` with the preset's architecture) on the same synthetic
uint8 images, with the same image size, views (L large + S small, BYOL's augmentations), batch, objective (the ReLICv2
loss, so that only the pipeline differs) and EMA target; images/s count data loading, views, forward, backward,
optimiser and EMA.

- relicv2: what `relicv2.train.fit` runs (`_common.ReLICv2Step`): a DataLoader of uint8 images and masks (no workers),
  `ViewGenerator` on the whole batch on the training device, one online pass per view size, the target pass, the loss,
  LARS, `update_target`.
- conventional: the pipeline users build with lightly: a Dataset applying torchvision.transforms.v2 per image in
  DataLoader workers (the same ops and probabilities as `benchmarks/views.py`'s baseline: RandomResizedCrop, flip,
  colour jitter, grayscale, blur, solarize, background removal with p_m), lightly's `BYOLProjectionHead` and
  `BYOLPredictionHead`, a momentum copy made with `deactivate_requires_grad`, `update_momentum` with
  `cosine_schedule`, one forward per view (as lightly's examples), lightly's LARS.

The two sides alternate, repeat by repeat, in one process; each repeat is a fresh pass over the data (workers
started in its untimed warm-up, stopped at its end, so they never run while the other side is timed); the figure is
the median. On the CPU, `fit` tunes glibc's allocator (`relicv2.memory.tune_malloc`); the setting is process-wide, so
both sides get it here (`--set train.tune_malloc=false` measures both without). A last, separately timed relicv2 run
times each part of a step with device synchronisation: the share of the loss (its forward; its backward is inside
`backward`) and of the EMA update.

Usage: python benchmarks/e2e.py [--quick] [--threads N] [--device cpu|cuda] [--preset demo] [--set section.field=value]...
Prints the machine line, then `e2e_throughput: ...` and `e2e_step_breakdown: ...`.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
from torch import nn

import _common as C

try:
    from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.utils.lars import LARS as LightlyLARS
    from lightly.utils.scheduler import cosine_schedule
except ImportError as e:  # lightly is the baseline, not a dependency of relicv2
    raise SystemExit(f"e2e.py: the baseline needs lightly ({e}); install it with: pip install lightly") from None

from relicv2.encoder import resnet
from relicv2.loss import ReLICv2Loss
from relicv2.views import ViewGenerator
from views import torchvision_pipelines  # benchmarks/views.py: the per-image torchvision pipelines


# ---------------------------------------------------------------- the conventional pipeline
class PerImageViews(torch.utils.data.Dataset):
    "Each item: the L large then S small views of one image, made with torchvision.transforms.v2 (in a DataLoader worker)."
    def __init__(self, base, gen: ViewGenerator):
        self.base, self.gen, self.pipes = base, gen, torchvision_pipelines(gen)

    def __len__(self): return len(self.base)

    def __getitem__(self, i):
        image, mask, _ = self.base[i]
        g, x = self.gen, image.float().div_(255)  # float pipelines: faster than uint8 ones here (see BENCHMARKS.md)
        usable = mask is not None and mask.float().mean() >= g.min_mask_coverage
        large = [self.pipes[("large", k % 2)](x * mask if usable and torch.rand(()) < g.mask_prob else x) for k in range(g.n_large)]
        small = [self.pipes[("small", k % 2)](x) for k in range(g.n_small)]
        return large + small


class LightlyBYOL(nn.Module):
    "Backbone + lightly's BYOL heads, and the momentum copies of backbone and projection head."
    def __init__(self, backbone: nn.Module, feat_dim: int, hidden: int, out: int, predictor_hidden: int):
        super().__init__()
        self.backbone = backbone
        self.projection_head = BYOLProjectionHead(feat_dim, hidden, out)
        self.prediction_head = BYOLPredictionHead(out, predictor_hidden, out)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)

    def forward(self, x): return self.prediction_head(self.projection_head(self.backbone(x)))

    def forward_momentum(self, x): return self.projection_head_momentum(self.backbone_momentum(x)).detach()


class LightlyStep:
    "One training step of the lightly pipeline on a list of L + S view batches (CPU tensors from the workers)."
    def __init__(self, cfg, device: torch.device, total_steps: int = 1000):
        e, h = cfg.encoder, cfg.heads
        backbone = resnet(e.arch, e.width, e.small_stem, e.zero_init_residual, e.channels_last)
        self.model = LightlyBYOL(backbone, backbone.feat_dim, h.projector_hidden, h.projector_out, h.predictor_hidden).to(device).train()
        self.criterion = ReLICv2Loss(cfg.loss)  # the same objective on both sides
        self.optimizer = LightlyLARS([p for p in self.model.parameters() if p.requires_grad], lr=0.0, momentum=cfg.optim.momentum,
                                     weight_decay=cfg.optim.weight_decay, trust_coefficient=cfg.optim.trust_coefficient)
        self.lr = cfg.optim.base_lr * cfg.train.batch_size / 256
        self.device, self.L, self.total, self.tau_base, self.step = device, cfg.views.n_large, total_steps, cfg.target.tau_base, 0
        self.generator = torch.Generator(device=device).manual_seed(cfg.train.seed)

    def __call__(self, views: list[torch.Tensor]):
        views = [v.to(self.device, non_blocking=True) for v in views]
        for g in self.optimizer.param_groups: g["lr"] = self.lr * self.step / self.total  # inside the warm-up, as relicv2's side
        m = cosine_schedule(self.step, self.total, self.tau_base, 1.0)
        update_momentum(self.model.backbone, self.model.backbone_momentum, m=m)
        update_momentum(self.model.projection_head, self.model.projection_head_momentum, m=m)
        online = [self.model(v) for v in views]
        with torch.no_grad(): target = [self.model.forward_momentum(v) for v in views[:self.L]]
        loss, _ = self.criterion(online[:self.L], online[self.L:], target, generator=self.generator)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.step += 1


# ---------------------------------------------------------------- the benchmark
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    C.add_common_args(ap, "a short run (~20 s): batch 32, 2 repeats of 2 steps, 1 worker, 1 thread unless --threads is given")
    ap.add_argument("--preset", default="demo", help="sizes of backbone, views, heads and batch (default: demo)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the preset's (demo: 128; quick: 32)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per repeat (default 10, quick 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps at the start of each repeat (default 2, quick 1)")
    ap.add_argument("--repeats", type=int, default=None, help="repeats of each side, alternating (default 5, quick 2)")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers of the conventional pipeline (default: the "
                    "CPUs left by --threads, at least 1: more would fight the training threads for the cores; quick: 1); "
                    "relicv2's loader has none (data.num_workers=0)")
    ap.add_argument("--profile-steps", type=int, default=None, help="relicv2 steps timed part by part (default 5, quick 2)")
    a = ap.parse_args(argv)
    device, threads = C.setup(a, "e2e.py")
    steps, warmup = a.steps or (2 if a.quick else 10), a.warmup if a.warmup is not None else (1 if a.quick else 2)
    repeats, prof = a.repeats or (2 if a.quick else 5), a.profile_steps or (2 if a.quick else 5)
    workers = a.workers if a.workers is not None else (1 if a.quick else max(1, (os.cpu_count() or 1) - threads))
    cfg = C.bench_config(a.preset, a.overrides)
    B = a.batch_size or (min(cfg.train.batch_size, 32) if a.quick else cfg.train.batch_size)
    cfg = C.update(cfg, {"train.batch_size": B})
    if cfg.train.precision != "fp32": raise SystemExit("e2e.py: compares fp32 training; drop the train.precision override")
    if steps < 1 or repeats < 1 or warmup < 0 or workers < 0 or prof < 1:
        raise SystemExit("e2e.py: --steps, --repeats and --profile-steps must be >= 1, --warmup and --workers >= 0")
    sync, pin = C.make_sync(device), device.type == "cuda"
    v, e = cfg.views, cfg.encoder

    C.header(device, threads)
    fmt = "channels_last" if e.channels_last else "NCHW"
    C.note(f"e2e: preset {a.preset}, {e.arch} x{e.width:g}{' small stem' if e.small_stem else ''}, {fmt} (both sides), {cfg.data.image_size} px images, "
           f"{v.n_large} large @ {v.large_size} + {v.n_small} small @ {v.small_size}, batch {B}, {repeats} repeats x {steps} steps "
           f"(+{warmup} warm-up), median; conventional: {workers} DataLoader workers; lightly {__import__('lightly').__version__}"
           + (", quick" if a.quick else ""))
    # enough images for one pass of warm-up + timed steps + what the workers may have prefetched when it is cut
    n = (warmup + max(steps, prof) + 2 * max(workers, 1) + 1) * B
    base = C.synthetic_images(n, cfg.data.image_size, seed=cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    relic = C.ReLICv2Step(cfg, device)
    if relic.malloc_tuned:  # before the workers fork: they inherit it
        C.note("glibc malloc tuned as `fit` does on the CPU (relicv2.memory.tune_malloc); process-wide, so both sides and "
               "the conventional side's forked workers run with it (--set train.tune_malloc=false: neither does)")
    relic_loader = C.relicv2_loader(base, B, seed=cfg.train.seed, pin_memory=pin)
    relic_step = lambda batch: relic(batch.to(device, non_blocking=True))
    conv = LightlyStep(cfg, device)
    conv_loader = torch.utils.data.DataLoader(PerImageViews(base, ViewGenerator(v)), batch_size=B, shuffle=True,
                                              drop_last=True, num_workers=workers, pin_memory=pin, persistent_workers=False)
    t_relic, t_conv = [], []
    for _ in range(repeats):  # alternate, so that a change of machine load hits both sides
        t_relic.append(C.time_epoch(relic_loader, relic_step, warmup, steps, sync))
        t_conv.append(C.time_epoch(conv_loader, conv, warmup, steps, sync))
    ips_relic, ips_conv = B * steps / C.median(t_relic), B * steps / C.median(t_conv)
    C.summary("e2e_throughput", relicv2_images_per_s=ips_relic, lightly_images_per_s=ips_conv, ratio=ips_relic / ips_conv,
              batch=B, repeats=repeats, steps=steps, workers=workers, threads=threads)

    # ---------------- where a relicv2 step goes: each part synchronised and timed
    marks = C.Marks(sync)
    it = iter(relic_loader)
    relic_step(next(it))  # warm-up
    marks.reset()
    for _ in range(prof):
        batch = next(it).to(device, non_blocking=True); marks("data")
        relic(batch, marks)
    total = sum(marks.parts.values())
    pct = {f"{k}_pct": 100 * marks.parts.get(k, 0.0) / total for k in ("data",) + C.ReLICv2Step.PARTS}
    C.summary("e2e_step_breakdown", step_ms=1e3 * total / prof, **pct, loss_ema_pct=pct["loss_pct"] + pct["ema_pct"], steps=prof)
    return 0


if __name__ == "__main__":
    sys.exit(main())
