"""The evaluation suites of `eval.suites` (relicv2.robustness, low_label, transfer, dense) and `data.classes`:
entry points, determinism, and the properties a lesson page shows badly; tiny encoders, seconds each."""
import json

import pytest
import torch

from relicv2.config import preset, update
from relicv2.evaluate import baseline_encoder


def tiny(**overrides):
    "The tiny preset with the L-BFGS probe (the CPU presets' solver)."
    return update(preset("tiny"), {"eval.linear_solver": "lbfgs", **overrides})


def floats_only(res: dict, splits) -> bool:
    "Every metric of every split is a plain float, and the whole result is strict JSON."
    json.dumps(res, allow_nan=False)
    return all(type(v) is float for s in splits for v in res[s].values())


# ---------------- robustness ----------------

def test_corruptions_identity_at_severity_0_deterministic_and_seeded():
    from relicv2.robustness import CORRUPTIONS, SEVERITIES, corrupt
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 24, 24), dtype=torch.uint8, generator=g)
    for name in CORRUPTIONS:
        assert torch.equal(corrupt(x, name, 0), x), name
        for s in range(1, SEVERITIES + 1):
            y = corrupt(x, name, s)
            assert y.dtype == torch.uint8 and y.shape == x.shape and not torch.equal(y, x), (name, s)
            assert torch.equal(y, corrupt(x.clone(), name, s)), (name, s)  # the same pixels every time
    for name in ("gaussian_noise", "shot_noise", "impulse_noise", "motion_blur", "elastic"):  # the ones that draw
        assert not torch.equal(corrupt(x, name, 3, seed=0), corrupt(x, name, 3, seed=1)), name


def test_robustness_suite_is_deterministic_and_plain():
    from relicv2.robustness import CORRUPTIONS, SEVERITIES, robustness_suite
    cfg = tiny()
    runs = [robustness_suite(baseline_encoder("random-init", cfg), cfg, ("test_ood",), eval_images=40) for _ in range(2)]
    assert runs[0] == runs[1]
    r = runs[0]["test_ood"]
    assert set(r) == {"clean", "mean_corrupted", "relative_drop"} | {f"{n}_s{s}" for n in CORRUPTIONS for s in range(1, SEVERITIES + 1)}
    assert floats_only(runs[0], ("test_ood",)) and runs[0]["info"]["eval_images"] == {"test_ood": 40}
    assert r["mean_corrupted"] == pytest.approx(sum(v for k, v in r.items() if "_s" in k) / (len(CORRUPTIONS) * SEVERITIES))


# ---------------- data.classes ----------------

def test_data_classes_keeps_the_same_classes_in_every_split_relabelled():
    from relicv2.data import dataset_splits, from_config, item_labels
    cfg = tiny(**{"data.classes": "2,5-6"})
    whole = update(cfg, {"data.classes": None})
    for split in dataset_splits(cfg.data.dataset):
        kept, full = from_config(cfg.data, split, masks=False), from_config(whole.data, split, masks=False)
        old = item_labels(full)
        rows = torch.isin(old, torch.tensor([2, 5, 6])).nonzero()[:, 0]
        assert kept.classes == [full.classes[c] for c in (2, 5, 6)] and len(kept) == len(rows) > 0, split
        assert item_labels(kept).tolist() == [{2: 0, 5: 1, 6: 2}[int(c)] for c in old[rows]], split
        assert all(torch.equal(kept[i][0], full[int(r)][0]) for i, r in enumerate(rows[:20])), split  # the same images


def test_training_sees_data_classes(tmp_path):
    from relicv2.train import fit
    cfg = tiny(**{"data.classes": "0-4", "loss.objective": "supervised", "train.out_dir": str(tmp_path)})
    res = fit(cfg, max_steps=1, progress=False)
    assert res.online.classifier.out_features == 5  # the supervised head has the kept classes only


# ---------------- low_label ----------------

def test_low_label_probes_learn_from_balanced_labels_never_from_the_evaluation_images(monkeypatch):
    import relicv2.low_label as ll
    from relicv2.evaluate import PixelEncoder
    seen, fit = [], ll.fit_probe
    monkeypatch.setattr(ll, "fit_probe", lambda x, y, n, cfg: seen.append((x, y)) or fit(x, y, n, cfg))
    read, extract = [], ll.extract_features
    monkeypatch.setattr(ll, "extract_features", lambda *a, **k: read.append(extract(*a, **k)) or read[-1])
    cfg = tiny(**{"data.synthetic_train": 400})
    res = ll.low_label_suite(PixelEncoder(), cfg, ("test",), eval_images=100)  # raw pixels: a feature row is the image
    assert len(seen) == len(ll.FRACTIONS) * ll.DRAWS
    for (x, y), (f, d) in zip(seen, [(f, d) for f in ll.FRACTIONS for d in range(ll.DRAWS)]):
        per_class = max(1, round(f * 400 / 10))
        assert torch.bincount(y, minlength=10).tolist() == [per_class] * 10, (f, d)  # balanced
    test_rows = read[-1][0]
    for x, _ in seen: assert not (x[:, None] == test_rows[None]).all(-1).any()  # no labelled image is an evaluation image
    assert floats_only(res, ("test",))


# ---------------- transfer ----------------

def test_transfer_needs_data_classes_and_does_not_call_itself():
    from relicv2.transfer import run_suite
    cfg = tiny()
    with pytest.raises(ValueError, match="the transfer suite needs data.classes"): run_suite(baseline_encoder("raw-pixels", cfg), cfg, ("test",))
    cfg = tiny(**{"data.classes": "0-6", "eval.suites": "transfer,robustness"})  # the evaluation it calls runs no suite
    res = run_suite(baseline_encoder("raw-pixels", cfg), cfg, ("test",))
    assert res["info"]["classes"] == [7, 8, 9] and floats_only(res, ("test",)) and "knn_top5" not in res["test"]


# ---------------- dense ----------------

class PlantedEncoder(torch.nn.Module):
    "A stand-in whose layer4 map is the one-hot code of each pixel's grey level in steps of 20: the planted segmentation."
    def __init__(self):
        super().__init__()
        self.layer4 = torch.nn.Identity()

    def forward(self, x):
        code = torch.nn.functional.one_hot((x[:, 0] * 255 / 20).round().long().clamp(0, 10), 11).movedim(-1, 1).float()
        return self.layer4(code).mean((2, 3))


def planted(split: str, n: int = 300):
    "A dataset of the spurious benchmark's form whose object's grey level codes its class: 20 x (class + 1) on black."
    from relicv2.items import TensorImages
    g = torch.Generator().manual_seed(len(split))
    labels, masks = torch.arange(n) % 10, torch.zeros(n, 1, 24, 24, dtype=torch.uint8)
    for i, (r, c) in enumerate(torch.randint(0, 15, (n, 2), generator=g).tolist()): masks[i, 0, r:r + 9, c:c + 9] = 1
    images = (masks * (20 * (labels + 1))[:, None, None, None]).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return TensorImages(images, labels, masks, classes=[f"c{i}" for i in range(10)])


def test_dense_suite_recovers_a_planted_segmentation(monkeypatch):
    import relicv2.dense as dense
    monkeypatch.setattr(dense, "from_config", lambda data, split, masks=True, **kw: planted(split))
    cfg = update(preset("spurious"), {"eval.linear_solver": "lbfgs"})
    enc = PlantedEncoder().train()
    res = dense.dense_suite(enc, cfg, ("test", "test_ood"), train_images=200, pixels_per_image=30, eval_images=100)
    for s in ("test", "test_ood"): assert res[s]["miou"] > 99.5 and res[s]["fg_iou"] > 99.5, res[s]
    assert enc.training  # read in eval mode, handed back in the mode it came in
    assert res["info"]["features"] == ["layer4"] and res["info"]["classes"] == 11


def test_dense_raw_pixels_find_the_object_by_its_colour():
    from relicv2.dense import dense_suite
    cfg = update(preset("spurious"), {"data.synthetic_train": 300})
    res = dense_suite(baseline_encoder("raw-pixels", cfg), cfg, ("test_ood",), train_images=300, eval_images=50)
    assert res["test_ood"]["fg_iou"] > 90 and res["test_ood"]["miou"] < 50 and floats_only(res, ("test_ood",))


# ---------------- every suite ----------------

def test_every_suite_module_offers_run_suite_and_imports_alone():
    import importlib, inspect, subprocess, sys
    from relicv2.config import EVAL_SUITES
    for name in EVAL_SUITES:
        params = inspect.signature(importlib.import_module(f"relicv2.{name}").run_suite).parameters
        assert list(params) == ["encoder", "cfg", "splits", "device", "progress"], name
        assert [params[p].kind for p in ("device", "progress")] == [inspect.Parameter.KEYWORD_ONLY] * 2, name
        assert (params["device"].default, params["progress"].default) == (None, False), name
        subprocess.run([sys.executable, "-c", f"import relicv2.{name}"], check=True)  # first import in a fresh process: no cycle


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_every_suite_runs_with_the_encoder_on_a_gpu():
    from relicv2 import dense, low_label, robustness, transfer
    cfg = tiny(**{"data.classes": "0-6"})
    enc = baseline_encoder("random-init", cfg).cuda()
    cpu = baseline_encoder("random-init", cfg)
    for run in (lambda e: robustness.robustness_suite(e, cfg, ("test",), eval_images=40),
                lambda e: low_label.low_label_suite(e, cfg, ("test",), eval_images=40),
                lambda e: transfer.run_suite(e, cfg, ("test",)),
                lambda e: dense.dense_suite(e, cfg, ("test",), train_images=64, eval_images=20)):
        on_gpu, on_cpu = run(enc), run(cpu)
        assert floats_only(on_gpu, ("test",))
        for k, v in on_cpu["test"].items(): assert abs(on_gpu["test"][k] - v) <= 15.0, k  # the same read-out, up to TF32 and float error
