"""Images decoded per second from an ImageFolder: relicv2's reader (Pillow) against torchvision.io's decoder (deprecated
since torchvision 0.29), which relicv2 used before.

It writes an ImageNet-like tree once (JPEGs of 500 x 375 at quality 90, PNG masks for half of them, two classes) and
reads every item through `relicv2.readers.ImageFolderMasked` (decode, mask, resize and centre-crop to --size), once
with relicv2's own `_decode` and once with torchvision.io's `decode_image` in its place, alternating repeat by repeat in
one process so that a change of machine load hits both; each figure is images per CPU second of the process (one math
thread), the median over repeats. The same pixels come
out of both (tests/test_io.py); only the speed is measured here.

Usage: python benchmarks/decode.py [--quick] [--threads 1] [--images 200] [--size 224] [--repeats 5]
Prints a header line, then one summary line per image format: pillow and torchvision images/s and their ratio.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_args, header, median, note, setup, summary  # noqa: E402

from relicv2 import readers  # noqa: E402


def torchvision_decode(path: Path, mode: str = "RGB") -> torch.Tensor:
    "The decoder relicv2 used up to torchvision 0.29 (torchvision.io.decode_image; 16-bit PNGs to their top 8 bits)."
    from torchvision.io import ImageReadMode, decode_image, read_file
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        img = decode_image(read_file(str(path)), mode=ImageReadMode.RGB if mode == "RGB" else ImageReadMode.GRAY)
    return (img.to(torch.int32) >> 8).to(torch.uint8) if img.dtype == torch.uint16 else img


def write_tree(root: Path, n: int, suffix: str) -> None:
    "n images of 500 x 375 (smooth colour fields with noise, like photographs to a codec), a mask for every other one."
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        c = "a" if i % 2 else "b"
        (root / "images" / c).mkdir(parents=True, exist_ok=True); (root / "masks" / c).mkdir(parents=True, exist_ok=True)
        base = torch.rand(3, 12, 16, generator=g) * 255
        img = torch.nn.functional.interpolate(base[None], size=(375, 500), mode="bicubic", align_corners=False)[0]
        img = (img + 12 * torch.randn(img.shape, generator=g)).clamp(0, 255).to(torch.uint8)
        opts = dict(format="JPEG", quality=90) if suffix == ".jpg" else {}
        (root / "images" / c / f"{i}{suffix}").write_bytes(readers.encode_image(img, **opts))
        if i % 4 < 2:
            m = torch.zeros(1, 375, 500, dtype=torch.uint8); m[:, 90:290, 120:380] = 255
            (root / "masks" / c / f"{i}.png").write_bytes(readers.encode_image(m))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, "40 images, 2 repeats: seconds (what tests/test_benchmarks.py runs)")
    ap.add_argument("--images", type=int, default=200, help="images in the tree (default 200)")
    ap.add_argument("--size", type=int, default=224, help="data.image_size: the reader's resize and centre crop (default 224; 0: none, decoding alone)")
    ap.add_argument("--repeats", type=int, default=5, help="passes over the tree per decoder (default 5)")
    args = ap.parse_args(argv)
    if args.quick: args.images, args.repeats = 40, 2
    if args.device != "cpu": raise SystemExit("decode.py: decoding runs on the CPU; --device must be cpu")
    device, threads = setup(args, "decode.py")
    header(device, threads)
    note(f"tree: {args.images} images of 500 x 375, masks for half; items "
         + (f"resized and centre-cropped to {args.size} px; " if args.size else "decoded only (no resize); ")
         + 
f"median of {args.repeats} passes per decoder, alternating")
    ours = readers._decode
    with tempfile.TemporaryDirectory() as tmp:
        for suffix in (".jpg", ".png"):
            root = Path(tmp) / suffix[1:]
            write_tree(root, args.images, suffix)
            ds = readers.ImageFolderMasked(root / "images", masks_root=root / "masks", image_size=args.size or None)
            times = {"pillow": [], "torchvision": []}
            for r in range(args.repeats):
                for name, fn in (("pillow", ours), ("torchvision", torchvision_decode))[:: 1 if r % 2 == 0 else -1]:
                    readers._decode = fn
                    try:
                        t0 = time.process_time()  # CPU seconds of this process: what a DataLoader worker spends, whatever the load
                        for i in range(len(ds)): ds[i]
                        times[name].append(time.process_time() - t0)
                    finally: readers._decode = ours
            rate = {k: len(ds) / median(v) for k, v in times.items()}
            summary(f"decode_{suffix[1:]}", pillow_images_per_s=rate["pillow"], torchvision_images_per_s=rate["torchvision"],
                    ratio=rate["pillow"] / rate["torchvision"], images=len(ds), repeats=args.repeats, threads=threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
