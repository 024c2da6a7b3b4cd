"""Image files in and out: Pillow's decode gives the pixels torchvision's deprecated decoder gave, on every format the
readers accept, and nothing in relicv2's image I/O raises a DeprecationWarning."""
import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from relicv2.mask_tree import _fraction_of, save_png_atomic, write_masks
from relicv2.readers import ImageFolderMasked, _decode, encode_image

ROOT = Path(__file__).resolve().parent.parent


def _png16(arr: np.ndarray) -> bytes:
    "A 16-bit PNG (gray (H, W) or RGB (H, W, 3) uint16) written by hand: Pillow writes 16-bit gray only."
    h, w = arr.shape[:2]
    colour = 2 if arr.ndim == 3 else 0
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _files(folder: Path) -> dict:
    "name -> path of generated files in every format and mode the readers meet: PNG, JPEG, WebP, GIF."
    g = np.random.default_rng(0)
    noise = g.integers(0, 256, (37, 53, 3), dtype=np.uint8)  # odd sizes: chroma subsampling's edge cases
    yy, xx = np.mgrid[0:64, 0:80]
    smooth = np.stack([(xx * 3) % 256, (yy * 4) % 256, ((xx + yy) * 2) % 256], -1).astype(np.uint8)
    out = {}
    def save(name, im, fmt, **kw):
        b = io.BytesIO(); im.save(b, fmt, **kw)
        out[name] = folder / name; out[name].write_bytes(b.getvalue())
    for tag, arr in (("noise", noise), ("smooth", smooth)):
        im = Image.fromarray(arr)
        for mode in ("RGB", "L", "RGBA", "LA", "P", "1"): save(f"{tag}_{mode}.png", im.convert(mode), "PNG")
        pal = im.convert("P"); pal.info["transparency"] = 0; save(f"{tag}_Ptrns.png", pal, "PNG")
        for q in (50, 95):
            for ss in (0, 2): save(f"{tag}_q{q}_ss{ss}.jpg", im, "JPEG", quality=q, subsampling=ss)
        save(f"{tag}_progressive.jpg", im, "JPEG", quality=90, progressive=True)
        save(f"{tag}_L.jpg", im.convert("L"), "JPEG", quality=90)
        save(f"{tag}_CMYK.jpg", im.convert("CMYK"), "JPEG", quality=90)
        save(f"{tag}_lossless.webp", im, "WEBP", lossless=True)
        save(f"{tag}_lossy.webp", im, "WEBP", quality=80)
        save(f"{tag}_lossless_alpha.webp", im.convert("RGBA"), "WEBP", lossless=True)
        save(f"{tag}.gif", im.convert("P"), "GIF")
        (folder / f"{tag}_16gray.png").write_bytes(_png16(arr[..., 0].astype(np.uint16) * 257 + 3)); out[f"{tag}_16gray.png"] = folder / f"{tag}_16gray.png"
        (folder / f"{tag}_16rgb.png").write_bytes(_png16(arr.astype(np.uint16) * 251)); out[f"{tag}_16rgb.png"] = folder / f"{tag}_16rgb.png"
    try:  # files written by torchvision's own encoders, as the project's trees were before
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from torchvision.io import encode_jpeg, encode_png
            t = torch.from_numpy(noise).permute(2, 0, 1).contiguous()
            for name, data in (("tv.png", encode_png(t)), ("tv_gray.png", encode_png(t[:1])), ("tv.jpg", encode_jpeg(t)),
                               ("tv_q95.jpg", encode_jpeg(t, quality=95))):
                out[name] = folder / name; out[name].write_bytes(data.numpy().tobytes())
    except ImportError: pass
    return out


def _torchvision_decode(path: Path, mode: str):
    "The decoder relicv2 used up to torchvision 0.29: torchvision.io.decode_image, 16-bit PNGs to their top 8 bits."
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try: from torchvision.io import ImageReadMode, decode_image, read_file
        except ImportError: pytest.skip("torchvision.io no longer has decode_image: the old decoder cannot be compared")
        img = decode_image(read_file(str(path)), mode=ImageReadMode.RGB if mode == "RGB" else ImageReadMode.GRAY)
    return (img.to(torch.int32) >> 8).to(torch.uint8) if img.dtype == torch.uint16 else img


def test_decode_same_pixels_as_torchvision(tmp_path):
    files = _files(tmp_path)
    assert len(files) >= 40
    worst = {}
    for name, path in files.items():
        new, old = _decode(path, "RGB"), _torchvision_decode(path, "RGB")
        assert new.dtype == torch.uint8 and new.shape == old.shape and new.stride() == old.stride(), name  # same layout too
        assert torch.equal(new, old), f"{name}: RGB pixels differ by up to {(new.int() - old.int()).abs().max()}"
        if path.suffix != ".png": continue  # masks are PNGs; torchvision does not convert WebP/GIF to gray at all
        new, old = _decode(path, "L"), _torchvision_decode(path, "L")
        worst[name] = int((new.int() - old.int()).abs().max())
    one_channel = [n for n in worst if any(k in n for k in ("_L.", "_LA.", "_1.", "16gray", "tv_gray"))]
    assert len(one_channel) >= 8 and all(worst[n] == 0 for n in one_channel), worst  # how masks are stored: identical
    assert max(worst.values()) <= 1, worst  # colour PNGs to gray: ITU-R 601 (Pillow) against Rec. 709 (libpng) luma


def test_mask_png_round_trip_and_decode_errors(tmp_path):
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(1, 19, 23, generator=g) > 0.5).to(torch.uint8)
    save_png_atomic(mask, tmp_path / "m.png")
    assert torch.equal(_torchvision_decode(tmp_path / "m.png", "L"), mask * 255)  # what the old decoder read back
    assert torch.equal(_decode(tmp_path / "m.png", "L"), mask * 255)
    assert _fraction_of(tmp_path / "m.png") == pytest.approx(mask.float().mean().item())
    png = encode_image(torch.zeros(3, 8, 8, dtype=torch.uint8))
    for name, data in (("empty.png", b""), ("text.jpg", b"hello" * 20), ("half.png", png[: len(png) // 2])):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=name):
            _decode(tmp_path / name)
    with pytest.raises(ValueError, match="mode must be one of RGB, L"):
        _decode(tmp_path / "m.png", "GRAY")


def test_image_io_raises_no_deprecation_warning(tmp_path):
    "Every image read and written by the readers and the mask tree, with DeprecationWarning an error."
    (tmp_path / "files").mkdir()
    files = _files(tmp_path / "files")
    root = tmp_path / "tree"
    for k, (name, path) in enumerate(sorted(files.items())):
        d = root / "train" / ("a" if k % 2 else "b"); d.mkdir(parents=True, exist_ok=True)
        (d / f"{k:02d}_{name}").write_bytes(path.read_bytes())  # unique stems: one mask each
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        write_masks(root, tmp_path / "masks", method="border", size=16, progress=False)
        ds = ImageFolderMasked(root, "train", masks_root=tmp_path / "masks", image_size=16)
        items = [ds[i] for i in range(len(ds))]
    assert len(items) == len(files) and ds.n_masks > 0
    assert all(im.shape == (3, 16, 16) for im, _, _ in items)


def test_package_does_not_use_torchvision_io():
    "torchvision.io's decoders and encoders are deprecated (torchvision 0.29): no module of relicv2 calls them."
    users = [p.name for p in sorted((ROOT / "relicv2").glob("*.py")) if "torchvision.io" in p.read_text(encoding="utf-8")]
    assert users == [], users


def test_decode_benchmark_quick():
    "benchmarks/decode.py --quick runs and prints both decoders' rates on JPEG and PNG trees (no speed is asserted)."
    import os, subprocess, sys
    if not hasattr(pytest.importorskip("torchvision.io"), "decode_image"):
        pytest.skip("torchvision.io no longer has decode_image: nothing to compare Pillow with")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decode.py"), "--quick"], capture_output=True, text=True,
                       timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _common import parse_summary
    f = parse_summary(r.stdout)
    assert set(f) == {"decode_jpg", "decode_png"}, r.stdout
    for fig in f.values():
        assert fig["pillow_images_per_s"] > 0 and fig["torchvision_images_per_s"] > 0 and fig["images"] == 40
        assert fig["ratio"] == pytest.approx(fig["pillow_images_per_s"] / fig["torchvision_images_per_s"], rel=2e-3)
