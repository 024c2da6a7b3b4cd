"""The numbers a restructuring must not change: the first 20 losses of the `tiny` and `demo` presets and the views of a
fixed batch, against references recorded before it. `python tests/test_numerics.py --record` adds this machine's.

Floating-point results depend on the CPU's instruction set and the thread count, so a reference is kept per
(instruction set, threads, torch version): where this machine's is recorded the check is bit for bit; elsewhere it is
against every recorded one at a tolerance. Training amplifies rounding differences: between 1 and 2 threads here the
losses differ by under 1e-6 (relative) at the first steps, 5e-5 at step 9 and up to 6e-3 by step 20, so the tolerant
check takes the first 8 losses at 2e-4, and the views (equal bit for bit across thread counts) at 1e-5."""
import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

from relicv2.config import preset, update
from relicv2.data import from_config
from relicv2.train import fit
from relicv2.views import ViewGenerator

REF = Path(__file__).with_name("data") / "numerics.json"
STEPS = 20


def signature() -> str:
    return f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads, torch {torch.__version__.split('+')[0]}"


def first_losses(name: str, out: Path) -> list[float]:
    cfg = update(preset(name), {"train.out_dir": str(out / name), "train.log_every": 1, "train.monitor_steps": 0, "train.device": "cpu"})
    if name == "tiny": cfg = update(cfg, {"train.epochs": STEPS // 4})  # 64 images at batch 16: 4 steps an epoch
    fit(cfg, max_steps=STEPS, progress=False)
    rows = [json.loads(l) for l in (out / name / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r][:STEPS]


def fixed_views() -> dict:
    cfg = preset("demo")
    ds = from_config(cfg.data, "train", masks=False)
    images = torch.stack([ds[i][0] for i in range(8)])
    views = ViewGenerator(cfg.views)(images, generator=torch.Generator().manual_seed(0))
    tensors = [*views.large, *views.small]
    sha = hashlib.sha256(b"".join(t.contiguous().numpy().tobytes() for t in tensors)).hexdigest()
    stats = [[float(t.mean()), float(t.std()), float(t[:, :, ::7, ::7].sum())] for t in tensors]
    return dict(sha256=sha, stats=stats)


def measure(out: Path) -> dict:
    return dict(tiny=first_losses("tiny", out), demo=first_losses("demo", out), views=fixed_views())


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    return measure(tmp_path_factory.mktemp("numerics"))


def references() -> dict:
    return json.loads(REF.read_text()) if REF.is_file() else {}


def test_a_reference_is_recorded():
    assert references(), f"no reference in {REF}: run `python tests/test_numerics.py --record` before changing the code"


@pytest.mark.parametrize("name", ["tiny", "demo"])
def test_the_first_losses_are_unchanged(measured, name):
    refs = references()
    if signature() in refs:
        assert measured[name] == refs[signature()][name], f"{name}: first {STEPS} losses differ from this machine's reference"
    else:
        for sig, ref in refs.items():
            torch.testing.assert_close(torch.tensor(measured[name][:8]), torch.tensor(ref[name][:8]), rtol=2e-4, atol=0,
                                       msg=lambda m: f"{name} vs {sig}: {m}")


def test_the_views_of_a_fixed_batch_are_unchanged(measured):
    refs = references()
    if signature() in refs:
        assert measured["views"]["sha256"] == refs[signature()]["views"]["sha256"]
    for sig, ref in refs.items():
        torch.testing.assert_close(torch.tensor(measured["views"]["stats"]), torch.tensor(ref["views"]["stats"]), rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"view statistics vs {sig}: {m}")


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        refs = {**references(), signature(): measure(Path(d))}
    REF.parent.mkdir(exist_ok=True)
    REF.write_text(json.dumps(refs, indent=1) + "\n")
    print(f"recorded {signature()} in {REF}")
