"""Saliency: estimator invariances (determinism, batch independence, odd inputs), mask writing (refusals, resume,
atomicity, read-back alignment), metrics edge cases, DeepUSPS-lite save/load, and the command line."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from relicv2.readers import _decode, encode_image


def write_png(img, path): Path(path).write_bytes(encode_image(img, "PNG"))
def write_jpeg(img, path, quality=95): Path(path).write_bytes(encode_image(img, "JPEG", quality=quality))

from relicv2.synthetic import SyntheticShapes
from relicv2.readers import ImageFolderMasked
from relicv2.saliency import CLASSICAL, binarize, clean_mask, otsu_threshold, saliency_to_mask
from relicv2.saliency_metrics import SaliencyMeter, fbeta_adaptive, fbeta_max, iou_score, mae_score, pr_curves
from relicv2.config import SALIENCY_METHODS
from relicv2.deepusps import (SaliencyUNet, compute_saliency, deepusps_saliency, evaluate_methods, load_deepusps,
                              masks_at_size, save_deepusps, train_deepusps)
from relicv2.data import SaliencyMasked
from relicv2.mask_tree import LOG, MANIFEST, write_masks
from relicv2.cli import saliency_main

ALL = [*CLASSICAL, "fusion"]
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")  # torchvision 0.29+ on its io functions


@pytest.fixture(scope="module")
def synth():
    ds = SyntheticShapes("test", size=32, n=12, cache_dir=False)
    return ds.images, ds.masks


@pytest.fixture(scope="module")
def tiny_model(synth):
    torch.manual_seed(0)
    return SaliencyUNet(width=4, depth=2, size=32).eval()


# ---------------------------------------------------------------- estimators

@pytest.mark.parametrize("method", ALL)
def test_deterministic_and_batch_independent(synth, method):
    images = synth[0][:6]
    batch = compute_saliency(images, method)
    again = compute_saliency(images, method)
    assert torch.equal(batch, again)
    alone = torch.cat([compute_saliency(images[i:i + 1], method) for i in range(len(images))])
    torch.testing.assert_close(alone, batch, atol=1e-5, rtol=0)
    assert torch.equal(saliency_to_mask(alone)[0], saliency_to_mask(batch)[0])


def test_deepusps_batch_independent(synth, tiny_model):
    images = synth[0][:5]
    batch = deepusps_saliency(tiny_model, images)
    alone = torch.cat([deepusps_saliency(tiny_model, images[i:i + 1]) for i in range(len(images))])
    torch.testing.assert_close(alone, batch, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("shape", [(2, 1, 24, 24), (2, 3, 8, 8), (2, 1, 8, 8), (1, 3, 20, 50), (1, 3, 45, 13), (1, 3, 1, 9)])
def test_grayscale_tiny_nonsquare(method, shape):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    s = compute_saliency(images, method)
    assert s.shape == (shape[0], 1, *shape[2:]) and s.dtype == torch.float32
    assert torch.isfinite(s).all() and s.min() >= 0 and s.max() <= 1
    masks, ok = saliency_to_mask(s)
    assert masks.shape == s.shape and ok.shape == (shape[0],)


def test_grayscale_equals_repeated_rgb():
    g = torch.Generator().manual_seed(1)
    gray = torch.randint(0, 256, (2, 1, 16, 16), dtype=torch.uint8, generator=g)
    for m in ALL:
        torch.testing.assert_close(compute_saliency(gray, m), compute_saliency(gray.repeat(1, 3, 1, 1), m))


def test_deepusps_handles_odd_sizes(tiny_model):
    for shape in [(1, 1, 8, 8), (2, 3, 20, 50)]:
        s = deepusps_saliency(tiny_model, torch.randint(0, 256, shape, dtype=torch.uint8))
        assert s.shape == (shape[0], 1, *shape[2:]) and s.min() >= 0 and s.max() <= 1


def test_uint8_and_float_agree(synth):
    x = synth[0][:2]
    for m in ALL:
        torch.testing.assert_close(compute_saliency(x, m), compute_saliency(x.float() / 255, m))


def test_constant_image_gives_no_mask():
    s = compute_saliency(torch.full((1, 3, 16, 16), 128, dtype=torch.uint8), "border")
    assert s.abs().max() == 0
    assert not saliency_to_mask(s)[1].item()


@pytest.mark.parametrize("bad, err, needle", [
    (torch.zeros(3, 8, 8), ValueError, "batch axis"),
    (torch.zeros(1, 2, 8, 8), ValueError, "3 or 1"),
    (torch.zeros(0, 3, 8, 8), ValueError, "B>0"),
    (torch.full((1, 3, 8, 8), 1.5), ValueError, "[0, 1]"),
    (torch.full((1, 3, 8, 8), float("nan")), ValueError, "finite"),
    (torch.zeros(1, 3, 8, 8, dtype=torch.int32), TypeError, "uint8 or float"),
    ([[0.0]], TypeError, "torch.Tensor"),
])
def test_bad_images(bad, err, needle):
    with pytest.raises(err, match=None) as e:
        compute_saliency(bad, "border")
    assert needle in str(e.value)


def test_bad_method_and_threshold(synth):
    with pytest.raises(ValueError, match="method must be one of"): compute_saliency(synth[0][:1], "sift")
    with pytest.raises(ValueError, match="needs a model"): compute_saliency(synth[0][:1], "deepusps")
    s = torch.rand(1, 1, 8, 8)
    for t in ("mean", 1.0, -0.1, True):
        with pytest.raises(ValueError, match="threshold must be"): binarize(s, t)
    with pytest.raises(ValueError, match="odd int"): clean_mask(s > 0.5, 2)
    with pytest.raises(ValueError, match="min_coverage"): saliency_to_mask(s, min_coverage=0.5, max_coverage=0.4)


# ---------------------------------------------------------------- masks and metrics

def test_otsu_separates_two_levels_any_proportion():
    for frac in (0.02, 0.3, 0.9):
        s = torch.full((1, 1, 50, 50), 0.1)
        n = int(frac * 2500)
        s.view(-1)[:n] = 0.8
        t = otsu_threshold(s).item()
        assert 0.1 < t < 0.8, (frac, t)


def test_no_mask_rule_boundaries():
    s = torch.zeros(3, 1, 20, 20)
    s[0, :, :2, :2] = 1  # 4 / 400 = 1%: kept
    s[1, :, :1, :3] = 1  # 3 / 400 < 1% (and removed by the opening anyway)
    s[2] = 1; s[2, :, :5, :5] = 0  # 375 / 400 = 93.75%: kept
    masks, ok = saliency_to_mask(s, clean=1)
    assert ok.tolist() == [True, False, True]
    _, ok = saliency_to_mask(s, clean=1, max_coverage=0.9)
    assert ok.tolist() == [True, False, False]


def test_metrics_hand_made():
    truth = torch.zeros(2, 1, 4, 4); truth[:, :, :2, :2] = 1
    pred = torch.zeros(2, 1, 4, 4); pred[0, :, :2, :2] = 1; pred[1, :, 2:, 2:] = 1
    assert iou_score(pred, truth).tolist() == [1.0, 0.0]
    assert mae_score(pred, truth).tolist() == [0.0, 0.5]
    # foreground 0.8, background 0.25: adaptive threshold 2 x 0.3875 = 0.775 -> exactly the truth
    s = truth * 0.55 + 0.25
    torch.testing.assert_close(fbeta_adaptive(s, truth), torch.ones(2))
    p, r = pr_curves(s, truth)
    assert p.shape == (2, 255) and r[:, 0].tolist() == [1.0, 1.0]
    assert fbeta_max(p, r) == pytest.approx(1.0)
    # empty truth and empty prediction: IoU 1, F 0
    z = torch.zeros(1, 1, 4, 4)
    assert iou_score(z, z).item() == 1.0 and fbeta_adaptive(z, z).item() == 0.0
    with pytest.raises(ValueError, match="one shape"): mae_score(s, truth[:1])


def test_meter_batches_equal_whole():
    g = torch.Generator().manual_seed(0)
    s, t = torch.rand(6, 1, 8, 8, generator=g), (torch.rand(6, 1, 8, 8, generator=g) > 0.5).float()
    m, ok = saliency_to_mask(s)
    whole, parts = SaliencyMeter(), SaliencyMeter()
    whole.update(s, t, m, ok)
    for i in range(0, 6, 4): parts.update(s[i:i + 4], t[i:i + 4], m[i:i + 4], ok[i:i + 4])
    a, b = whole.result(), parts.result()
    assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k]) for k in a)
    with pytest.raises(ValueError, match="no images"): SaliencyMeter().result()


def test_masks_at_size_returns_native_sizes(synth):
    ims = [synth[0][0], synth[0][1, :, 4:28, :], synth[0][2, :1]]  # square, 24 x 32, grayscale
    out = masks_at_size(ims, "border", size=32)
    for im, (s, m, ok) in zip(ims, out):
        assert s.shape == (1, *im.shape[-2:]) and m.shape == s.shape and m.dtype == torch.uint8
        assert set(m.unique().tolist()) <= {0, 1} and isinstance(ok, bool)


def test_evaluate_methods_bad_input(synth):
    with pytest.raises(ValueError, match="as many truth masks"):
        evaluate_methods(synth[0][:3], synth[1][:2], ["border"])


# ---------------------------------------------------------------- DeepUSPS-lite

def test_train_save_load_roundtrip(synth, tmp_path):
    model, hist = train_deepusps(synth[0], epochs=1, rounds=1, size=32, width=4, depth=2, batch_size=4)
    assert [(h["round"], h["images"]) for h in hist] == [(0, 6), (1, 12)]
    path = save_deepusps(model, tmp_path / "sub" / "w.pt")
    assert [p.name for p in path.parent.iterdir()] == ["w.pt"]  # no temporary file left
    loaded = load_deepusps(path)
    torch.testing.assert_close(deepusps_saliency(loaded, synth[0][:3]), deepusps_saliency(model, synth[0][:3]))
    again, _ = train_deepusps(synth[0], epochs=1, rounds=1, size=32, width=4, depth=2, batch_size=4)
    torch.testing.assert_close(deepusps_saliency(again, synth[0][:3]), deepusps_saliency(model, synth[0][:3]))  # seeded


def test_load_and_train_errors(tmp_path, synth):
    with pytest.raises(ValueError, match="do not exist"): load_deepusps(tmp_path / "none.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"): load_deepusps(tmp_path / "junk.pt")
    torch.save({"a": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a DeepUSPS-lite"): load_deepusps(tmp_path / "other.pt")
    with pytest.raises(ValueError, match="keep"): train_deepusps(synth[0], keep=0)
    with pytest.raises(ValueError, match="at least 2"): train_deepusps(synth[0][:1])
    with pytest.raises(ValueError, match="depth"): SaliencyUNet(depth=1)


# ---------------------------------------------------------------- writing mask trees

def make_tree(root: Path, images, n=6):
    paths = []
    for k in range(n):
        folder = root / "train" / ("a" if k % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        img = images[k] if k != 3 else images[k, :, 2:26, :]  # one 24 x 32 image
        p = folder / f"im{k}.{'jpg' if k == 1 else 'png'}"
        (write_jpeg(img, str(p), quality=95) if k == 1 else write_png(img, str(p)))
        paths.append(p)
    return paths


def snapshot(root: Path):
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_write_read_back_aligned(synth, tmp_path):
    src = tmp_path / "in"
    make_tree(src, synth[0])
    before = snapshot(src)
    s = write_masks(src, tmp_path / "out", "border", progress=False)
    assert s["images"] == 6 and s["masks"] + s["no_mask"] == 6 and s["written"] == s["masks"] and s["unreadable"] == 0
    assert snapshot(src) == before  # the input tree is untouched
    leftovers = [p for p in (tmp_path / "out").rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers
    umask = os.umask(0); os.umask(umask)
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "out").rglob("*.png")} == {0o666 & ~umask}  # not mkstemp's 0600
    ds = ImageFolderMasked(src, "train", masks_root=tmp_path / "out")
    assert ds.n_masks == s["masks"]
    for i in range(len(ds)):
        image, mask, _ = ds[i]
        if mask is not None:
            assert mask.shape == (1, *image.shape[-2:]) and set(mask.unique().tolist()) <= {0, 1}
            # the PNG holds exactly the mask the pipeline computed for this image
            (_, m, ok), = masks_at_size([image], "border", size=64)
            assert ok and torch.equal(m, mask)


def test_resume_writes_nothing_new_and_skips_no_mask(synth, tmp_path):
    src, dst = tmp_path / "in", tmp_path / "out"
    make_tree(src, synth[0])
    write_masks(src, dst, "border", progress=False)
    stamps = {p: p.stat().st_mtime_ns for p in dst.rglob("*.png")}
    log_lines = (dst / LOG).read_text().splitlines()
    assert len(log_lines) == 6
    s = write_masks(src, dst, "border", progress=False)
    assert s["written"] == 0 and {p: p.stat().st_mtime_ns for p in dst.rglob("*.png")} == stamps
    assert (dst / LOG).read_text().splitlines() == log_lines  # no image was processed again, no-mask ones included
    # a deleted mask is redone; an interrupted log line is ignored
    victim = next(iter(stamps))
    victim.unlink()
    with open(dst / LOG, "a") as f: f.write("train/b/partial")
    s = write_masks(src, dst, "border", progress=False)
    assert s["written"] == 1 and victim.exists()


def test_no_mask_images_get_no_png(tmp_path):
    src = tmp_path / "in" / "c"; src.mkdir(parents=True)
    write_png(torch.full((3, 16, 16), 90, dtype=torch.uint8), str(src / "flat.png"))  # nothing salient
    s = write_masks(tmp_path / "in", tmp_path / "out", "border", progress=False)
    assert s["no_mask"] == 1 and s["masks"] == 0 and not list((tmp_path / "out").rglob("*.png"))
    import warnings
    with pytest.raises(ValueError, match="no mask"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ImageFolderMasked(tmp_path / "in", None, masks_root=tmp_path / "out")  # the data module: no mask matches


@pytest.mark.parametrize("out", ["in", "in/train", "in/train/a/new", "."])
def test_refuses_output_inside_or_containing_input(synth, tmp_path, out):
    make_tree(tmp_path / "in", synth[0])
    before = snapshot(tmp_path / "in")
    with pytest.raises(ValueError, match="must not"):
        write_masks(tmp_path / "in", tmp_path / out, progress=False)
    assert snapshot(tmp_path / "in") == before


def test_refuses_symlinked_output_into_input(synth, tmp_path):
    make_tree(tmp_path / "in", synth[0])
    (tmp_path / "link").symlink_to(tmp_path / "in" / "train")
    with pytest.raises(ValueError, match="must not"):
        write_masks(tmp_path / "in", tmp_path / "link", progress=False)


def test_never_overwrites_existing_file(synth, tmp_path):
    src, dst = tmp_path / "in", tmp_path / "out"
    paths = make_tree(src, synth[0])
    target = dst / "train" / "b" / "im0.png"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"user file")
    write_masks(src, dst, "border", progress=False)
    assert target.read_bytes() == b"user file"  # an existing file counts as done and is never replaced


def test_other_settings_refused_and_stem_clash(synth, tmp_path):
    src, dst = tmp_path / "in", tmp_path / "out"
    make_tree(src, synth[0])
    write_masks(src, dst, "border", progress=False)
    with pytest.raises(ValueError, match="other settings"): write_masks(src, dst, "border", threshold="adaptive", progress=False)
    write_png(synth[0][0], str(src / "train" / "a" / "im1.png"))  # im1.jpg already there
    with pytest.raises(ValueError, match="share the mask"): write_masks(src, tmp_path / "out2", progress=False)


def test_corrupt_image_is_skipped_and_retried(synth, tmp_path):
    src, dst = tmp_path / "in", tmp_path / "out"
    make_tree(src, synth[0], n=2)
    (src / "train" / "a" / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.warns(UserWarning, match="unreadable"):
        s = write_masks(src, dst, "border", progress=False)
    assert s["unreadable"] == 1 and s["images"] == 3
    assert "train/a/bad.jpg" not in (dst / LOG).read_text()  # a later run tries it again


def test_bad_write_arguments(synth, tmp_path):
    make_tree(tmp_path / "in", synth[0], n=2)
    with pytest.raises(ValueError, match="does not exist"): write_masks(tmp_path / "nope", tmp_path / "out")
    with pytest.raises(ValueError, match="method must be"): write_masks(tmp_path / "in", tmp_path / "out", "magic")
    with pytest.raises(ValueError, match="needs a model"): write_masks(tmp_path / "in", tmp_path / "out", "deepusps")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"): write_masks(tmp_path / "empty", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing created for refused calls


# ---------------------------------------------------------------- the command line

def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-c", "import sys; from relicv2.cli import saliency_main; sys.exit(saliency_main())",
                           *map(str, args)], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_cli_writes_resumes_and_summarises(synth, tmp_path):
    make_tree(tmp_path / "in", synth[0])
    r = cli(tmp_path / "in", tmp_path / "out", "--method", "frequency", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "6 images:" in r.stdout and "mean foreground fraction" in r.stdout
    r = cli(tmp_path / "in", tmp_path / "out", "--method", "frequency", "--no-progress")
    assert r.returncode == 0 and "(0 written now)" in r.stdout
    assert (tmp_path / "out" / MANIFEST).is_file()


def test_cli_train_then_deepusps_masks_and_evaluate(synth, tmp_path):
    imgs = tmp_path / "in"
    make_tree(imgs, synth[0])
    w = tmp_path / "w.pt"
    r = cli("--train-on", imgs, "--weights", w, "--epochs", "1", "--rounds", "1", "--size", "32", "--no-progress")
    assert r.returncode == 0 and w.is_file(), r.stderr
    r = cli(imgs, tmp_path / "out", "--method", "deepusps", "--weights", w, "--no-progress")
    assert r.returncode == 0, r.stderr
    truth = tmp_path / "truth"
    for k, p in enumerate(sorted(imgs.rglob("*.*"))):
        q = truth / p.relative_to(imgs).with_suffix(".png"); q.parent.mkdir(parents=True, exist_ok=True)
        write_png((_decode(p)[:1] > 127).to(torch.uint8) * 255, str(q))
    r = cli(imgs, "--evaluate", truth, "--split", "train", "--methods", "border,deepusps", "--weights", w)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].split()[:3] == ["method", "iou", "mae"] and "deepusps" in r.stdout


def test_saliency_masked_equals_masks_at_size_and_drops_unusable(synth, tiny_model, tmp_path):
    from relicv2.items import TensorImages
    imgs = synth[0].clone(); imgs[0] = 128  # a constant image: no usable mask
    ds = TensorImages(imgs, torch.arange(len(imgs)) % 3, synth[1], classes=["a", "b", "c"])
    w = save_deepusps(tiny_model, tmp_path / "w.pt")
    for source, method, model, size in [("border", "border", None, 64), (f"deepusps:{w}", "deepusps", tiny_model, 32)]:
        sm = SaliencyMasked(ds, source, batch_size=5, progress=False)  # batches of 5: the result is batch-independent
        want = masks_at_size(list(imgs), method, model, size)
        assert sm.n_masks == sum(ok for _, _, ok in want) and sm.classes == ["a", "b", "c"] and len(sm) == len(ds)
        assert f"{sm.n_masks} of {len(ds)} images have a mask" in sm.summary
        for i, (_, m, ok) in enumerate(want):
            img, got, label = sm[i]
            assert torch.equal(img, imgs[i]) and label == i % 3 and (got is None) == (not ok)
            assert got is None or torch.equal(got, m)
        if method == "border": assert sm[0][1] is None and sm.n_masks == len(ds) - 1


def test_cli_trains_on_and_evaluates_a_generated_dataset(tmp_path):
    w, res = tmp_path / "w.pt", tmp_path / "r.json"
    r = cli("--train-on", "spurious", "--train-images", "16", "--epochs", "1", "--rounds", "0", "--size", "24", "--weights", w,
            "--evaluate", "spurious", "--methods", "spectral,deepusps", "--results", res, "--no-progress")
    assert r.returncode == 0, r.stderr
    import json
    rec = json.loads(res.read_text())
    assert rec["training"]["data"] == "spurious" and rec["training"]["images"] == 16 and rec["evaluation"]["reference"] == "spurious"
    assert rec["threads"] >= 1 and rec["cpus"] >= 1 and rec["finished"].endswith("UTC")  # where and when it was measured
    assert set(rec["evaluation"]["results"]) == {"spectral", "deepusps"}
    from relicv2.spurious import SPLIT_SIZES
    assert all(v["images"] == SPLIT_SIZES["test"] for v in rec["evaluation"]["results"].values())  # the whole generated test split


@pytest.mark.parametrize("args, needle", [
    ([], "nothing to do"),
    (["IN"], "missing OUTPUT"),
    (["IN", "IN/train"], "inside it"),
    (["IN", "OUT", "--method", "magic"], "method must be one of"),
    (["IN", "OUT", "--method", "deepusps"], "needs --weights"),
    (["IN", "OUT", "--method", "deepusps", "--weights", "missing.pt"], "do not exist"),
    (["IN", "OUT", "--threshold", "high"], "--threshold must be"),
    (["IN", "OUT", "--clean", "2"], "odd int"),
    (["IN", "OUT", "--min-coverage", "0.5", "--max-coverage", "0.1"], "min_coverage"),
    (["--train-on", "nowhere"], "needs --weights"),
    (["--train-on", "nowhere", "--weights", "w.pt"], "an existing image folder or a dataset"),
    (["--train-on", "spurious:nope", "--weights", "w.pt"], "dataset 'spurious' takes one option"),
    (["--evaluate", "masks"], "needs INPUT"),
    (["IN", "--evaluate", "IN", "--methods", "border,magic"], "comma-separated list"),
])
def test_cli_bad_input_one_line_exit_2(synth, tmp_path, args, needle, capsys, monkeypatch):
    make_tree(tmp_path / "IN", synth[0], n=2)
    monkeypatch.chdir(tmp_path)
    code = saliency_main(args)  # in-process: an escaping exception would fail the test
    err = capsys.readouterr().err
    assert code == 2, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("relicv2-saliency: error:") and needle in lines[0], err


def test_cli_bad_input_in_a_real_process(tmp_path):
    r = cli(tmp_path / "nowhere", tmp_path / "out", "--no-progress")
    assert r.returncode == 2 and r.stdout == "", (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr and "does not exist" in lines[0], r.stderr
