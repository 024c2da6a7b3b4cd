"""The benchmark scripts run (--quick, one thread) and print well-formed figures; their training step is fit's.
Nothing here asserts a speed: these tests only check that the scripts work and that their numbers are consistent."""
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when there is no CUDA device")
LINE = re.compile(r"([a-z][a-z0-9_]*): ((?:[a-z][a-z0-9_]*=\S+)(?: [a-z][a-z0-9_]*=\S+)*)")


def run(script, *args, timeout=150):
    "Run a benchmark script; return its stdout lines, checked: machine line first, then context or summary lines."
    out = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=timeout,
                         cwd=ROOT, env=ENV)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("# machine: ") and f"torch {torch.__version__}" in lines[0] and "threads 1" in lines[0], lines[0]
    return lines


def figures(lines) -> dict:
    "{figure: {key: float}} from the summary lines; every value must be a finite number."
    out = {}
    for line in lines:
        if line.startswith("#"): continue
        m = LINE.fullmatch(line)
        assert m, f"malformed summary line: {line!r}"
        values = dict(kv.split("=", 1) for kv in m[2].split())
        assert all(math.isfinite(float(v)) for v in values.values()), line
        assert m[1] not in out, f"figure {m[1]} printed twice"
        out[m[1]] = {k: float(v) for k, v in values.items()}
    return out


def positive(fig: dict, *suffixes):
    "Every value whose key ends with one of `suffixes` is > 0 (and there is at least one)."
    keys = [k for k in fig if k.endswith(suffixes)]
    assert keys and all(fig[k] > 0 for k in keys), fig


def test_e2e_quick():
    pytest.importorskip("lightly", reason="the e2e baseline is built with lightly (pip install lightly)")
    f = figures(run("e2e.py", "--quick", "--threads", "1", "--batch-size", "16"))
    assert set(f) == {"e2e_throughput", "e2e_step_breakdown"}
    t, b = f["e2e_throughput"], f["e2e_step_breakdown"]
    positive(t, "images_per_s")
    assert t["ratio"] == pytest.approx(t["relicv2_images_per_s"] / t["lightly_images_per_s"], rel=2e-3)
    assert (t["batch"], t["steps"], t["repeats"], t["workers"], t["threads"]) == (16, 2, 2, 1, 1)
    parts = [b[f"{k}_pct"] for k in ("data", "views", "forward", "loss", "backward", "optimizer", "ema")]
    assert all(p >= 0 for p in parts) and sum(parts) == pytest.approx(100, abs=0.05)
    assert b["loss_ema_pct"] == pytest.approx(b["loss_pct"] + b["ema_pct"], rel=1e-3, abs=1e-3)
    positive(b, "step_ms")


def test_flops_quick():
    f = figures(run("flops.py", "--quick", "--threads", "1", "--batch-size", "8", "--gemm-size", "512"))
    assert set(f) == {"gemm_peak", "encoder_utilisation"}
    g, e = f["gemm_peak"], f["encoder_utilisation"]
    assert g["n"] == 512 and g["gflops"] > 0
    positive(e, "gflops", "images_per_s", "pct_of_peak", "gflop_per_step")
    assert {"nchw_pct_of_peak", "channels_last_pct_of_peak"} <= set(e) and "compile_gflops" not in e  # compile is off unless asked
    for v in ("nchw", "channels_last"):
        assert e[f"{v}_pct_of_peak"] == pytest.approx(100 * e[f"{v}_gflops"] / g["gflops"], rel=2e-3)


def test_memory_quick():
    # a ResNet-50 step at 224 px on one thread: 53 s alone here, over 150 s with two training runs sharing the cores
    f = figures(run("memory.py", "--quick", "--threads", "1", "--demo-batches", "4,8", timeout=600))
    assert set(f) == {"memory_demo", "memory_paper"}
    assert (f["memory_demo"]["batch"], f["memory_paper"]["batch"]) == (8, 3)
    for m in f.values():
        positive(m, "_mib")
        assert m["peak_mib"] > m["before_mib"] and m["step_mib"] == pytest.approx(m["peak_mib"] - m["before_mib"], abs=1)
        assert m["step_mib_per_image"] == pytest.approx(m["step_mib"] / m["batch"], rel=2e-3)
    assert f["memory_paper"]["step_mib_per_image"] > f["memory_demo"]["step_mib_per_image"]  # ResNet-50 at 224 px vs a 0.25-wide ResNet-18 at 32 px


def test_scaling_quick():
    f = figures(run("scaling.py", "--quick", "--threads", "1"))
    assert set(f) == {"scaling_processes", "scaling_batch", "scaling_views"}
    p, b, v = f["scaling_processes"], f["scaling_batch"], f["scaling_views"]
    positive(p, "images_per_s")
    assert p["speedup"] == pytest.approx(p["w2_images_per_s"] / p["w1_images_per_s"], rel=2e-3)
    assert p["efficiency"] == pytest.approx(p["speedup"] / 2, rel=2e-3)
    assert {"b8_step_ms", "b16_step_ms", "fixed_ms", "ms_per_image"} <= set(b) and b["b8_step_ms"] > 0 and b["b16_step_ms"] > 0
    assert b["fixed_ms"] + 16 * b["ms_per_image"] == pytest.approx(b["b16_step_ms"], rel=1e-2)  # two points: the line passes through both
    assert set(v) == {"l2s0_step_ms", "l2s1_step_ms", "batch"} and v["l2s0_step_ms"] > 0  # two settings: no 3-term fit


@NO_CUDA
def test_cuda_without_a_gpu_fails_clearly():
    out = subprocess.run([sys.executable, str(BENCH / "flops.py"), "--quick", "--device", "cuda"], capture_output=True,
                         text=True, timeout=120, cwd=ROOT, env=ENV)
    assert out.returncode != 0 and "flops.py: --device cuda was asked for, but torch sees no CUDA device" in out.stderr
    out = subprocess.run(["bash", str(BENCH / "gpu_check.sh")], capture_output=True, text=True, timeout=120, cwd=ROOT, env=ENV)
    assert out.returncode == 1 and "gpu_check.sh: needs a CUDA device" in out.stderr and out.stdout == ""


def test_benchmark_step_is_fits_step(tmp_path):
    "The step the benchmarks time (_common.ReLICv2Step) gives the loss of fit's first step, from the same seed and data."
    sys.path.insert(0, str(BENCH))
    try: import _common as C
    finally: sys.path.remove(str(BENCH))
    from relicv2 import data as rdata
    from relicv2.config import preset, update
    from relicv2.train import MetricsLog, fit, seed_everything
    cfg = update(preset("tiny"), {"train.out_dir": str(tmp_path), "train.device": "cpu", "train.log_every": 1})
    fit(cfg, max_steps=1, progress=False)
    want = next(r for r in MetricsLog.read(tmp_path / "metrics.jsonl") if "loss" in r)["loss"]
    seed_everything(cfg.train.seed)  # what fit does before building data and networks
    dataset = rdata.from_config(cfg.data, "train")
    step = C.ReLICv2Step(cfg, torch.device("cpu"))
    batch = next(iter(C.relicv2_loader(dataset, cfg.train.batch_size, seed=cfg.train.seed)))
    assert step(batch) == pytest.approx(want, rel=1e-6)
    assert C.parse_summary("# context\nfig: a=1 b=2.5e-03\n") == {"fig": {"a": 1.0, "b": 0.0025}}
    with pytest.raises(ValueError, match="malformed summary line"): C.parse_summary("fig: a=1 b\n")


def test_gpu_check_dry_run_runs_the_whole_sequence_on_the_cpu():
    "`gpu_check.sh --dry-run`: every command of the GPU check, on the CPU at tiny sizes (about a minute of one core)."
    out = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--dry-run"], capture_output=True, text=True, timeout=900,
                         cwd=ROOT, env=ENV)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert text.startswith("# gpu_check.sh --dry-run: every step below on the CPU"), text[:200]
    for line in ("tiny (bf16, channels_last): ", "resnet50 224px 4+2 views (bf16, channels_last): ",
                 "memory_estimate paper-1gpu (1 process(es)", "memory_estimate paper-8gpu (8 process(es)", "memory_paper: ",
                 "memory_demo: ", "gemm_peak: ", "encoder_utilisation: ", "scaling_processes: ", "scaling_batch: "):
        assert line in text, f"{line!r} missing from:\n{text}"
    assert text.count("  fits") == 2 and "the largest batch a process that fits is" in text  # paper-1gpu/8gpu fit, paper not
    lightly = subprocess.run([sys.executable, "-c", "import lightly"], capture_output=True).returncode == 0
    assert ("e2e_throughput: " in text) == lightly
    figures([l for l in text.splitlines() if LINE.fullmatch(l) or l.startswith("#")])  # the benchmarks' figures are well formed
