"""Edge cases of relicv2.encoder that read badly on a page: torchvision name/shape equality for every arch, export
round trips, the bad-input matrix, zero-init, channels_last in training, multi-crop grouping."""
import math

import pytest
import torch
import torchvision
from torch import nn

from relicv2.config import EncoderConfig, HeadConfig, preset
from relicv2.encoder import LAYOUTS, TORCHVISION_ARCHS, BasicBlock, Bottleneck, ResNet, export_torchvision, resnet
from relicv2.networks import MLPHead, OnlineNetwork, TargetNetwork, build_networks, multicrop_forward
from relicv2.target import make_target


def shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


# ---------------------------------------------------------------- torchvision layout
@pytest.mark.parametrize("arch", TORCHVISION_ARCHS)
def test_state_dict_matches_torchvision(arch):
    with torch.device("meta"):
        ours, tv = resnet(arch), getattr(torchvision.models, arch)()
    want = {k: s for k, s in shapes(tv.state_dict()).items() if not k.startswith("fc.")}
    assert shapes(ours.state_dict()) == want
    assert list(ours.state_dict()) == list(want)  # same order too
    assert ours.feat_dim == tv.fc.in_features
    assert {"mean", "std"} <= {k for k, _ in ours.named_buffers()}  # buffers, but not in the state dict


def test_resnet200_layout():
    with torch.device("meta"):
        m = resnet("resnet200")
    assert [len(getattr(m, f"layer{i}")) for i in range(1, 5)] == [3, 24, 36, 3]
    assert m.feat_dim == 2048 and all(isinstance(b, Bottleneck) for b in m.layer3)


@pytest.mark.parametrize("arch,width,small", [("resnet18", 0.0625, True), ("resnet34", 0.3, False),
                                              ("resnet50", 0.0625, True), ("resnet50", 0.1, False)])
def test_feat_dim_matches_output(arch, width, small):
    torch.manual_seed(0)
    m = resnet(arch, width, small_stem=small).eval()
    with torch.no_grad():
        y = m(torch.rand(2, 3, 16, 16))
    assert y.shape == (2, m.feat_dim)
    block = LAYOUTS[arch][0]
    assert m.feat_dim == block.expansion * max(1, round(512 * width))
    assert m.conv1.out_channels == max(1, round(64 * width))  # the stem is widened too


def test_width_scales_every_layer():
    with torch.device("meta"):
        s1, s2 = shapes(resnet("resnet50", 1).state_dict()), shapes(resnet("resnet50", 2).state_dict())
    for k, s in s1.items():  # every channel dimension doubles, stem included; only the RGB input stays 3
        if k.endswith("num_batches_tracked"):
            continue
        want = (2 * s[0],) if len(s) == 1 else (2 * s[0], s[1] if k == "conv1.weight" else 2 * s[1], *s[2:])
        assert s2[k] == want, k


# ---------------------------------------------------------------- export
def _randomise_bn(m, g):
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            n = mod.num_features
            mod.running_mean.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
            mod.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            mod.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            mod.bias.data.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_export_loads_strictly_and_gives_identical_features(arch):
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    ours = resnet(arch, zero_init_residual=True)  # a flag torchvision can express (it only changes the init)
    _randomise_bn(ours, g)
    sd = export_torchvision(ours)
    if arch == "resnet18":  # memory format is no obstacle to export (checked once: building models costs time)
        nhwc = resnet(arch, channels_last=True)
        nhwc.load_state_dict(ours.state_dict())
        assert all(torch.equal(v, sd[k]) for k, v in export_torchvision(nhwc).items())
    assert "fc.weight" not in sd and "mean" not in sd and all(v.is_contiguous() for v in sd.values())
    tv = getattr(torchvision.models, arch)(weights=None)
    tv.fc = nn.Identity()
    tv.load_state_dict(sd, strict=True)
    x = torch.rand(2, 3, 64, 64, generator=g)
    with torch.no_grad():
        a, b = ours.eval()(x), tv.eval()(ours.normalize(x))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # a copy: training the encoder afterwards does not change the export
        ours.conv1.weight.add_(1.0)
    assert not torch.equal(sd["conv1.weight"], ours.conv1.weight)


@pytest.mark.parametrize("kw,msg", [(dict(arch="resnet200"), "encoder.arch"), (dict(width=2.0), "encoder.width"),
                                    (dict(width=0.5), "encoder.width"), (dict(small_stem=True), "encoder.small_stem")])
def test_export_refuses_what_torchvision_cannot_express(kw, msg):
    with torch.device("meta"):
        enc = resnet(**{"arch": "resnet50", **kw})
    with pytest.raises(ValueError, match=msg):
        export_torchvision(enc)


def test_export_refuses_non_encoder():
    online, _ = build_networks(preset("tiny").encoder, preset("tiny").heads)
    with pytest.raises(TypeError, match="online.encoder"):
        export_torchvision(online)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("arch", ["resnet99", "ResNet50", "resnet", "", 50, None])
def test_bad_arch(arch):
    with pytest.raises(ValueError, match=r"arch must be one of resnet18, resnet34, resnet50, resnet101, resnet152, resnet200"):
        resnet(arch)


@pytest.mark.parametrize("width", [0, -1, 0.0, -0.5, math.nan, math.inf, "2", True, None])
def test_bad_width(width):
    with pytest.raises(ValueError, match="width must be a finite number > 0"):
        resnet("resnet18", width)


@pytest.mark.parametrize("x,err,msg", [
    (torch.rand(2, 1, 16, 16), ValueError, r"\(B, 3, H, W\)"),
    (torch.rand(3, 16, 16), ValueError, r"\(B, 3, H, W\)"),
    (torch.rand(2, 16, 16, 3), ValueError, r"got \(2, 16, 16, 3\)"),
    (torch.zeros(2, 3, 16, 16, dtype=torch.uint8), TypeError, "must be float"),
    ([[0.0]], ValueError, "got list"),
])
def test_bad_images(x, err, msg):
    enc = resnet("resnet18", 0.0625, small_stem=True)
    with pytest.raises(err, match=msg):
        enc(x)


@pytest.mark.parametrize("dims,name", [((0, 4, 4), "in_dim"), ((4, -1, 4), "hidden_dim"), ((4, 4, 2.0), "out_dim"),
                                       ((True, 4, 4), "in_dim")])
def test_bad_head_dims(dims, name):
    with pytest.raises(ValueError, match=f"{name} must be a positive int"):
        MLPHead(*dims)


@pytest.mark.parametrize("views", [[], torch.rand(2, 3, 8, 8), [torch.rand(3, 8, 8)], [torch.rand(2, 3, 8, 8), "x"]])
def test_bad_views(views):
    with pytest.raises(ValueError, match="views must be a non-empty list"):
        multicrop_forward(lambda x: x, views)


# ---------------------------------------------------------------- zero-init
@pytest.mark.parametrize("arch,n_blocks", [("resnet18", 8), ("resnet50", 16)])
def test_zero_init_residual(arch, n_blocks):
    zero, plain = resnet(arch, 0.0625, zero_init_residual=True), resnet(arch, 0.0625)
    blocks = [m for m in zero.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    assert len(blocks) == n_blocks
    last = {id(b.last_bn) for b in blocks}
    assert all(b.last_bn is (b.bn2 if isinstance(b, BasicBlock) else b.bn3) for b in blocks)
    for m in zero.modules():  # exactly the last BN scale of each block is zero; shifts stay zero, others one
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == (0.0 if id(m) in last else 1.0)) and torch.all(m.bias == 0)
    assert all(torch.all(m.weight == 1) for m in plain.modules() if isinstance(m, nn.BatchNorm2d))


# ---------------------------------------------------------------- channels_last
def test_channels_last_training_step_matches():
    torch.manual_seed(0)
    a = resnet("resnet50", 0.0625, small_stem=True)
    b = resnet("resnet50", 0.0625, small_stem=True, channels_last=True)
    b.load_state_dict(a.state_dict())
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in b.parameters() if p.ndim == 4)
    x = torch.rand(4, 3, 16, 16)  # contiguous input: the encoder converts it
    ya, yb = a.train()(x), b.train()(x)
    torch.testing.assert_close(ya, yb, rtol=1e-3, atol=1e-3)  # kernels sum in another order: float rounding only
    ya.square().sum().backward()
    yb.square().sum().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert (pa.grad - pb.grad).norm() <= 1e-2 * pa.grad.norm() + 1e-6, n  # narrow BN amplifies rounding
    for ma, mb in zip(a.modules(), b.modules()):  # running statistics updated alike
        if isinstance(ma, nn.BatchNorm2d):
            torch.testing.assert_close(ma.running_var, mb.running_var, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- multi-crop
def test_multicrop_interleaved_sizes_and_batches():
    calls = []

    def fn(x):
        calls.append(tuple(x.shape))
        return x.mean((2, 3)) * 2 + x.shape[-1]  # per-sample, size-dependent

    g = torch.Generator().manual_seed(0)
    views = [torch.rand(b, 3, s, s, generator=g) for b, s in [(4, 16), (4, 8), (2, 16), (4, 8), (4, 12)]]
    out = multicrop_forward(fn, views)
    assert calls == [(6, 3, 16, 16), (8, 3, 8, 8), (4, 3, 12, 12)]  # one call per size, first-seen order
    for y, v in zip(out, views):
        torch.testing.assert_close(y, fn(v))
    calls.clear()
    multicrop_forward(fn, views, group=False)
    assert len(calls) == len(views)


def test_network_list_forward_is_one_module_call():
    """A list of views goes through one call of the module (one DDP forward), and group=False runs views apart."""
    cfg = preset("tiny")
    torch.manual_seed(0)
    online, target = build_networks(cfg.encoder, cfg.heads)
    n_calls, enc_calls = [], []
    online.register_forward_hook(lambda m, i, o: n_calls.append(1))
    online.encoder.register_forward_hook(lambda m, i, o: enc_calls.append(1))
    views = [torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16), torch.rand(2, 3, 8, 8)]
    out = online(views)
    assert (len(n_calls), len(enc_calls), len(out)) == (1, 2, 3)
    online(views, group=False)
    assert (len(n_calls), len(enc_calls)) == (2, 5)
    assert isinstance(target(views[0]), torch.Tensor) and len(target(views, group=False)) == 3


def test_multicrop_online_target_grads_and_equivalence():
    cfg = preset("tiny")
    torch.manual_seed(0)
    online, target = build_networks(cfg.encoder, cfg.heads)
    views = [torch.rand(4, 3, 16, 16), torch.rand(4, 3, 8, 8), torch.rand(4, 3, 16, 16)]
    online.eval(), target.eval()
    o = online(views)
    z = online(views, predict=False)
    t = target(views[::2])
    for y, v in zip(o, views):
        torch.testing.assert_close(y, online(v), rtol=1e-5, atol=1e-5)
    for y, v in zip(t, views[::2]):  # the target starts as an exact copy of the online encoder + projector
        torch.testing.assert_close(y, online(v, predict=False), rtol=1e-5, atol=1e-5)
    assert o[0].shape == (4, cfg.heads.projector_out) and z[1].shape == (4, cfg.heads.projector_out)
    sum(y.sum() for y in o).backward()
    assert all(p.grad is not None for p in online.parameters())
    assert all(p.grad is None and not p.requires_grad for p in target.parameters())
    assert not t[0].requires_grad


# ---------------------------------------------------------------- building from the config
def test_target_copy_drops_grads():
    cfg = preset("tiny")
    online, _ = build_networks(cfg.encoder, cfg.heads)
    online(torch.rand(4, 3, 16, 16)).sum().backward()
    target = make_target(online.without_predictor())
    assert all(p.grad is None and not p.requires_grad for p in target.parameters())
    assert all(p.grad is not None and p.requires_grad for p in online.parameters())


def test_build_networks_reads_config():
    enc_cfg = EncoderConfig(arch="resnet34", width=0.125, small_stem=True, zero_init_residual=True)
    heads = HeadConfig(projector_hidden=24, projector_out=8, predictor_hidden=12)
    online, target = build_networks(enc_cfg, heads)
    assert isinstance(online, OnlineNetwork) and isinstance(target, TargetNetwork)
    e = online.encoder
    assert (e.arch, e.width, e.small_stem, e.feat_dim) == ("resnet34", 0.125, True, 64)
    assert (e.layer1[0].bn2.weight == 0).all()
    assert [(h.in_dim, h.hidden_dim, h.out_dim) for h in (online.projector, online.predictor)] == [(64, 24, 8), (8, 12, 8)]
    assert online.projector[3].bias is None and online.projector[0].bias is not None  # BYOL's head
    names = [n for n, _ in online.named_parameters() if not n.startswith("predictor.")]
    assert [n for n, _ in target.named_parameters()] == names  # pairable by name for the EMA
    half = online.without_predictor()
    assert [n for n, _ in half.named_parameters()] == names and [n for n, _ in half.named_buffers()] == [
        n for n, _ in target.named_buffers()]
    assert all(p is q for p, q in zip(half.parameters(), online.parameters()))  # shared, not copied
    assert all(torch.equal(target.state_dict()[k], v) for k, v in online.state_dict().items() if not k.startswith("predictor."))
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(target.parameters(), online.parameters()))  # a copy


@pytest.mark.parametrize("arch, width, small_stem", [("resnet50", 0.125, False), ("resnet200", 0.0625, True), ("resnet34", 0.25, True)])
def test_torchvision_resnet_takes_any_encoder_strictly(arch, width, small_stem):
    import torchvision
    from relicv2.encoder import torchvision_resnet
    torch.manual_seed(0)
    enc = resnet(arch, width, small_stem).eval()
    tv = torchvision_resnet(arch, width, small_stem, state_dict=enc.state_dict()).eval()
    assert isinstance(tv, torchvision.models.resnet.ResNet)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(tv(enc.normalize(x)), enc(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kernel,stride", [(1, 2), (3, 1), (3, 2), (7, 2), (3, 3), (5, 2)])
def test_same_padding_keeps_ceil_size_and_matches_explicit_pad(kernel, stride):
    from relicv2.encoder import same_pads, same_padding
    import torch.nn.functional as F
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, kernel, stride=stride, padding=kernel // 2, bias=True)
    w, b = conv.weight.detach().clone(), conv.bias.detach().clone()
    if stride > 1: same_padding(conv)
    pool = same_padding(nn.MaxPool2d(kernel, stride, padding=kernel // 2 if kernel > 1 else 0))
    for n in range(1, 20):
        x = torch.randn(1, 2, n, n + 1)
        (t, bo), (l, r) = same_pads(n, kernel, stride), same_pads(n + 1, kernel, stride)
        assert t + bo == max((-(-n // stride) - 1) * stride + kernel - n, 0) and 0 <= bo - t <= 1
        with torch.no_grad():
            y = conv(x)
            assert y.shape[-2:] == (-(-n // stride), -(-(n + 1) // stride))
            torch.testing.assert_close(y, F.conv2d(F.pad(x, (l, r, t, bo)), w, b, stride))
            if stride > 1:
                torch.testing.assert_close(pool(x), F.max_pool2d(F.pad(x, (l, r, t, bo), value=float("-inf")), kernel, stride))


def test_padding_and_shortcut_options_reach_the_network():
    enc_cfg = EncoderConfig(arch="resnet18", width=0.125, padding="same", shortcut="every_stage")
    online, target = build_networks(enc_cfg, HeadConfig(16, 8, 16))
    from relicv2.encoder import SameConv2d, SameMaxPool2d
    for enc in (online.encoder, target.encoder):
        assert type(enc.conv1) is SameConv2d and type(enc.maxpool) is SameMaxPool2d
        assert type(enc.layer2[0].conv1) is SameConv2d and type(enc.layer1[0].conv1) is nn.Conv2d  # stride 1 untouched
        assert enc.layer1[0].downsample is not None
    x = torch.rand(4, 3, 32, 32)
    online(x).sum().backward()
    assert online.encoder.conv1.weight.grad is not None and online.encoder.conv1.weight.grad.abs().sum() > 0
    assert "padding='same'" in repr(online.encoder) and "shortcut='every_stage'" in repr(online.encoder)


@pytest.mark.parametrize("kw,msg", [({"padding": "valid"}, "padding must be one of torch, same"),
                                    ({"shortcut": "always"}, "shortcut must be one of when_needed, every_stage")])
def test_bad_padding_or_shortcut(kw, msg):
    with pytest.raises(ValueError, match=msg): resnet("resnet18", 0.0625, **kw)
