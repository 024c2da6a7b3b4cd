"Edge cases and statistics of relicv2.data, relicv2.synthetic and relicv2.readers: determinism, cache, synthetic statistics, ImageFolder/IDX bad inputs, collate, parsing."
import gzip
import os
import struct
import time
import warnings
import zlib
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from relicv2 import data as D, items as I, readers as R, synthetic as S
from relicv2.config import DataConfig


# ----------------------------------------------------------------------------------------------------------- helpers
def png_bytes(a: torch.Tensor, depth: int = 8) -> bytes:
    "A PNG of a (C, H, W) integer tensor, C in 1..4, 8 or 16 bits (written by hand: torchvision cannot write RGBA / 16 bit)."
    c, h, w = a.shape
    ctype = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    px = a.permute(1, 2, 0).to(torch.int64)
    if depth == 16: px = torch.stack([px >> 8, px & 255], -1)
    rows = px.to(torch.uint8).reshape(h, -1)
    raw = b"".join(b"\x00" + bytes(r.tolist()) for r in rows)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, ctype, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def jpeg_bytes(a: torch.Tensor) -> bytes:
    return R.encode_image(a, "JPEG")


def rand_img(c=3, h=12, w=16, seed=0):
    return torch.randint(0, 256, (c, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def write(path: Path, b: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b)
    return path


def tree(tmp_path, n_per_class=2, classes=("a", "b"), split="train"):
    "root/split/class/i.png with distinct random images; returns root."
    root = tmp_path / "data"
    for ci, c in enumerate(classes):
        for i in range(n_per_class): write(root / split / c / f"{i}.png", png_bytes(rand_img(seed=10 * ci + i)))
    return root


# ------------------------------------------------------------------------------------------------ synthetic: determinism
def test_same_seed_same_bytes_other_seed_other_bytes():
    a = S.generate_synthetic("train", size=24, n=300, seed=3)
    b = S.generate_synthetic("train", size=24, n=300, seed=3)
    c = S.generate_synthetic("train", size=24, n=300, seed=4)
    for k in a: assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a["images"], c["images"])
    assert torch.equal(a["labels"], c["labels"])  # labels cycle through the classes whatever the seed


def test_splits_differ_and_do_not_depend_on_thread_count():
    tr = S.generate_synthetic("train", size=24, n=64)
    te = S.generate_synthetic("test", size=24, n=64)
    assert not torch.equal(tr["images"], te["images"])
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = S.generate_synthetic("train", size=24, n=64)
    finally: torch.set_num_threads(n)
    assert torch.equal(one["images"], tr["images"])


def test_bad_synthetic_arguments():
    for kw, msg in [(dict(split="val"), "train, test, test_ood"), (dict(n_classes=13), "n_classes"),
                    (dict(n_classes=1), "n_classes"), (dict(spurious_correlation=1.5), "spurious_correlation"),
                    (dict(size=15), "size"), (dict(n=-1), "n must")]:
        with pytest.raises(ValueError, match=msg): S.generate_synthetic(**{"n": 8, **kw})


def test_empty_split():
    d = S.generate_synthetic("train", size=16, n=0)
    assert d["images"].shape == (0, 3, 16, 16) and d["labels"].dtype == torch.int64


# -------------------------------------------------------------------------------------------------- synthetic: content
@pytest.fixture(scope="module")
def big():
    return S.generate_synthetic("train", size=32, n=3000, spurious_correlation=0.8, seed=1)


def test_masks_binary_nonempty_exact(big):
    im, m = big["images"], big["masks"]
    assert im.dtype == m.dtype == torch.uint8 and m.shape == (3000, 1, 32, 32)
    assert set(m.unique().tolist()) == {0, 1}
    cover = m.flatten(1).float().mean(1)
    assert cover.min() > 0.02 and cover.max() < 0.8, (cover.min(), cover.max())
    # exact mask: every foreground pixel has the object's single colour
    fg = im.permute(0, 2, 3, 1)[m[:, 0].bool()]  # (P, 3)
    owner = torch.arange(3000).repeat_interleave(m.flatten(1).sum(1))[:, None].expand(-1, 3)
    lo, hi = (torch.zeros(3000, 3, dtype=torch.long).scatter_reduce(0, owner, fg.long(), r, include_self=False) for r in ("amin", "amax"))
    assert torch.equal(lo, hi)


def test_labels_balanced(big):
    counts = big["labels"].bincount(minlength=10)
    assert counts.max() - counts.min() <= 1


@pytest.mark.parametrize("split,p", [("train", 0.8), ("test", 0.8), ("test", 0.3), ("test_ood", None)])
def test_correlation_strength(split, p):
    n = 3000
    d = S.generate_synthetic(split, size=16, n=n, spurious_correlation=p if p is not None else 0.9, seed=2)
    target = p if p is not None else 0.1
    frac = (d["labels"] == d["backgrounds"]).float().mean().item()
    assert abs(frac - target) < 4 * (target * (1 - target) / n) ** 0.5, (frac, target)
    off = d["backgrounds"][d["labels"] != d["backgrounds"]]
    assert off.bincount(minlength=10).min() > 0  # mismatches spread over all families


def test_ood_backgrounds_independent_of_class():
    d = S.generate_synthetic("test_ood", size=16, n=4000, seed=5)
    c = torch.bincount(d["labels"] * 10 + d["backgrounds"], minlength=100).reshape(10, 10).double()
    expected = c.sum(1, keepdim=True) * c.sum(0, keepdim=True) / c.sum()
    chi2 = ((c - expected) ** 2 / expected).sum().item()
    assert chi2 < 135, chi2  # 81 degrees of freedom: P(chi2 > 135) < 1e-4


def test_colour_and_position_carry_no_class_information(big):
    im, m, y = big["images"].float(), big["masks"][:, 0].bool(), big["labels"]
    fg = (im * m[:, None]).sum((2, 3)) / m.sum((1, 2))[:, None]  # (N, 3) object colour
    per_class = torch.stack([fg[y == k].mean(0) for k in range(10)])  # uniform colour: mean 127.5, sd 74 per channel
    assert (per_class - 127.5).abs().max() < 4 * 74 / 300 ** 0.5
    yy = torch.arange(32.0)[:, None].expand(32, 32)
    cy = (m * yy).sum((1, 2)) / m.sum((1, 2))
    assert max(abs(cy[y == k].mean() - cy.mean()) for k in range(10)) < 2.0  # centres spread alike for every class


def test_generation_speed():
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        t0, c0 = time.perf_counter(), time.process_time()
        d = S.generate_synthetic("train", size=64, n=5000, seed=9)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally: torch.set_num_threads(n)
    print(f"\nsynthetic: 5000 images at 64 px in {wall:.2f} s wall, {cpu:.2f} s CPU (1 thread): {5000 / cpu:.0f} img/s per core")
    assert d["images"].shape[0] == 5000
    assert cpu < 15, cpu  # about 1.3 s on a 2-core laptop-class CPU


# --------------------------------------------------------------------------------------------------- synthetic: cache
PARAMS = dict(split="test", size=16, n=40, n_classes=10, spurious_correlation=0.9, seed=0)


def test_cache_round_trip(tmp_path, monkeypatch):
    a = S.load_or_generate(tmp_path, **PARAMS)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".pt" and not files[0].name.startswith(".")
    monkeypatch.setattr(S, "generate_synthetic", lambda **kw: pytest.fail("regenerated despite a valid cache"))
    b = S.load_or_generate(tmp_path, **PARAMS)
    for k in a: assert torch.equal(a[k], b[k])


def test_cache_key_covers_every_parameter(tmp_path):
    S.load_or_generate(tmp_path, **PARAMS)
    for k, v in [("seed", 1), ("spurious_correlation", 0.5), ("n_classes", 5), ("size", 17), ("n", 41), ("split", "train")]:
        S.load_or_generate(tmp_path, **{**PARAMS, k: v})
    assert len(list(tmp_path.glob("*.pt"))) == 7


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "stale"])
def test_corrupt_cache_is_regenerated_with_a_warning(tmp_path, damage):
    good = S.load_or_generate(tmp_path, **PARAMS)
    (path,) = tmp_path.glob("*.pt")
    raw = path.read_bytes()
    if damage == "truncate": path.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage": path.write_bytes(b"not a torch file" * 10)
    elif damage == "empty": path.write_bytes(b"")
    else:  # a readable file whose content is not what its name promises
        d = torch.load(path, weights_only=True); d["images"] = d["images"][:5]; torch.save(d, path)
    with pytest.warns(UserWarning, match="regenerating"):
        again = S.load_or_generate(tmp_path, **PARAMS)
    for k in good: assert torch.equal(good[k], again[k])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        S.load_or_generate(tmp_path, **PARAMS)  # the rewritten file is valid
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary files left behind


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("RELICV2_CACHE", str(tmp_path / "env-cache"))
    assert S.default_cache_dir() == tmp_path / "env-cache"
    ds = S.SyntheticShapes("test", size=16, n=10)
    assert len(list((tmp_path / "env-cache").glob("*.pt"))) == 1 and len(ds) == 10


def test_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RELICV2_CACHE", str(tmp_path / "c"))
    S.SyntheticShapes("test", size=16, n=10, cache_dir=False)
    assert not (tmp_path / "c").exists()


def test_synthetic_dataset_items(tmp_path):
    ds = S.SyntheticShapes("test_ood", size=16, n=20, cache_dir=tmp_path)
    image, mask, label = ds[7]
    assert image.shape == (3, 16, 16) and mask.shape == (1, 16, 16) and isinstance(label, int) and label == 7
    image[:] = 0; mask[:] = 0  # items are copies: the dataset is not modified through them
    assert ds.images[7].any() and ds.masks[7].any()
    up = S.SyntheticShapes("test_ood", size=16, n=20, cache_dir=tmp_path, image_size=32)
    im2, m2, _ = up[7]
    assert im2.shape == (3, 32, 32) and set(m2.unique().tolist()) <= {0, 1} and m2.sum() == 4 * ds.masks[7].sum()
    assert ds.cooccurrence().sum() == 20


# --------------------------------------------------------------------------------------------------------- collate
def test_collate_mixed_masks_and_loader_with_workers(tmp_path):
    ds = S.SyntheticShapes("test", size=16, n=12, cache_dir=tmp_path)
    nomask = I.TensorImages(ds.images, ds.labels)
    items = [ds[0], nomask[1], ds[2]]
    b = I.collate(items)
    assert b.images.shape == (3, 3, 16, 16) and b.masks.shape == (3, 1, 16, 16)
    assert b.has_mask.tolist() == [True, False, True] and b.has_mask.dtype == torch.bool
    assert b.masks[1].sum() == 0 and torch.equal(b.masks[0], ds.masks[0])
    assert b.labels.dtype == torch.int64 and b.labels.tolist() == [0, 1, 2]
    assert isinstance(b.to("cpu", non_blocking=True), I.Batch)
    dl = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=I.collate, pin_memory=False)
    batches = list(dl)
    assert len(batches) == 3 and all(isinstance(x, I.Batch) for x in batches)
    assert torch.equal(torch.cat([x.images for x in batches]), ds.images)


def test_collate_bad_items():
    img = torch.zeros(3, 4, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="image_size"): I.collate([(img, None, 0), (torch.zeros(3, 4, 5, dtype=torch.uint8), None, 0)])
    with pytest.raises(ValueError, match="image_size"): I.collate([(torch.zeros(1, 4, 4, dtype=torch.uint8), None, 0)])
    with pytest.raises(TypeError, match="uint8"): I.collate([(img.float(), None, 0)])
    with pytest.raises(ValueError, match="mask of shape"): I.collate([(img, torch.zeros(1, 3, 4, dtype=torch.uint8), 0)])
    with pytest.raises(ValueError, match="mask of shape"): I.collate([(img, torch.zeros(1, 4, 4), 0)])


def test_tensor_images_bad_input():
    with pytest.raises(ValueError, match="uint8"): I.TensorImages(torch.zeros(2, 3, 4, 4), torch.zeros(2))
    with pytest.raises(ValueError, match="labels"): I.TensorImages(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(3))
    with pytest.raises(ValueError, match="masks"):
        I.TensorImages(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(2), masks=torch.zeros(2, 1, 4, 5, dtype=torch.uint8))


# ------------------------------------------------------------------------------------------------------ ImageFolder
def test_imagefolder_basic_and_classes(tmp_path):
    root = tree(tmp_path, classes=("zebra", "ant"))
    ds = R.ImageFolderMasked(root, "train")
    assert ds.classes == ["ant", "zebra"] and len(ds) == 4 and ds.n_masks == 0
    image, mask, label = ds[3]
    assert image.dtype == torch.uint8 and image.shape == (3, 12, 16) and mask is None and label == 1
    assert torch.equal(image, rand_img(seed=1))  # lossless PNG read back exactly
    flat = R.ImageFolderMasked(root / "train")  # split=None: classes directly under root
    assert len(flat) == 4


def test_imagefolder_labels_come_from_the_training_split(tmp_path):
    root = tree(tmp_path, classes=("ant", "bee", "cat"))
    for c in ("bee", "cat"): write(root / "val" / c / "x.png", png_bytes(rand_img()))  # val lacks 'ant', the first class
    train, val = R.ImageFolderMasked(root, "train"), R.ImageFolderMasked(root, "val")
    assert val.classes == train.classes == ["ant", "bee", "cat"]
    assert sorted(y for _, _, y in val) == [1, 2]  # counted within val they would be 0 and 1: every accuracy wrong
    # through the config route the evaluation takes
    ds = D.make_dataset(f"imagefolder:{root}", "val")
    assert [y for _, _, y in ds] == [1, 2]
    write(root / "val" / "dog" / "y.png", png_bytes(rand_img()))
    with pytest.raises(ValueError, match="dog .*not classes of the training split"): R.ImageFolderMasked(root, "val")


def test_imagefolder_missing_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"): R.ImageFolderMasked(tmp_path / "nope")
    root = tree(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"val.*\['train'\]"): R.ImageFolderMasked(root, "val")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class folders"): R.ImageFolderMasked(tmp_path / "empty")
    (root / "train" / "c").mkdir()
    with pytest.raises(ValueError, match=r"train/c holds no images"): R.ImageFolderMasked(root, "train")
    (root / "train" / "c" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"train/c holds no images"): R.ImageFolderMasked(root, "train")
    with pytest.raises(FileNotFoundError, match="mask folder"): R.ImageFolderMasked(root, "train", masks_root=tmp_path / "m")


def test_imagefolder_ignored_files_are_reported(tmp_path):
    root = tree(tmp_path)
    (root / "train" / "a" / "README").write_text("x")
    (root / "train" / "a" / "photo.tiff").write_bytes(b"x")
    write(root / "train" / "a" / "UPPER.PNG", png_bytes(rand_img()))
    with pytest.warns(UserWarning, match="ignored 2 non-image files"):
        ds = R.ImageFolderMasked(root, "train")
    assert len(ds) == 5


def test_imagefolder_conversions(tmp_path):
    rgb = rand_img(3, 6, 5)
    root = tmp_path / "r"
    write(root / "c" / "gray.png", png_bytes(rgb[:1]))
    write(root / "c" / "graya.png", png_bytes(torch.cat([rgb[:1], torch.full_like(rgb[:1], 9)])))
    write(root / "c" / "rgba.png", png_bytes(torch.cat([rgb, torch.zeros_like(rgb[:1])])))
    write(root / "c" / "rgb16.png", png_bytes(rgb.long() * 256 + 100, depth=16))
    write(root / "c" / "grayjpg.jpg", jpeg_bytes(rgb[:1]))
    ds = R.ImageFolderMasked(root)
    got = {p.name: ds[i][0] for i, (p, _, _) in enumerate(ds.samples)}
    assert all(t.shape == (3, 6, 5) and t.dtype == torch.uint8 for t in got.values())
    assert torch.equal(got["gray.png"], rgb[:1].expand(3, -1, -1))  # grayscale: channel repeated
    assert torch.equal(got["graya.png"], rgb[:1].expand(3, -1, -1))  # gray + alpha: alpha dropped
    assert torch.equal(got["rgba.png"], rgb)  # alpha dropped, colours kept (not composited)
    assert torch.equal(got["rgb16.png"], rgb)  # 16 bit: top 8 bits
    assert torch.equal(got["grayjpg.jpg"][0], got["grayjpg.jpg"][2])


@pytest.mark.parametrize("kind", ["png-half", "png-header", "jpeg-half", "jpeg-no-eoi", "not-an-image", "empty"])
def test_corrupt_image_named(tmp_path, kind):
    root = tree(tmp_path)
    png, jpg = png_bytes(rand_img()), jpeg_bytes(rand_img())
    bad = {"png-half": png[: len(png) // 2], "png-header": png[:20], "jpeg-half": jpg[: len(jpg) // 2],
           "jpeg-no-eoi": jpg[:-2], "not-an-image": b"hello world" * 5, "empty": b""}[kind]
    path = write(root / "train" / "b" / ("z.jpg" if "jpeg" in kind else "z.png"), bad)
    ds = R.ImageFolderMasked(root, "train")
    with pytest.raises(R.CorruptImageError, match=str(path)): ds[len(ds) - 1]


def test_skip_corrupt_reports_and_counts(tmp_path):
    root = tree(tmp_path)
    bad = write(root / "train" / "a" / "1b.png", png_bytes(rand_img())[:40])  # sorts between a/1.png and b/0.png
    strict = R.ImageFolderMasked(root, "train")
    with pytest.raises(R.CorruptImageError, match="1b.png"): strict[2]
    ds = R.ImageFolderMasked(root, "train", skip_corrupt=True)
    with pytest.warns(UserWarning, match=f"skipping corrupt file: cannot decode {bad}"):
        image, mask, label = ds[2]
    assert label == 1 and torch.equal(image, rand_img(seed=10)) and ds.n_skipped == 1  # the next image: b/0.png
    with pytest.warns(UserWarning, match="2 skipped so far"): ds[2]
    for p, _, _ in ds.samples: write(p, b"broken")
    with pytest.warns(UserWarning), pytest.raises(R.CorruptImageError, match="every image"): ds[0]


def masked_tree(tmp_path, mask: torch.Tensor, size=(12, 16)):
    root = tree(tmp_path)
    write(tmp_path / "masks" / "train" / "a" / "0.png", png_bytes(mask))
    return root, tmp_path / "masks"


def test_masks_found_missing_and_binarised(tmp_path):
    m = torch.zeros(1, 12, 16, dtype=torch.uint8); m[:, 2:8, 3:9] = 255
    root, masks = masked_tree(tmp_path, m)
    ds = R.ImageFolderMasked(root, "train", masks_root=masks)
    assert ds.n_masks == 1
    _, mask, _ = ds[0]
    assert mask.dtype == torch.uint8 and mask.shape == (1, 12, 16) and torch.equal(mask, m // 255)
    assert ds[1][1] is None  # no mask file: no mask
    write(masks / "train" / "a" / "1.png", png_bytes(m // 255))  # {0, 1} masks are accepted as they are
    assert torch.equal(R.ImageFolderMasked(root, "train", masks_root=masks)[1][1], m // 255)
    b = I.collate([ds[0], ds[1]])
    assert b.has_mask.tolist() == [True, False]


def test_mask_size_mismatch_names_both(tmp_path):
    root, masks = masked_tree(tmp_path, torch.zeros(1, 12, 15, dtype=torch.uint8))
    ds = R.ImageFolderMasked(root, "train", masks_root=masks)
    with pytest.raises(ValueError, match=r"masks/train/a/0.png is \(12, 15\) but its image .*data/train/a/0.png is \(12, 16\)"): ds[0]


def test_non_binary_mask_and_threshold(tmp_path):
    m = torch.arange(12 * 16, dtype=torch.uint8).reshape(1, 12, 16)
    root, masks = masked_tree(tmp_path, m)
    with pytest.raises(ValueError, match=r"masks/train/a/0.png is not binary"):
        R.ImageFolderMasked(root, "train", masks_root=masks)[0]
    ds = R.ImageFolderMasked(root, "train", masks_root=masks, mask_threshold=100)
    assert torch.equal(ds[0][1], (m > 100).to(torch.uint8))
    rgb_mask = torch.cat([m // 128 * 255] * 3)  # an RGB mask with values {0, 255} is read as gray
    root2, masks2 = masked_tree(tmp_path / "2", rgb_mask)
    assert torch.equal(R.ImageFolderMasked(root2, "train", masks_root=masks2)[0][1], (m >= 128).to(torch.uint8))


def test_corrupt_mask_is_named_and_skippable(tmp_path):
    root, masks = masked_tree(tmp_path, torch.zeros(1, 12, 16, dtype=torch.uint8))
    write(masks / "train" / "a" / "0.png", b"\x89PNG broken")
    with pytest.raises(R.CorruptImageError, match="masks/train/a/0.png"): R.ImageFolderMasked(root, "train", masks_root=masks)[0]
    ds = R.ImageFolderMasked(root, "train", masks_root=masks, skip_corrupt=True)
    with pytest.warns(UserWarning, match="0.png"): assert ds[0][1] is None  # served a/1.png, which has no mask


def test_masks_root_matching_nothing_is_an_error(tmp_path):
    root = tree(tmp_path)
    write(tmp_path / "masks" / "train" / "a" / "other.png", png_bytes(torch.zeros(1, 12, 16, dtype=torch.uint8)))
    with pytest.raises(ValueError, match="no mask in"): R.ImageFolderMasked(root, "train", masks_root=tmp_path / "masks")


def test_resize_keeps_mask_aligned(tmp_path):
    h, w = 30, 50
    m = torch.zeros(1, h, w, dtype=torch.uint8); m[:, 5:20, 20:42] = 1
    img = (m * 255).expand(3, -1, -1).contiguous()  # the image is its own mask
    write(tmp_path / "r" / "train" / "c" / "x.png", png_bytes(img))
    write(tmp_path / "r" / "train" / "c" / "y.png", png_bytes(rand_img(3, 40, 20)))  # another size
    write(tmp_path / "m" / "train" / "c" / "x.png", png_bytes(m))
    with pytest.raises(ValueError, match="image_size"):
        I.collate([R.ImageFolderMasked(tmp_path / "r", "train")[i] for i in range(2)])
    ds = R.ImageFolderMasked(tmp_path / "r", "train", masks_root=tmp_path / "m", image_size=24)
    b = I.collate([ds[0], ds[1]])
    assert b.images.shape == (2, 3, 24, 24)
    bright = b.images[0, 0] > 127
    assert (bright == b.masks[0, 0].bool()).float().mean() > 0.97


# ------------------------------------------------------------------------------------------------------ Fashion-MNIST
def idx_bytes(t: torch.Tensor) -> bytes:
    return bytes([0, 0, 0x08, t.ndim]) + struct.pack(f">{t.ndim}I", *t.shape) + bytes(t.flatten().tolist())


def fake_fmnist(root: Path, n=6, gz=True, split="train"):
    prefix = "train" if split == "train" else "t10k"
    imgs = torch.arange(n * 28 * 28).reshape(n, 28, 28).remainder(256).to(torch.uint8)
    labels = torch.arange(n).remainder(10).to(torch.uint8)
    for stem, t in [(f"{prefix}-images-idx3-ubyte", imgs), (f"{prefix}-labels-idx1-ubyte", labels)]:
        b = idx_bytes(t)
        write(root / (stem + (".gz" if gz else "")), gzip.compress(b) if gz else b)
    return imgs, labels


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_tiny_idx(tmp_path, gz):
    imgs, labels = fake_fmnist(tmp_path, gz=gz)
    ds = R.FashionMNIST(tmp_path, "train")
    image, mask, label = ds[4]
    assert image.shape == (3, 28, 28) and mask is None and label == 4
    assert torch.equal(image, imgs[4].expand(3, -1, -1))
    assert R.FashionMNIST(tmp_path, "train", image_size=32)[0][0].shape == (3, 32, 32)
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"): R.FashionMNIST(tmp_path, "test")
    with pytest.raises(ValueError, match="train, val, test"): R.FashionMNIST(tmp_path, "valid")
    with pytest.raises(FileNotFoundError, match="does not exist"): R.FashionMNIST(tmp_path / "nope")
    assert len(R.FashionMNIST(tmp_path, "val")) == 0  # one image per class: a sixth of it rounds to none held out


def test_idx_errors_name_the_file(tmp_path):
    fake_fmnist(tmp_path, gz=False)
    ip = tmp_path / "train-images-idx3-ubyte"
    raw = ip.read_bytes()
    ip.write_bytes(raw[:-10])
    with pytest.raises(ValueError, match=f"{ip} is truncated or corrupt"): R.FashionMNIST(tmp_path)
    ip.write_bytes(raw[:10])
    with pytest.raises(ValueError, match="truncated inside its header"): R.read_idx(ip)
    ip.write_bytes(b"\x12\x34" + raw[2:])
    with pytest.raises(ValueError, match="not an IDX file"): R.read_idx(ip)
    ip.write_bytes(raw + b"\x00")
    with pytest.raises(ValueError, match="truncated or corrupt"): R.read_idx(ip)
    gz = tmp_path / "x.gz"
    gz.write_bytes(gzip.compress(raw)[:-20])
    with pytest.raises(ValueError, match=f"{gz} is corrupt or truncated"): R.read_idx(gz)


def test_fashion_mnist_inconsistent_files(tmp_path):
    imgs, labels = fake_fmnist(tmp_path, gz=False)
    write(tmp_path / "train-labels-idx1-ubyte", idx_bytes(labels[:5]))
    with pytest.raises(ValueError, match="6 images but .* 5 labels"): R.FashionMNIST(tmp_path)
    write(tmp_path / "train-labels-idx1-ubyte", idx_bytes(labels + 5))
    with pytest.raises(ValueError, match="labels must be in 0..9"): R.FashionMNIST(tmp_path)
    write(tmp_path / "train-labels-idx1-ubyte", idx_bytes(labels))
    write(tmp_path / "train-images-idx3-ubyte", idx_bytes(imgs[:, 0]))  # 2-D instead of 3-D
    with pytest.raises(ValueError, match=r"expected uint8 images \(N, H, W\)"): R.FashionMNIST(tmp_path)


def test_read_idx_types(tmp_path):
    p = write(tmp_path / "f", bytes([0, 0, 0x0D, 1]) + struct.pack(">I", 3) + struct.pack(">3f", 1.5, -2.0, 3.25))
    assert R.read_idx(p).tolist() == [1.5, -2.0, 3.25]
    p = write(tmp_path / "s", bytes([0, 0, 0x0B, 2]) + struct.pack(">II", 1, 2) + struct.pack(">2h", -300, 7))
    assert R.read_idx(p).tolist() == [[-300, 7]]


@pytest.mark.skipif(not Path(R.FASHION_MNIST_ROOT).is_dir(), reason=f"Fashion-MNIST not installed in {R.FASHION_MNIST_ROOT} (Debian package dataset-fashion-mnist)")
def test_fashion_mnist_real_files():
    ds, val = R.FashionMNIST(split="train"), R.FashionMNIST(split="val")
    assert len(ds) == 50000 and ds.labels.bincount().tolist() == [5000] * 10
    assert len(val) == 10000 and val.labels.bincount().tolist() == [1000] * 10
    held = R.val_indices(R.read_idx(R._idx_file(Path(R.FASHION_MNIST_ROOT), "train-labels-idx1-ubyte")).long())
    assert len(held) == len(set(held.tolist())) == 10000  # rows of the training file: val takes these, train the rest (01c_readers)
    image, mask, label = ds[0]
    assert image.shape == (3, 28, 28) and image.dtype == torch.uint8 and mask is None and 0 <= label < 10
    assert ds.classes[9] == "Ankle boot"


# ------------------------------------------------------------------------------------------- torchvision datasets
def test_torchvision_missing_files_message(tmp_path):
    for name, folder in [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"), ("stl10", "stl10_binary")]:
        with pytest.raises(FileNotFoundError, match=f"{tmp_path / folder}.*download"):
            D.make_dataset(f"{name}:{tmp_path}", "train")
    with pytest.raises(ValueError, match="train, test, unlabeled"): D.make_dataset(f"stl10:{tmp_path}", "val")
    with pytest.raises(ValueError, match="train, test"): D.make_dataset(f"cifar10:{tmp_path}", "val")


def test_torchvision_arrays_wrapped(monkeypatch):
    import numpy as np
    import torchvision.datasets as tvd

    class FakeCIFAR:
        def __init__(self, root, train, download):
            assert download is False
            self.data = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)  # NHWC like CIFAR
            self.targets, self.classes = [3, 1], [str(i) for i in range(10)]

    class FakeSTL:
        def __init__(self, root, split, download):
            self.data = np.zeros((2, 3, 5, 5), dtype=np.uint8)  # NCHW like STL-10
            self.labels, self.classes = np.array([-1, -1]), [str(i) for i in range(10)]

    monkeypatch.setattr(tvd, "CIFAR10", FakeCIFAR)
    monkeypatch.setattr(tvd, "STL10", FakeSTL)
    ds = D.make_dataset("cifar10:/x", "test")
    image, mask, label = ds[1]
    assert image.shape == (3, 4, 4) and mask is None and label == 1
    assert image[:, 0, 0].tolist() == [48, 49, 50]
    s = D.make_dataset("stl10:/x", "unlabeled", image_size=8)
    assert s[0][0].shape == (3, 8, 8) and s[0][2] == -1


# --------------------------------------------------------------------------------------------------- make_dataset
def test_make_dataset_parsing(tmp_path, monkeypatch):
    monkeypatch.setenv("RELICV2_CACHE", str(tmp_path / "cache"))
    s = D.make_dataset("synthetic", "test_ood", image_size=16, n=10)
    assert isinstance(s, S.SyntheticShapes) and s.params["size"] == 16 and s[0][0].shape == (3, 16, 16)
    fake_fmnist(tmp_path / "fm")
    assert isinstance(D.make_dataset(f"fashion-mnist:{tmp_path / 'fm'}", "train"), R.FashionMNIST)
    root = tree(tmp_path)
    write(tmp_path / "m" / "train" / "a" / "0.png", png_bytes(torch.zeros(1, 12, 16, dtype=torch.uint8)))
    ds = D.make_dataset(f"imagefolder:{root},masks={tmp_path / 'm'},skip_corrupt=true,mask_threshold=127.5", "train", image_size=8)
    assert isinstance(ds, R.ImageFolderMasked) and ds.n_masks == 1 and ds.skip_corrupt and ds.mask_threshold == 127.5
    assert ds[0][0].shape == (3, 8, 8)
    assert D.dataset_splits(f"imagefolder:{root}") == ("train",)
    assert D.dataset_splits("synthetic") == ("train", "test", "test_ood")
    assert D.dataset_splits("stl10:/x")[2] == "unlabeled"


@pytest.mark.parametrize("name,msg", [
    ("imagenet:/data", "allowed: synthetic, spurious"), ("Synthetic", "allowed"), ("", "allowed"),
    ("synthetic:/x", "takes no path"), ("imagefolder", "needs a path"), ("cifar10", "needs a path"),
    ("imagefolder:/x,mask=/m", "imagefolder option must be"), ("imagefolder:/x,skip_corrupt=maybe", "imagefolder option"),
    ("imagefolder:/x,mask_threshold=high", "imagefolder option")])
def test_make_dataset_bad_names(name, msg):
    with pytest.raises(ValueError, match=msg): D.make_dataset(name, "train")


def test_make_dataset_bad_splits(tmp_path):
    with pytest.raises(ValueError, match="train, test, test_ood"): D.make_dataset("synthetic", "val", cache_dir=False)
    with pytest.raises(ValueError, match="train, val, test"): D.make_dataset(f"fashion-mnist:{tmp_path}", "valid")
    root = tree(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"\['train'\]"): D.make_dataset(f"imagefolder:{root}", "val")


def test_from_config(tmp_path):
    cfg = DataConfig(dataset="synthetic", image_size=24, synthetic_size=16, synthetic_train=30, spurious_correlation=0.5)
    tr = D.from_config(cfg, "train", cache_dir=tmp_path)
    te = D.from_config(cfg, "test", cache_dir=tmp_path, n=20)
    assert len(tr) == 30 and len(te) == 20 and tr.params["spurious_correlation"] == 0.5 and tr.params["size"] == 16
    assert tr[0][0].shape == (3, 24, 24) and tr[0][1].shape == (1, 24, 24)  # resized from 16 to image_size
    root = tree(tmp_path)
    ds = D.from_config(DataConfig(dataset=f"imagefolder:{root}", image_size=8), "train")
    assert ds[0][0].shape == (3, 8, 8)


def test_from_config_masks_source(tmp_path):
    "data.masks: the dataset's own masks, none, or masks computed from the pixels (training only; evaluation computes none)."
    from dataclasses import replace
    from relicv2.config import preset, update
    from relicv2.files import ConfigError
    from relicv2.data import SaliencyMasked
    cfg = DataConfig(dataset="spurious", image_size=24, synthetic_size=24, synthetic_train=16, masks="border")
    ds = D.from_config(cfg, "train")
    assert isinstance(ds, SaliencyMasked) and len(ds) == 16 and D.mask_count(ds) == ds.n_masks > 8
    assert ds.classes == D.from_config(cfg, "train", masks=False).classes
    assert type(D.from_config(cfg, "train", masks=False)).__name__ == "SpuriousShapes"
    assert D.mask_count(D.from_config(replace(cfg, masks="none"), "train")) == 0
    assert D.mask_count(D.from_config(replace(cfg, masks="dataset"), "train")) == 16
    assert D.mask_count(torch.utils.data.Subset(ds, [1, 2, 3])) == int(ds.has_mask[1:4].sum())
    root = tree(tmp_path)
    assert D.from_config(DataConfig(dataset=f"imagefolder:{root}", image_size=8, masks="none"), "train")[0][1] is None
    with pytest.raises(ValueError, match="write a mask tree once"):
        D.from_config(replace(cfg, dataset=f"imagefolder:{root}"), "train")
    with pytest.raises(ValueError, match="data.masks must be one of"):
        D.from_config(replace(cfg, masks="magic"), "train")
    for bad in ("deepusps", "deepusps:", "true", "Border"):
        with pytest.raises(ConfigError, match="data.masks"): update(preset("tiny"), {"data.masks": bad})
    assert update(preset("tiny"), {"data.masks": "deepusps:w.pt"}).data.masks == "deepusps:w.pt"


def test_mask_count_of_every_kind_and_of_subsets(tmp_path):
    "mask_count reads `n_masks` (and `has_mask` for a Subset of a dataset where only some images have a mask)."
    root = tree(tmp_path, n_per_class=2)
    write(tmp_path / "m" / "train" / "a" / "1.png", png_bytes(torch.zeros(1, 12, 16, dtype=torch.uint8)))
    ds = R.ImageFolderMasked(root, "train", masks_root=tmp_path / "m")
    assert D.mask_count(ds) == ds.n_masks == 1 and ds.has_mask.tolist() == [False, True, False, False]
    assert D.mask_count(torch.utils.data.Subset(ds, [1, 2])) == 1 and D.mask_count(torch.utils.data.Subset(ds, [0, 3])) == 0
    ti = I.TensorImages(torch.zeros(4, 3, 4, 4, dtype=torch.uint8), torch.zeros(4), masks=torch.zeros(4, 1, 4, 4, dtype=torch.uint8))
    assert D.mask_count(ti) == 4 and D.mask_count(torch.utils.data.Subset(ti, [0, 2])) == 2
    plain = I.TensorImages(ti.images, ti.labels)
    assert D.mask_count(plain) == 0 and D.mask_count(torch.utils.data.Subset(plain, [1])) == 0
    assert D.mask_count([1, 2]) is None and D.mask_count(torch.utils.data.Subset(torch.utils.data.Subset(ti, [0, 1]), [0])) is None
