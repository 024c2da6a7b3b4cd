"""benchmarks/byol_lightly.py, the lightly BYOL reference: it runs (--quick, one thread) and writes its result; it mirrors
a relicv2 run where it says it does (initial backbone, learning rates, loss over the view pairs); it refuses a config
it cannot compare on the validation split."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightly")  # the reference's dependency (settings.ini's bench_requirements), not relicv2's

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
sys.path.insert(0, str(BENCH))
import byol_lightly as B  # noqa: E402  (benchmarks/ is not a package)

from relicv2.config import load_config, update  # noqa: E402
from relicv2.evaluate import initial_encoder  # noqa: E402
from relicv2.loss import ReLICv2Loss  # noqa: E402
from relicv2.optim import lr_schedule_from_config  # noqa: E402


def quick(out: Path, *args) -> dict:
    "Run the script with --quick on one thread; return its JSON result."
    p = subprocess.run([sys.executable, str(BENCH / "byol_lightly.py"), "--quick", "--threads", "1", "--out", str(out), *args],
                       capture_output=True, text=True, timeout=300, cwd=ROOT, env=ENV)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.startswith("# machine: ") and "\nbyol_lightly: linear_top1=" in p.stdout, p.stdout
    return json.loads(out.read_text())


def test_quick_run_writes_its_result_and_repeats_it(tmp_path):
    r = quick(tmp_path / "a.json", "--set", "target.tau_base=0.99", "--set", "optim.base_lr=2.5")
    val = r["results"]["val"]
    assert set(r["results"]) == {"val"} and r["split"] == "val"  # the validation split only, never a test split
    assert r["linear_top1"] == val["linear_top1"] and r["knn_top1"] == val["knn_top1"]
    assert all(0 <= val[k] <= 100 for k in ("linear_top1", "knn_top1"))
    assert r["steps"] == r["schedule_steps"] == 4 and r["images_seen"] == 64 and len(r["loss_trace"]) == 4
    assert all(r[k] > 0 for k in ("train_s", "eval_s", "wall_s", "images_per_s")) and r["threads"] == 1
    assert r["machine"] and r["torch"] == torch.__version__ and r["lightly"] == __import__("lightly").__version__
    assert r["config"]["target"]["tau_base"] == 0.99 and r["config"]["optim"]["base_lr"] == 2.5  # --set reached the run
    assert r["config"]["loss"]["objective"] == "byol" and r["config"]["data"]["dataset"] == "spurious"
    assert r["view_pairs"] == [[1, 0], [2, 0], [0, 1], [2, 1]] and r["loss_reduction"] == "mean"
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically: no temporary left behind
    again = quick(tmp_path / "b.json", "--set", "target.tau_base=0.99", "--set", "optim.base_lr=2.5")
    assert again["loss_trace"] == r["loss_trace"] and again["results"] == r["results"]  # seeded: the same numbers


def test_backbone_starts_from_the_weights_fit_starts_from():
    cfg = load_config("tiny")
    ours, fits = B.build_model(cfg).backbone.state_dict(), initial_encoder(cfg).state_dict()
    assert ours.keys() == fits.keys() and all(torch.equal(ours[k], fits[k]) for k in ours)


@pytest.mark.parametrize("warmup", [0.0, 0.1, 0.5])
def test_learning_rates_are_relicv2s(warmup):
    o = update(load_config("fashion-mnist"), {"optim.warmup_fraction": warmup}).optim
    theirs = lr_schedule_from_config(o, 256, 195, 3)
    ours = torch.tensor([B.learning_rate(k, 585, o, 256) for k in range(585)], dtype=torch.float64)
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("n_large,n_small", [(2, 0), (2, 2), (3, 1)])
def test_loss_is_relicv2s_byol_loss_over_the_same_pairs(n_large, n_small):
    g = torch.Generator().manual_seed(0)
    p = [torch.randn(8, 5, generator=g) for _ in range(n_large + n_small)]
    z = [torch.randn(8, 5, generator=g) for _ in range(n_large)]
    theirs, _ = ReLICv2Loss(objective="byol")(p[:n_large], p[n_large:], z)
    torch.testing.assert_close(B.byol_loss(p, z, n_large, "mean"), theirs)
    n_pairs = (n_large + n_small) * n_large - n_large
    torch.testing.assert_close(B.byol_loss(p, z, n_large, "sum"), theirs * n_pairs)


def test_per_size_forward_is_per_view_forward_without_batch_statistics():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    views = [torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8), torch.rand(2, 3, 5, 5)]
    for a, b in zip(B.forward_views(net, views, "per-size"), B.forward_views(net, views, "per-view")):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("args,message", [
    (["--set", "data.dataset=synthetic"], "has no 'val' split"),
    (["--set", "loss.objective=relicv2"], "trains BYOL"),
    (["--set", "optim.weight_decay=0"], "lightly's LARS would adapt no parameter"),
])
def test_refuses_what_it_cannot_compare(tmp_path, args, message):
    with pytest.raises((SystemExit, ValueError), match=message):
        B.main(["--quick", "--threads", "1", "--out", str(tmp_path / "r.json"), *args])
    assert not (tmp_path / "r.json").exists()
