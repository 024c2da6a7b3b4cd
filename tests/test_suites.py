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

