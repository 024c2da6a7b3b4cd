"Statistical, alignment, reproducibility and bad-input tests of relicv2.views and relicv2.augment (the notebooks hold the lessons)."
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from relicv2.augment import remove_background, sample_crop_boxes, swap_partners
from relicv2.config import MASK_FILLS, ViewsConfig
from relicv2.files import ConfigError
from relicv2.views import ViewGenerator

ROOT = Path(__file__).resolve().parents[1]
OFF = dict(flip_prob=0.0, jitter_prob=0.0, grayscale_prob=0.0, blur_prob=(0.0, 0.0), solarize_prob=(0.0, 0.0), mask_prob=0.0)
SMALL = dict(large_size=8, small_size=8)


def gen(**kw):
    "A generator with every random op off except those in `kw`, at 8-pixel views."
    return ViewGenerator(**{**SMALL, **OFF, **kw})


def noise(n, size=16, seed=0):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def within(frac, p, n, sigmas=5.0):
    "A binomial frequency within `sigmas` standard deviations of p (and exact at p = 0 or 1)."
    return abs(frac - p) <= sigmas * math.sqrt(p * (1 - p) / n) + 1e-9


def changed(on: dict, images, masks=None, seed=0):
    "Per view, which images differ between the op switched on and off (same seed, hence the same other draws)."
    a = gen(**on)(images, masks, generator=torch.Generator().manual_seed(seed))
    b = gen()(images, masks, generator=torch.Generator().manual_seed(seed))
    diff = [(u - v).flatten(1).abs().amax(1) > 1e-5 for u, v in zip(a.large + a.small, b.large + b.small)]
    return diff, a.large_params + a.small_params


# ---------------------------------------------------------------- each op fires with its probability
N = 1000  # images per batch; 4 large + 2 small views each


@pytest.mark.parametrize("kw, flag, p", [
    (dict(flip_prob=0.5), "flip", (0.5, 0.5)),
    (dict(jitter_prob=0.8), "jitter", (0.8, 0.8)),
    (dict(grayscale_prob=0.2), "grayscale", (0.2, 0.2)),
    (dict(blur_prob=(1.0, 0.1), blur_sigma=(1.0, 2.0)), "blur", (1.0, 0.1)),
    (dict(solarize_prob=(0.0, 0.2)), "solarize", (0.0, 0.2)),
])
def test_op_fires_with_its_probability(kw, flag, p):
    diff, params = changed(kw, noise(N))
    for t in (1, 2):  # per view type, large and small views together
        d = torch.cat([dv for dv, pv in zip(diff, params) if pv.view_type == t])
        drawn = torch.cat([getattr(pv, flag) for pv in params if pv.view_type == t])
        assert within(drawn.float().mean().item(), p[t - 1], len(drawn)), (flag, t, drawn.float().mean())
        assert torch.equal(d, drawn), flag  # the output changed exactly where the op was drawn


def test_probabilities_hold_with_every_op_on():
    kw = dict(flip_prob=0.3, jitter_prob=0.6, grayscale_prob=0.4, blur_prob=(0.7, 0.3), solarize_prob=(0.5, 0.9))
    v = gen(**kw)(noise(N), generator=torch.Generator().manual_seed(2))
    for flag, p in [("flip", (0.3, 0.3)), ("jitter", (0.6, 0.6)), ("grayscale", (0.4, 0.4)), ("blur", (0.7, 0.3)), ("solarize", (0.5, 0.9))]:
        for t in (1, 2):
            drawn = torch.cat([getattr(pv, flag) for pv in v.large_params + v.small_params if pv.view_type == t])
            assert within(drawn.float().mean().item(), p[t - 1], len(drawn)), (flag, t)


def test_view_types_alternate():
    v = gen()(noise(2), generator=torch.Generator().manual_seed(0))
    assert [p.view_type for p in v.large_params] == [1, 2, 1, 2] and [p.view_type for p in v.small_params] == [1, 2]


def test_jitter_draws_follow_their_ranges():
    g = ViewGenerator(**SMALL)
    p = g.sample(20_000, 16, 16, large=True, view_type=1, generator=torch.Generator().manual_seed(0))
    f = p.factors
    for k, (lo, hi) in enumerate([(-0.4, 0.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
        assert lo <= f[:, k].min() < lo + 0.01 and hi - 0.01 < f[:, k].max() <= hi
        assert abs(f[:, k].mean().item() - (lo + hi) / 2) < 0.02 * (hi - lo)
    assert torch.equal(p.order.sort(1).values, torch.arange(4).expand(20_000, 4))  # every order is a permutation
    counts = torch.bincount(p.order[:, 0], minlength=4).float() / 20_000  # each op first about 1/4 of the time
    assert (counts - 0.25).abs().max() < 0.02
    assert 0.1 <= p.sigma.min() and p.sigma.max() <= 2.0


def test_mask_decision_fires_with_its_probability():
    images = noise(N)
    masks = torch.zeros(N, 1, 16, 16, dtype=torch.uint8)
    masks[..., ::2, ::2] = 1  # a fine grid: every crop has background in it
    diff, params = changed(dict(mask_prob=0.3), images, masks)
    masked = torch.stack([p.masked for p in params[:4]])
    assert within(masked.float().mean().item(), 0.3, masked.numel())
    assert torch.equal(torch.stack(diff[:4]), masked)  # large views change exactly where masked
    assert not torch.stack(diff[4:]).any() and not torch.stack([p.masked for p in params[4:]]).any()  # small: never


def test_masking_is_independent_per_view_and_image():
    masks = torch.ones(N, 1, 16, 16, dtype=torch.uint8)
    v = gen(mask_prob=0.5)(noise(N), masks, generator=torch.Generator().manual_seed(1))
    m = v.masked.float()  # (L, B)
    assert abs(m[0].mean() - 0.5) < 0.08 and abs((m[0] * m[1]).mean() - 0.25) < 0.06  # views independent
    assert abs(m.sum(0).eq(4).float().mean() - 1 / 16) < 0.03


# ---------------------------------------------------------------- crops
def test_two_images_in_one_batch_get_different_crops():
    images = noise(1, 64).expand(64, -1, -1, -1).contiguous()  # 64 copies of one image
    v = ViewGenerator(**SMALL)(images, generator=torch.Generator().manual_seed(0))
    for p, out in zip(v.large_params + v.small_params, v.large + v.small):
        assert len({tuple(b) for b in p.box.tolist()}) > 48  # not one crop for the batch
        assert not torch.equal(out[0], out[1])


@pytest.mark.parametrize("h, w, scale", [(256, 256, (0.08, 1.0)), (256, 256, (0.05, 0.14)), (96, 192, (0.08, 1.0)), (200, 100, (0.3, 0.6))])
def test_crop_boxes_follow_scale_and_ratio(h, w, scale):
    b = sample_crop_boxes(20_000, h, w, scale, (3 / 4, 4 / 3), generator=torch.Generator().manual_seed(0))
    x0, y0, bw, bh = b.unbind(1)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + bw <= w).all() and (y0 + bh <= h).all()
    assert torch.equal(b, b.round())
    frac, aspect = bw * bh / (h * w), bw / bh
    tol = 2 / min(h, w) * 3  # rounding of w and h to whole pixels
    assert frac.min() >= scale[0] - tol and frac.max() <= scale[1] + tol
    assert aspect.min() >= 3 / 4 - tol and aspect.max() <= 4 / 3 + tol
    assert frac.min() < scale[0] + 0.02  # the range is covered...
    if h == w: assert frac.max() > scale[1] - 0.1 and abs(aspect.log().median().item()) < 0.02  # ...and symmetric
    # offsets are uniform over the positions where the box fits
    rel = x0 / (w - bw).clamp_min(1)
    assert abs(rel[bw < w].mean().item() - 0.5) < 0.02


def test_small_crop_area_is_uniform():
    b = sample_crop_boxes(20_000, 256, 256, (0.05, 0.14), generator=torch.Generator().manual_seed(0))
    frac = (b[:, 2] * b[:, 3] / 256 ** 2).sort().values
    expected = torch.linspace(0.05, 0.14, 20_000)
    assert (frac - expected).abs().max() < 0.005  # the empirical quantiles of U(0.05, 0.14)


def test_crop_fallback_is_central():
    b = sample_crop_boxes(3, 64, 48, (0.99, 1.0), (2.0, 3.0))  # too wide to ever fit: the whole width, centred
    assert b.tolist() == [[0.0, 20.0, 48.0, 24.0]] * 3


def test_mask_and_image_stay_aligned_after_crop_and_flip():
    g = torch.Generator().manual_seed(0)
    blocks = torch.rand(64, 1, 8, 8, generator=g) < 0.5  # an 8 x 8 checker of random blocks, upsampled to 64 px
    masks = blocks.repeat_interleave(8, 2).repeat_interleave(8, 3).to(torch.uint8)
    images = (masks * 255).expand(-1, 3, -1, -1).contiguous()  # the image is its own mask
    v = ViewGenerator(large_size=32, small_size=16, **{**OFF, "flip_prob": 0.5})(images, masks, generator=g, return_masks=True)
    agree, misaligned = [], []
    for out, m, p in zip(v.large + v.small, v.large_masks + v.small_masks, v.large_params + v.small_params):
        agree.append(((out[:, 0:1] > 0.5) == m).float().mean())
        misaligned.append(((out[:, 0:1] > 0.5) == m.flip(-1)).float().mean())
        assert p.flip.any() and not p.flip.all()
    assert min(agree) > 0.97, agree  # only bicubic ringing at block edges disagrees
    assert max(misaligned) < 0.8, misaligned  # a mirrored mask would not pass


def test_masked_views_are_black_outside_the_mask():
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(64, 1, 32, 32, dtype=torch.uint8)
    masks[..., 8:24, 8:24] = 1
    images = noise(64, 32) // 2 + 64  # values in [64, 191]: bicubic never overshoots to 0
    v = ViewGenerator(large_size=16, small_size=8, **{**OFF, "mask_prob": 0.5})(images, masks, generator=g, return_masks=True)
    for out, m, p in zip(v.large, v.large_masks, v.large_params):
        bg = ~m.expand(-1, 3, -1, -1)
        zero = (out == 0) & bg
        on, off = p.masked, ~p.masked
        assert zero[on].sum() >= 0.8 * bg[on].sum()  # all but a rim (bicubic reads across the edge) is black
        assert zero[off].sum() == 0


# ---------------------------------------------------------------- outputs
def test_outputs_shapes_dtypes_range_and_no_grad():
    g = ViewGenerator(n_large=3, n_small=1, large_size=12, small_size=6)
    images = noise(5, 20)
    with torch.enable_grad():
        v = g(images, torch.ones(5, 1, 20, 20, dtype=torch.uint8), generator=torch.Generator().manual_seed(0))
    assert [tuple(t.shape) for t in v.large] == [(5, 3, 12, 12)] * 3 and [tuple(t.shape) for t in v.small] == [(5, 3, 6, 6)]
    for t in v.large + v.small:
        assert t.dtype == torch.float32 and not t.requires_grad and 0 <= t.min() and t.max() <= 1
    assert v.masked.shape == (3, 5) and v.masked.dtype == torch.bool
    assert v.large_masks is None  # only with return_masks=True


def test_non_square_images_and_bool_masks():
    images = noise(4, 24)[..., :20]  # (4, 3, 24, 20)
    masks = torch.ones(4, 1, 24, 20, dtype=torch.bool)
    v = ViewGenerator(**SMALL, mask_prob=1.0)(images.contiguous(), masks, generator=torch.Generator().manual_seed(0), return_masks=True)
    assert v.masked.all() and v.large_masks[0].dtype == torch.bool and v.large_masks[0].all()


# ---------------------------------------------------------------- grouped rendering
@pytest.mark.parametrize("fill", ["zeros", "swap"])
def test_views_rendered_together_equal_views_rendered_one_at_a_time(fill):
    "All the views of one size share their crop products and their colour ops; each must still be its own view."
    g = ViewGenerator(n_large=4, n_small=2, large_size=16, small_size=8, mask_prob=0.5, mask_fill=fill,
                      grayscale_prob=0.5, solarize_prob=(0.3, 0.5), blur_prob=(1.0, 0.5))
    images = noise(48, 32)
    masks = torch.zeros(48, 1, 32, 32, dtype=torch.uint8); masks[..., 6:26, 4:20] = 1
    v = g(images, masks, generator=torch.Generator().manual_seed(0))
    x = images.float() / 255
    x_m = remove_background(x, masks != 0, fill, torch.Generator().manual_seed(0))  # the generator's first draws
    assert v.masked.any() and not v.masked.all()
    for p, out in zip(v.large_params, v.large):
        one, _ = g.apply(x, p, 16, x_masked=x_m)
        assert torch.allclose(one, out, atol=1e-5), (one - out).abs().max()
    for p, out in zip(v.small_params, v.small):
        assert torch.allclose(g.apply(x, p, 8)[0], out, atol=1e-5)
    first = g.sample(48, 32, 32, True, 1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(first.box, g.sample_views(48, 32, 32, True, [1, 2], generator=torch.Generator().manual_seed(0))[0].box)


def test_crop_boxes_from_given_uniforms():
    u = torch.rand(5, 22, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_crop_boxes(5, 64, 64, u=u), sample_crop_boxes(5, 64, 64, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match=r"u must have shape \(5, 22\)"):
        sample_crop_boxes(5, 64, 64, u=u[:, :10])


# ---------------------------------------------------------------- reproducibility
def test_same_seed_same_views_different_seed_different():
    images, masks = noise(16), (torch.rand(16, 1, 16, 16, generator=torch.Generator().manual_seed(1)) < 0.5).to(torch.uint8)
    g = ViewGenerator(**SMALL, mask_prob=0.5, mask_fill="swap")
    a, b, c = (g(images, masks, generator=torch.Generator().manual_seed(s)) for s in (0, 0, 1))
    assert all(torch.equal(x, y) for x, y in zip(a.large + a.small, b.large + b.small))
    assert all(torch.equal(x.box, y.box) and torch.equal(x.masked, y.masked) for x, y in zip(a.large_params, b.large_params))
    assert not any(torch.equal(x, y) for x, y in zip(a.large + a.small, c.large + c.small))
    torch.manual_seed(3); d = g(images, masks)
    torch.manual_seed(3); e = g(images, masks)  # the global generator when none is given
    assert all(torch.equal(x, y) for x, y in zip(d.large + d.small, e.large + e.small))


# ---------------------------------------------------------------- background removal
def test_all_four_fills():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 16, 16, generator=g)
    fg = torch.zeros(6, 1, 16, 16, dtype=torch.bool); fg[..., 4:12, 4:12] = True
    bg3 = ~fg.expand(-1, 3, -1, -1)
    for fill in MASK_FILLS:
        out = remove_background(x, fg, fill, torch.Generator().manual_seed(0))
        assert torch.equal(out[~bg3], x[~bg3]), fill  # the foreground is untouched
        if fill == "zeros": assert (out[bg3] == 0).all()
        if fill == "mean": assert torch.allclose(out[:, :, 0, 0], x.mean((2, 3)))
        if fill == "random":
            col = out[:, :, 0, 0]
            assert torch.equal(out * bg3, col[..., None, None].expand_as(x) * bg3) and len(col.unique(dim=0)) == 6
        if fill == "swap":
            partner = swap_partners(6, torch.Generator().manual_seed(0))
            assert torch.equal(out[bg3], x[partner][bg3]) and (partner != torch.arange(6)).all()
        v = ViewGenerator(**SMALL, mask_prob=1.0, mask_fill=fill)((x * 255).to(torch.uint8), fg.to(torch.uint8))
        assert v.masked.all()
    assert sorted(swap_partners(7).tolist()) == list(range(7))


def test_small_or_absent_masks_are_never_used():
    n, side = 64, 64
    masks = torch.zeros(n, 1, side, side, dtype=torch.uint8)
    masks.view(n, -1)[:, :40] = 1  # 40 of 4096 pixels: under 1%
    masks.view(n, -1)[32:, 40] = 1  # images 32.. have 41 pixels: at least 1%
    has = torch.ones(n, dtype=torch.bool); has[48:] = False  # and images 48.. have no mask at all
    v = ViewGenerator(**SMALL, mask_prob=1.0)(noise(n, side), masks, has)
    assert not v.masked[:, :32].any() and v.masked[:, 32:48].all() and not v.masked[:, 48:].any()
    assert not ViewGenerator(**SMALL, mask_prob=1.0)(noise(n, side)).masked.any()  # no masks: nothing masked


def test_parameters_come_from_the_config():
    "The generator declares no parameter of its own: its defaults are ViewsConfig's, its overrides ViewsConfig's fields."
    assert ViewGenerator().cfg == ViewsConfig() and repr(ViewGenerator(ViewsConfig())) == repr(ViewGenerator())
    g = ViewGenerator(ViewsConfig(n_large=2, mask_fill="mean"), large_size=16)
    assert g.cfg == ViewsConfig(n_large=2, mask_fill="mean", large_size=16)
    assert (g.n_large, g.mask_fill, g.large_size) == (2, "mean", 16)  # read-only views of g.cfg
    with pytest.raises(AttributeError): g.mask_prob = 0.5
    cfg = ViewsConfig(); g = ViewGenerator(cfg); cfg.n_large = 7
    assert g.n_large == 4  # the generator keeps its own checked copy


def test_unknown_keyword_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"unknown config field views\.mask_probability \(did you mean 'mask_prob'\?\)"):
        ViewGenerator(mask_probability=0.5)
    with pytest.raises(TypeError, match="cfg must be a ViewsConfig or None"):
        ViewGenerator({"n_large": 2})


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("kw, name", [
    (dict(n_large=0), "n_large"), (dict(n_large=2.0), "n_large"), (dict(n_large=True), "n_large"), (dict(n_small=-1), "n_small"),
    (dict(large_size=0), "large_size"), (dict(small_size="sixteen"), "small_size"),
    (dict(large_scale=(0.0, 1.0)), "large_scale"), (dict(large_scale=(0.5, 0.2)), "large_scale"),
    (dict(small_scale=(0.1, 1.5)), "small_scale"), (dict(small_scale=0.1), "small_scale"), (dict(ratio=(0.0, 1.0)), "ratio"),
    (dict(ratio=(4 / 3, 3 / 4)), "ratio"), (dict(flip_prob=1.5), "flip_prob"), (dict(flip_prob=-0.1), "flip_prob"),
    (dict(jitter_prob=None), "jitter_prob"), (dict(brightness=-0.1), "brightness"), (dict(contrast=1.5), "contrast"),
    (dict(saturation=2.0), "saturation"), (dict(hue=0.6), "hue"), (dict(grayscale_prob="often"), "grayscale_prob"),
    (dict(blur_prob=(1.0,)), "blur_prob"), (dict(blur_prob=(1.2, 0.1)), "blur_prob"), (dict(blur_sigma=(0.0, 2.0)), "blur_sigma"),
    (dict(blur_sigma=(2.0, 0.1)), "blur_sigma"), (dict(solarize_prob=(0.0, -0.2)), "solarize_prob"), (dict(mask_prob=1.1), "mask_prob"),
    (dict(mask_fill="black"), "mask_fill"), (dict(min_mask_coverage=2), "min_mask_coverage"),
])
def test_bad_arguments_name_themselves(kw, name):
    "Checked once, at construction, by the config's own rules (`coerce` and `RANGES`): the message names the field."
    with pytest.raises(ConfigError, match=rf"^config field '?views\.{name}'? (must|expects)"):
        ViewGenerator(**kw)
    with pytest.raises(ConfigError, match=rf"views\.{name}"):
        ViewGenerator(ViewsConfig(**kw))  # a bad field of the config itself is caught too


U8 = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
M8 = torch.zeros(2, 1, 8, 8, dtype=torch.uint8)


@pytest.mark.parametrize("args, kwargs, match", [
    ((U8.float(),), {}, "images must be a uint8 tensor of shape"),
    ((U8[:, :1],), {}, "images must be a uint8 tensor of shape"),
    ((U8[0],), {}, "images must be a uint8 tensor of shape"),
    ((U8[:0],), {}, "images must be a uint8 tensor of shape"),
    ((U8.tolist(),), {}, "images must be a uint8 tensor of shape"),
    ((U8, M8[:, :, :4]), {}, r"masks must be None or a uint8/bool tensor of shape \(2, 1, 8, 8\)"),
    ((U8, M8[:1]), {}, r"masks must be None or a uint8/bool tensor of shape"),
    ((U8, M8.float()), {}, "masks must be None or a uint8/bool tensor"),
    ((U8, M8 + 7), {}, "masks must be binary"),
    ((U8, M8.clone().index_fill_(2, torch.tensor([0]), 1).index_fill_(2, torch.tensor([1]), 255)), {}, "masks must be binary"),
    ((U8,), dict(has_mask=torch.ones(2, dtype=torch.bool)), "has_mask given without masks"),
    ((U8, M8), dict(has_mask=torch.ones(3, dtype=torch.bool)), r"has_mask must be None or a bool tensor of shape \(2,\)"),
    ((U8, M8), dict(has_mask=torch.ones(2)), "has_mask must be None or a bool tensor"),
    ((U8,), dict(generator=0), "generator must be None or a torch.Generator"),
])
def test_bad_inputs_raise(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ViewGenerator(**SMALL)(*args, **kwargs)


def test_swap_needs_two_images():
    one = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="mask_fill='swap' needs a batch of at least 2 images"):
        ViewGenerator(**SMALL, mask_prob=0.5, mask_fill="swap")(one, torch.ones(1, 1, 8, 8, dtype=torch.uint8))
    ViewGenerator(**SMALL, mask_prob=0.0, mask_fill="swap")(one, torch.ones(1, 1, 8, 8, dtype=torch.uint8))  # no masking: fine


# ---------------------------------------------------------------- the benchmark script runs and reports
def test_benchmark_quick_output_is_well_formed():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "views.py"), "--quick", "--batch-size", "16", "--repeats", "1",
                          "--threads", "1"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 4 and lines[0].startswith("# views benchmark: batch 16 x 64 px, 4 large @ 32 px + 2 small @ 16 px")
    assert re.fullmatch(r"threads=1 batched relicv2\.views\.ViewGenerator: \d+ views/s \([\d.]+ ms per batch of 16\)", lines[1])
    assert re.fullmatch(r"threads=1 per-image torchvision\.transforms\.v2 loop: \d+ views/s \([\d.]+ ms per 16 images\)", lines[2])
    assert re.fullmatch(r"threads=1 speedup batched / per-image: [\d.]+x", lines[3])
