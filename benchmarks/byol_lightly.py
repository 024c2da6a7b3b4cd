"""Accuracy reference for relicv2's BYOL (`loss.objective=byol`): BYOL built from lightly's blocks, evaluated as relicv2 does.

What is the same as a relicv2 run of the same config (`--preset` and `--set`, as `relicv2-train` takes them):
- the backbone: `relicv2.encoder.resnet` with the config's `encoder` section, drawn from the same seed, so that it
  starts from the very weights `fit` starts from (and the `random-init` baseline of `relicv2-ablate` is shared);
- the training images: `relicv2.train.training_set` (Fashion-MNIST: the 50000 images of `train`, `val` held out);
- the views budget: the config's L large and S small views (`views.n_large`, `n_small`, sizes, scales, BYOL's two
  augmentation pipelines alternating), made per image with torchvision.transforms.v2 in the DataLoader
  (`e2e.PerImageViews`: the same ops and probabilities as `benchmarks/views.py`'s baseline), not by relicv2's views;
- the view pairs: every other view's prediction regresses each large view's target projection (with L = 2, S = 0
  this is BYOL's symmetrised loss); the loss of a pair is 2 - 2 cos = 2 + 2 * lightly's `NegativeCosineSimilarity`;
- batch, epochs (so the number of steps), seed, precision, and every optimiser setting: `optim.optimizer` (lars:
  lightly's LARS), `base_lr` (scaled by batch / 256), `weight_decay`, `momentum`, `trust_coefficient`, the warm-up
  share then cosine (lightly's `cosine_schedule`; the same rates as `relicv2.optim.lr_schedule`), and
  `excluded_lr_scale` for the parameters lightly's `get_weight_decay_parameters` leaves undecayed (biases, norms);
- the target: momentum copies of backbone and projection head (`deactivate_requires_grad`), updated by lightly's
  `update_momentum` at the start of each step with `cosine_schedule(step, steps, target.tau_base, 1)`;
- the evaluation: `relicv2.evaluate.evaluate_from_config(backbone, cfg, splits=('val',))`, the config's linear probe
  and kNN on the validation split (never a test split).

What is lightly's (the candidates when the two disagree): its heads (`BYOLProjectionHead`, `BYOLPredictionHead`:
first linear without bias, last with one), its LARS (trust ratio eta |w| / (|g| + wd |w|), parameters without weight
decay not adapted), its momentum update and schedule, one forward pass per view (`--forward per-size`: one per view
size, as relicv2), and `--loss-reduction`: `mean` over the view pairs (relicv2's scale, the default, so that a base
learning rate means the same step for the parameters LARS does not adapt) or `sum` (BYOL's, lightly's and
solo-learn's code: a number of pairs times larger gradient).

Usage: python benchmarks/byol_lightly.py --preset fashion-mnist --out runs/byol_lightly/fm.json [--set section.field=value]...
       [--max-steps N] [--workers N] [--device cpu|cuda] [--threads N] [--quick]
Prints the machine line, `#` progress lines, then `byol_lightly: ...`; writes the JSON result to --out (atomically).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import sys
import time
from contextlib import nullcontext
from datetime import datetime, timezone

import torch
from torch import nn

import _common as C

try:
    import lightly
    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
    from lightly.models.utils import deactivate_requires_grad, get_weight_decay_parameters, update_momentum
    from lightly.utils.lars import LARS
    from lightly.utils.scheduler import cosine_schedule
except ImportError as e:  # lightly is the reference, not a dependency of relicv2
    raise SystemExit(f"byol_lightly.py: the reference needs lightly ({e}); install it with: pip install lightly") from None

from relicv2.checkpoint import seed_everything
from relicv2.config import load_config, parse_set, to_dict, update
from relicv2.files import ConfigError
from relicv2.data import dataset_splits
from relicv2.distributed import DistEnv
from relicv2.encoder import resnet
from relicv2.evaluate import evaluate_from_config
from relicv2.files import atomic_write
from relicv2.memory import tune_malloc
from relicv2.train import training_set
from relicv2.views import ViewGenerator
from e2e import PerImageViews  # benchmarks/e2e.py: the per-image torchvision views of the conventional pipeline

SPLIT = "val"  # the only split read: recipes are compared on validation data, never on a test split
LOSS_REDUCTIONS = ("mean", "sum")  # over the view pairs: relicv2's scale, or BYOL's / lightly's / solo-learn's
FORWARDS = ("per-view", "per-size")  # one pass per view (lightly's examples, BYOL's code), or per view size (relicv2)
QUICK = {  # --quick: seconds on one thread; generated 16 px images (the `spurious` benchmark has a `val` split)
    "data.dataset": "spurious", "data.synthetic_size": 16, "data.image_size": 16, "data.synthetic_train": 64,
    "views.n_large": 2, "views.n_small": 1, "views.large_size": 16, "views.small_size": 8,
    "encoder.width": 0.0625, "heads.projector_hidden": 32, "heads.projector_out": 16, "heads.predictor_hidden": 32,
    "train.batch_size": 16, "train.epochs": 1, "train.log_every": 1, "eval.linear_epochs": 2, "eval.knn_k": 5,
}


# ---------------------------------------------------------------- the model: relicv2's backbone, lightly's heads
class BYOL(nn.Module):
    "Backbone + lightly's projection and prediction heads; the momentum copies of backbone and projection head."
    def __init__(self, backbone: nn.Module, feat_dim: int, projector_hidden: int, projector_out: int, predictor_hidden: int):
        super().__init__()
        self.backbone = backbone
        self.projection_head = BYOLProjectionHead(feat_dim, projector_hidden, projector_out)
        self.prediction_head = BYOLPredictionHead(projector_out, predictor_hidden, projector_out)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)

    def forward(self, x): return self.prediction_head(self.projection_head(self.backbone(x)))

    @torch.no_grad()
    def forward_momentum(self, x): return self.projection_head_momentum(self.backbone_momentum(x))

    def update_momentum(self, m: float) -> None:
        update_momentum(self.backbone, self.backbone_momentum, m=m)
        update_momentum(self.projection_head, self.projection_head_momentum, m=m)


def build_model(cfg) -> BYOL:
    "The model of a run of `cfg`; its backbone is drawn first after seeding, as `fit` draws its encoder."
    seed_everything(cfg.train.seed)
    backbone = resnet(**dataclasses.asdict(cfg.encoder))
    h = cfg.heads
    return BYOL(backbone, backbone.feat_dim, h.projector_hidden, h.projector_out, h.predictor_hidden)


# ---------------------------------------------------------------- the loss over the view pairs
def view_pairs(n_large: int, n_small: int) -> list[tuple[int, int]]:
    "(online view, target view): each large view's target against every other view's prediction."
    return [(i, j) for j in range(n_large) for i in range(n_large + n_small) if i != j]


def byol_loss(predictions: list, projections: list, n_large: int, reduction: str = "mean") -> torch.Tensor:
    "2 - 2 cos(p_i, z_j) over the view pairs, by lightly's `NegativeCosineSimilarity`; mean or sum over the pairs."
    if reduction not in LOSS_REDUCTIONS: raise ValueError(f"reduction must be one of {', '.join(LOSS_REDUCTIONS)}, got {reduction!r}")
    pairs = view_pairs(n_large, len(predictions) - n_large)
    if not pairs: raise ValueError("no view pairs: give at least 2 large views, or 1 large and 1 small")
    criterion = NegativeCosineSimilarity()
    total = sum(2 + 2 * criterion(predictions[i].float(), projections[j].float()) for i, j in pairs)
    return total / len(pairs) if reduction == "mean" else total


def forward_views(fn, views: list, mode: str) -> list:
    "`[fn(v) for v in views]`, or with one call of `fn` per view size (`per-size`: BN statistics over those views together)."
    if mode == "per-view": return [fn(v) for v in views]
    out, by_size = [None] * len(views), {}
    for i, v in enumerate(views): by_size.setdefault(tuple(v.shape[1:]), []).append(i)
    for idx in by_size.values():
        for i, y in zip(idx, fn(torch.cat([views[i] for i in idx])).split([len(views[i]) for i in idx])): out[i] = y
    return out


# ---------------------------------------------------------------- optimiser and schedules
def make_optimizer(model: BYOL, optim_cfg) -> torch.optim.Optimizer:
    "The config's optimiser over lightly's two groups: decayed weights, and biases and norms (no decay, lr x excluded_lr_scale)."
    o = optim_cfg
    decayed, undecayed = get_weight_decay_parameters([model.backbone, model.projection_head, model.prediction_head])
    groups = [{"params": decayed, "weight_decay": o.weight_decay, "lr_scale": 1.0},
              {"params": undecayed, "weight_decay": 0.0, "lr_scale": o.excluded_lr_scale}]
    if o.optimizer == "lars": return LARS(groups, lr=0.0, momentum=o.momentum, trust_coefficient=o.trust_coefficient)
    if o.optimizer == "sgd": return torch.optim.SGD(groups, lr=0.0, momentum=o.momentum)
    return torch.optim.AdamW(groups, lr=0.0, betas=(o.momentum, 0.999))


def learning_rate(step: int, total: int, optim_cfg, batch_size: int) -> float:
    "Linear warm-up over the config's share of the run to base_lr * batch / 256, then lightly's `cosine_schedule` to 0."
    peak, warmup = optim_cfg.base_lr * batch_size / 256, round(optim_cfg.warmup_fraction * total)
    if step < warmup: return peak * step / warmup
    return cosine_schedule(step - warmup, total - warmup, peak, 0.0)


# ---------------------------------------------------------------- the run
def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    C.add_common_args(ap, "seconds on one thread: generated 16 px images, a tiny network, 4 steps, no DataLoader worker")
    ap.add_argument("--preset", default="fashion-mnist", help="the relicv2 preset to mirror (default: fashion-mnist)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="config overrides, as relicv2-train's (e.g. target.tau_base=0.99 optim.base_lr=2.5)")
    ap.add_argument("--out", required=True, help="the JSON result file (written atomically)")
    ap.add_argument("--max-steps", type=int, default=None, help="stop after N steps; the schedules keep the config's length, as fit's max_steps")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers making the views (default: data.num_workers; quick: 0)")
    ap.add_argument("--loss-reduction", choices=LOSS_REDUCTIONS, default="mean",
                    help="over the view pairs: mean (relicv2's scale, default) or sum (BYOL's and lightly's code)")
    ap.add_argument("--forward", choices=FORWARDS, default="per-view",
                    help="per-view: one pass per view, as lightly's examples (default); per-size: one per view size, as relicv2")
    ap.add_argument("--log-every", type=int, default=None, help="steps between progress lines (default: train.log_every)")
    return ap.parse_args(argv)


def run_config(a):
    "The preset, then --quick's sizes, then --set; BYOL whatever the preset's objective."
    try:
        cfg = load_config(a.preset, None, {**(QUICK if a.quick else {}), "loss.objective": "byol"})
        if a.overrides: cfg = update(cfg, parse_set(a.overrides))
    except ConfigError as e: raise SystemExit(f"byol_lightly.py: {e}") from None
    if cfg.loss.objective != "byol": raise SystemExit(f"byol_lightly.py: trains BYOL; drop the loss.objective={cfg.loss.objective} override")
    if cfg.optim.optimizer == "lars" and cfg.optim.weight_decay == 0:  # lightly's LARS adapts the parameters that have weight decay
        raise SystemExit("byol_lightly.py: optim.weight_decay=0 with optim.optimizer=lars: lightly's LARS would adapt no parameter; "
                         "use a weight decay > 0")
    if cfg.train.precision == "fp16": raise SystemExit("byol_lightly.py: train.precision must be fp32 or bf16, got 'fp16'")
    if SPLIT not in dataset_splits(cfg.data.dataset):
        raise SystemExit(f"byol_lightly.py: data.dataset {cfg.data.dataset!r} has no {SPLIT!r} split (it has "
                         f"{', '.join(dataset_splits(cfg.data.dataset))}); this reference reads the validation split only")
    return cfg


def main(argv=None) -> int:
    a = parse_args(argv)
    device, threads = C.setup(a, "byol_lightly.py")
    cfg = run_config(a)
    if a.max_steps is not None and a.max_steps < 1: raise SystemExit(f"byol_lightly.py: --max-steps must be >= 1, got {a.max_steps}")
    workers = a.workers if a.workers is not None else (0 if a.quick else cfg.data.num_workers)
    if workers < 0: raise SystemExit(f"byol_lightly.py: --workers must be >= 0, got {workers}")
    tc, v, e = cfg.train, cfg.views, cfg.encoder
    if tc.tune_malloc and device.type == "cpu": tune_malloc()  # as fit (process-wide; forked workers inherit it)
    C.header(device, threads)
    C.note(f"byol_lightly: preset {a.preset}{' (quick)' if a.quick else ''}, {cfg.data.dataset}, {e.arch} x{e.width:g}, "
           f"{v.n_large} large @ {v.large_size} + {v.n_small} small @ {v.small_size}, batch {tc.batch_size}, "
           f"tau_base {cfg.target.tau_base}, {cfg.optim.optimizer} base_lr {cfg.optim.base_lr}, loss {a.loss_reduction} over "
           f"{len(view_pairs(v.n_large, v.n_small))} pairs, forward {a.forward}, {workers} workers, lightly {lightly.__version__}")

    # ---------------- data, model, optimiser: seeded as fit is (dataset on a fork of the RNG, backbone drawn first)
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=device)
    seed_everything(tc.seed)
    dataset, _, _ = training_set(cfg, env, progress=False)
    steps_per_epoch = len(dataset) // tc.batch_size
    if steps_per_epoch == 0: raise SystemExit(f"byol_lightly.py: {len(dataset)} training images, fewer than train.batch_size={tc.batch_size}")
    total = tc.epochs * steps_per_epoch
    end = total if a.max_steps is None else min(total, a.max_steps)
    model = build_model(cfg).to(device).train()
    optimizer = make_optimizer(model, cfg.optim)
    loader = torch.utils.data.DataLoader(PerImageViews(dataset, ViewGenerator(v)), batch_size=tc.batch_size,
                                         shuffle=True, drop_last=True, num_workers=workers, pin_memory=device.type == "cuda",
                                         generator=torch.Generator().manual_seed(tc.seed))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if tc.precision == "bf16" else nullcontext()
    log_every = a.log_every or tc.log_every
    sync = C.make_sync(device)

    # ---------------- training: momentum update, forward, loss, backward, step
    step, trace, loss_value, t0, c0 = 0, [], float("nan"), time.perf_counter(), time.process_time()
    while step < end:
        for views in loader:
            views = [x.to(device, non_blocking=True) for x in views]
            lr = learning_rate(step, total, cfg.optim, tc.batch_size)
            for g in optimizer.param_groups: g["lr"] = lr * g["lr_scale"]
            model.update_momentum(cosine_schedule(step, total, cfg.target.tau_base, 1.0))  # lightly: before the forward pass
            with autocast:
                predictions = forward_views(model, views, a.forward)
                projections = forward_views(model.forward_momentum, views[:v.n_large], a.forward)
            loss = byol_loss(predictions, projections, v.n_large, a.loss_reduction)
            if not torch.isfinite(loss): raise SystemExit(f"byol_lightly.py: the loss became {loss.item()} at step {step}; no result written")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            loss_value = loss.item()
            if step % log_every == 0 or step == end:
                trace.append([step, loss_value])
                sync()
                C.note(f"step {step}/{end} loss {loss_value:.4f} lr {lr:.4g} "
                       f"images/s {step * tc.batch_size / (time.perf_counter() - t0):.1f}")
            if step >= end: break
    sync()
    train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - c0  # CPU time: this process's (not its workers')

    # ---------------- evaluation: relicv2's, on the online backbone, validation split only
    t1 = time.perf_counter()
    results = evaluate_from_config(model.backbone, cfg, splits=(SPLIT,), device=device)
    eval_s = time.perf_counter() - t1
    r = results[SPLIT]

    import torchvision
    record = {
        "what": "BYOL from lightly's blocks on relicv2's backbone, data, views budget and evaluation (benchmarks/byol_lightly.py)",
        "split": SPLIT, "results": results, "linear_top1": r["linear_top1"], "knn_top1": r["knn_top1"],
        "steps": step, "schedule_steps": total, "images_seen": step * tc.batch_size, "final_loss": loss_value, "loss_trace": trace,
        "train_s": train_s, "train_cpu_s": train_cpu_s, "eval_s": eval_s, "wall_s": train_s + eval_s, "images_per_s": step * tc.batch_size / train_s,
        "loss_reduction": a.loss_reduction, "view_pairs": view_pairs(v.n_large, v.n_small), "forward": a.forward,
        "machine": C.cpu_model(), "cpus": os.cpu_count(), "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None, "threads": threads, "workers": workers,
        "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
        "lightly": lightly.__version__, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": ["benchmarks/byol_lightly.py", *(sys.argv[1:] if argv is None else argv)],
        "preset": a.preset, "quick": a.quick, "overrides": a.overrides, "seed": tc.seed, "config": to_dict(cfg),
    }
    atomic_write(a.out, json.dumps(record, indent=2) + "\n")
    C.summary("byol_lightly", linear_top1=r["linear_top1"], knn_top1=r["knn_top1"], steps=step, train_s=train_s, train_cpu_s=train_cpu_s, eval_s=eval_s,
              images_per_s=record["images_per_s"], threads=threads)
    C.note(f"result written to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
