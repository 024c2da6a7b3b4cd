"LARS against a hand-computed update, the schedule's edge cases, parameter groups and bad input (relicv2.optim)."
import math

import pytest
import torch
from torch import nn

from relicv2.config import OptimConfig, preset
from relicv2.optim import (LARS, build_optimizer, lr_schedule, lr_schedule_from_config, optimizer_from_config,
                           param_groups, set_lr)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# ---------------------------------------------------------------- LARS, by hand

def _norm(v): return math.sqrt(sum(x * x for x in v))


def test_lars_matches_hand_computed_two_steps():
    "A weight of 2 elements (decayed, adapted) and a bias of 1 element (neither), two steps, in plain python math."
    lrs, mu, wd, eta = (0.5, 0.2), 0.9, 0.1, 0.01  # the rate changes between the steps, as under a schedule
    model = nn.Linear(2, 1).double()
    with torch.no_grad(): model.weight.copy_(torch.tensor([[3.0, 4.0]])); model.bias.fill_(0.5)
    opt = LARS(param_groups(model, weight_decay=wd), lr=1.0, momentum=mu, trust_coefficient=eta)
    grads = [([0.6, -0.8], [0.2]), ([-0.3, 0.1], [-0.4])]

    w, b, vw, vb = [3.0, 4.0], 0.5, [0.0, 0.0], 0.0
    for lr, (gw, gb) in zip(lrs, grads):
        model.weight.grad = torch.tensor([gw], dtype=torch.float64)
        model.bias.grad = torch.tensor(gb, dtype=torch.float64)
        set_lr(opt, lr)
        opt.step()
        gt = [g + wd * p for g, p in zip(gw, w)]  # weight decay on the weight only
        r = eta * _norm(w) / _norm(gt)  # trust ratio
        vw = [mu * v + r * g for v, g in zip(vw, gt)]
        w = [p - lr * v for p, v in zip(w, vw)]
        vb = mu * vb + gb[0]  # bias: plain SGD with momentum
        b = b - lr * vb
        assert opt.state[model.weight]["trust_ratio"].item() == pytest.approx(r, rel=1e-12)
        assert "trust_ratio" not in opt.state[model.bias]
        assert model.weight.detach().flatten().tolist() == pytest.approx(w, rel=1e-12)
        assert model.bias.item() == pytest.approx(b, rel=1e-12)
        if lr == lrs[0]:  # the first step in numbers: g~ = (0.9, -0.4), r = 0.01 * 5 / sqrt(0.97) = 0.0507673
            assert model.weight.detach().flatten().tolist() == pytest.approx([2.9771547, 4.0101535], abs=1e-7)
            assert model.bias.item() == pytest.approx(0.4)


def test_lars_gradients_are_not_modified():
    model = nn.Linear(3, 2)
    opt = LARS(param_groups(model, weight_decay=0.5), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))


@pytest.mark.parametrize("case", ["zero_param", "zero_grad"])
def test_trust_ratio_is_one_for_zero_norms(case):
    p = torch.zeros(3, 2) if case == "zero_param" else torch.ones(3, 2)
    p.requires_grad_(True)
    p.grad = torch.ones(3, 2) if case == "zero_param" else torch.zeros(3, 2)
    opt = LARS([p], lr=0.1)
    before = p.detach().clone()
    opt.step()
    assert opt.state[p]["trust_ratio"].item() == 1.0
    torch.testing.assert_close(p.detach(), before - 0.1 * p.grad)


def test_eps_enters_the_denominator():
    p = torch.tensor([3.0, 4.0], requires_grad=True)
    p.grad = torch.tensor([0.0, 2.0])
    opt = LARS([p], lr=0.1, trust_coefficient=0.1, eps=2.0)
    opt.step()
    assert opt.state[p]["trust_ratio"].item() == pytest.approx(0.1 * 5 / (2 + 2))


def test_params_without_grad_are_skipped():
    a, b = torch.ones(2, 2, requires_grad=True), torch.ones(2, 2, requires_grad=True)
    a.grad = torch.ones(2, 2)
    opt = LARS([a, b], lr=0.1)
    opt.step()
    assert torch.equal(b.detach(), torch.ones(2, 2)) and len(opt.state[b]) == 0


def test_closure_is_evaluated_and_returned():
    model = nn.Linear(2, 1)
    opt = LARS(model.parameters(), lr=0.1)
    x = torch.randn(4, 2)
    def closure():
        opt.zero_grad(); loss = model(x).square().mean(); loss.backward(); return loss
    loss = opt.step(closure)
    assert torch.is_tensor(loss) and model.weight.grad is not None


def test_state_dict_round_trip_continues_identically():
    def run(resume):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
        opt = LARS(param_groups(model, 1e-3), lr=0.3)
        x = torch.randn(8, 3)
        for i in range(4):
            if resume and i == 2:
                sd_m, sd_o = model.state_dict(), opt.state_dict()
                model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)); model.load_state_dict(sd_m)
                opt = LARS(param_groups(model, 1e-3), lr=0.3); opt.load_state_dict(sd_o)
            opt.zero_grad(); model(x).square().mean().backward(); opt.step()
        return [p.detach() for p in model.parameters()]
    for a, b in zip(run(False), run(True)): assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_lars_on_device_keeps_state_there(device):
    model = nn.Linear(3, 2).to(device)
    opt = LARS(param_groups(model, 1e-4), lr=0.1)
    model(torch.randn(4, 3, device=device)).sum().backward()
    opt.step()
    for p in model.parameters():
        assert all(t.device == p.device for t in opt.state[p].values())


def test_sparse_gradients_refused():
    emb = nn.Embedding(5, 3, sparse=True)
    opt = LARS(emb.parameters(), lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"): opt.step()


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-0.1), "lr must be a float >= 0"),
    (dict(lr=float("nan")), "lr"),
    (dict(lr=0.1, momentum=1.0), r"momentum must be a float in \[0, 1\)"),
    (dict(lr=0.1, momentum=-0.1), "momentum"),
    (dict(lr=0.1, weight_decay=-1e-6), "weight_decay"),
    (dict(lr=0.1, trust_coefficient=0.0), "trust_coefficient must be a float > 0"),
    (dict(lr=0.1, eps=-1.0), "eps"),
    (dict(lr=0.1, lars_exclude="yes"), "lars_exclude must be a bool"),
    (dict(lr="0.1"), "lr"),
])
def test_lars_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match): LARS([torch.zeros(2, requires_grad=True)], **kwargs)


def test_lars_bad_group_override():
    with pytest.raises(ValueError, match="weight_decay"):
        LARS([{"params": [torch.zeros(2, requires_grad=True)], "weight_decay": -1.0}], lr=0.1)


# ---------------------------------------------------------------- param_groups

def test_param_groups_split_by_module_type_and_name():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4), nn.GroupNorm(2, 4), nn.InstanceNorm2d(4, affine=True),
                          nn.Flatten(), nn.Linear(16, 8), nn.LayerNorm(8), nn.Linear(8, 2, bias=False))
    adapted, excluded = param_groups(model, weight_decay=1e-5)
    assert adapted["param_names"] == ["0.weight", "5.weight", "7.weight"]
    assert excluded["param_names"] == ["0.bias", "1.weight", "1.bias", "2.weight", "2.bias", "3.weight", "3.bias",
                                       "5.bias", "6.weight", "6.bias"]
    assert (adapted["weight_decay"], adapted["lars_exclude"]) == (1e-5, False)
    assert (excluded["weight_decay"], excluded["lars_exclude"]) == (0.0, True)


def test_param_groups_one_dimensional_unknown_params_are_excluded():
    class Scale(nn.Module):
        def __init__(self): super().__init__(); self.gain = nn.Parameter(torch.ones(4)); self.temp = nn.Parameter(torch.tensor(1.0))
    adapted_names = [n for g in param_groups(nn.Sequential(nn.Linear(4, 4), Scale()), 0.1) if not g["lars_exclude"] for n in g["param_names"]]
    assert adapted_names == ["0.weight"]


def test_param_groups_skip_frozen_and_shared_and_accept_lists():
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    b.weight = a.weight  # shared: counted once
    frozen = nn.Linear(3, 3).requires_grad_(False)
    groups = param_groups([a, b, frozen], 0.0)
    names = [n for g in groups for n in g["param_names"]]
    assert names == ["0.weight", "0.bias", "1.bias"]


def test_param_groups_drops_an_empty_group():
    groups = param_groups(nn.Linear(3, 3, bias=False), 0.1)
    assert len(groups) == 1 and groups[0]["lars_exclude"] is False


@pytest.mark.parametrize("model, wd, err, match", [
    (nn.Linear(2, 2), -0.1, ValueError, "weight_decay must be a float >= 0"),
    (nn.Linear(2, 2), float("inf"), ValueError, "weight_decay"),
    (nn.Linear(2, 2).requires_grad_(False), 0.1, ValueError, "no trainable parameters"),
    (nn.ReLU(), 0.1, ValueError, "no trainable parameters"),
    ([], 0.1, TypeError, "model must be an nn.Module"),
    ("model", 0.1, TypeError, "model must be an nn.Module"),
])
def test_param_groups_bad_input(model, wd, err, match):
    with pytest.raises(err, match=match): param_groups(model, wd)


# ---------------------------------------------------------------- schedule

def test_schedule_shape_warmup_peak_and_end():
    K, W, base, B = 200, 20, 0.3, 512
    s = lr_schedule(base, B, K, W)
    peak = base * B / 256
    assert s.shape == (K,) and s.dtype == torch.float64
    assert s[0].item() == 0.0
    assert s[W - 1].item() == pytest.approx(peak * (W - 1) / W)  # last warm-up step
    assert s[W].item() == pytest.approx(peak) and s.max().item() == pytest.approx(peak)
    mid = W + (K - 1 - W) / 2  # the cosine runs from W to the last step K - 1
    assert s[int(mid)].item() == pytest.approx(peak * (1 + math.cos(math.pi * (int(mid) - W) / (K - 1 - W))) / 2)
    assert s[-1].item() == pytest.approx(0.0, abs=1e-12)  # the last step runs at final_lr
    assert (s[: W + 1].diff() > 0).all() and (s[W:].diff() < 0).all()


def test_schedule_final_lr():
    s = lr_schedule(0.1, 256, 1000, 0, final_lr=0.01)
    assert s[0].item() == pytest.approx(0.1)  # no warm-up: starts at the peak
    assert s[-1].item() == pytest.approx(0.01, abs=1e-6) and s.min().item() >= 0.01


def test_schedule_all_warmup_and_single_step():
    s = lr_schedule(0.2, 256, 5, 5)
    assert s.tolist() == pytest.approx([0.0, 0.04, 0.08, 0.12, 0.16])
    assert lr_schedule(0.2, 256, 1, 0).tolist() == pytest.approx([0.2])


@pytest.mark.parametrize("kwargs, match", [
    (dict(base_lr=0.0), "base_lr must be a float > 0"),
    (dict(base_lr=-1.0), "base_lr"),
    (dict(base_lr=float("nan")), "base_lr"),
    (dict(batch_size=0), "batch_size must be an int >= 1"),
    (dict(batch_size=256.0), "batch_size"),
    (dict(total_steps=0), "total_steps must be an int >= 1"),
    (dict(warmup_steps=-1), r"warmup_steps must be an int in \[0, total_steps=100\]"),
    (dict(warmup_steps=101), "warmup_steps"),
    (dict(warmup_steps=2.5), "warmup_steps"),
    (dict(final_lr=-0.1), "final_lr"),
    (dict(final_lr=0.5), r"final_lr must be a float in \[0, base_lr \* batch_size / 256 = 0.2\]"),
])
def test_schedule_bad_input(kwargs, match):
    args = dict(base_lr=0.2, batch_size=256, total_steps=100, warmup_steps=10) | kwargs
    with pytest.raises(ValueError, match=match): lr_schedule(**args)


def test_set_lr_all_groups_and_bad_value():
    opt = build_optimizer(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), "sgd", lr=0.1)
    set_lr(opt, torch.tensor(0.25, dtype=torch.float64))
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.25] and isinstance(opt.param_groups[0]["lr"], float)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="lr must be a float >= 0"): set_lr(opt, bad)


def test_set_lr_changes_the_lars_step():
    p = torch.tensor([1.0, 0.0], requires_grad=True)
    opt = LARS([p], lr=1.0, momentum=0.0, lars_exclude=True)
    set_lr(opt, 0.5)
    p.grad = torch.tensor([1.0, 1.0]); opt.step()
    assert p.detach().tolist() == [0.5, -0.5]


# ---------------------------------------------------------------- factory and config

def test_build_optimizer_kinds_and_hyperparameters():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    lars = build_optimizer(model, "lars", lr=0.1, weight_decay=1e-6, momentum=0.8, trust_coefficient=0.02)
    assert isinstance(lars, LARS) and lars.param_groups[0]["trust_coefficient"] == 0.02 and lars.param_groups[0]["momentum"] == 0.8
    sgd = build_optimizer(model, "sgd", lr=0.1, weight_decay=1e-6, momentum=0.8)
    assert isinstance(sgd, torch.optim.SGD) and [g["weight_decay"] for g in sgd.param_groups] == [1e-6, 0.0]
    adamw = build_optimizer(model, "adamw", lr=0.1, weight_decay=0.05, momentum=0.85)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["betas"] == (0.85, 0.999)
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.05, 0.0]  # not AdamW's default 0.01


@pytest.mark.parametrize("name", ["lars", "sgd", "adamw"])
def test_every_optimizer_steps_and_round_trips(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    opt = build_optimizer(model, name, lr=0.05, weight_decay=1e-4)
    x = torch.randn(16, 3)
    losses = []
    for _ in range(5):
        opt.zero_grad(); loss = model(x).square().mean(); loss.backward(); opt.step(); losses.append(loss.item())
    assert losses[-1] < losses[0]
    fresh = build_optimizer(model, name, lr=0.05, weight_decay=1e-4)
    fresh.load_state_dict(opt.state_dict())
    assert [g["param_names"] for g in fresh.param_groups] == [g["param_names"] for g in opt.param_groups]


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="adam"), "optimizer name must be one of lars, sgd, adamw; got 'adam'"),
    (dict(name="LARS"), "one of lars, sgd, adamw"),
    (dict(name="sgd", momentum=1.0), "momentum"),
    (dict(name="adamw", momentum=-0.5), "momentum"),
    (dict(name="lars", momentum=1.5), "momentum"),
    (dict(name="lars", weight_decay=-1.0), "weight_decay"),
])
def test_build_optimizer_bad_input(kwargs, match):
    args = dict(name="lars", lr=0.1) | kwargs
    with pytest.raises(ValueError, match=match): build_optimizer(nn.Linear(2, 2), **args)


@pytest.mark.parametrize("name", ["tiny", "demo", "paper", "fashion-mnist"])
def test_from_config_presets(name):
    cfg = preset(name)
    opt = optimizer_from_config(cfg.optim, nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)))
    assert isinstance(opt, LARS) and opt.param_groups[0]["weight_decay"] == cfg.optim.weight_decay
    s = lr_schedule_from_config(cfg.optim, cfg.train.batch_size, steps_per_epoch=7, epochs=cfg.train.epochs)
    assert len(s) == 7 * cfg.train.epochs
    assert s.max().item() == pytest.approx(cfg.optim.base_lr * cfg.train.batch_size / 256)
    warm = round(cfg.optim.warmup_fraction * 7 * cfg.train.epochs)
    assert s.argmax().item() == warm


@pytest.mark.parametrize("epochs", [1, 2, 3, 10, 1000])
@pytest.mark.parametrize("fraction", [0.0, 0.05, 0.1, 0.5, 1.0])
def test_schedule_shape_for_any_epochs(epochs, fraction):
    "Warm-up is the same share of the run whatever the epochs; the last step runs at final_lr (0); length = epochs x steps."
    spe = 13
    s = lr_schedule_from_config(OptimConfig(base_lr=0.4, warmup_fraction=fraction), 512, spe, epochs)
    K, W, peak = epochs * spe, round(fraction * epochs * spe), 0.4 * 512 / 256
    assert len(s) == K and s[0].item() == (peak if W == 0 else 0.0)
    assert (s[:W + 1].diff() > 0).all() if W < K else (s.diff() > 0).all()
    if W < K:
        assert s[W].item() == pytest.approx(peak) and (s[W:].diff() < 0).all() and s[-1].item() == pytest.approx(0.0, abs=1e-12)


def test_schedule_single_step_and_half_point():
    assert lr_schedule(1.0, 256, 1, 0).tolist() == [1.0]  # a one-step run: the peak (no room for a cosine)
    s = lr_schedule(1.0, 256, 21, 0)
    assert s[10].item() == pytest.approx(0.5) and s[20].item() == pytest.approx(0.0, abs=1e-12)


def test_schedule_from_config_rounds_warmup_and_checks():
    cfg = OptimConfig(base_lr=0.2, warmup_fraction=0.25)
    s = lr_schedule_from_config(cfg, 256, steps_per_epoch=9, epochs=2)
    assert s.argmax().item() == 4  # round(4.5) = 4, Python's banker's rounding
    for bad in (1.5, -0.1, True):
        with pytest.raises(ValueError, match=r"optim.warmup_fraction must be a float in \[0, 1\]"):
            lr_schedule_from_config(OptimConfig(warmup_fraction=bad), 256, 9, 2)
    with pytest.raises(ValueError, match="steps_per_epoch"): lr_schedule_from_config(cfg, 256, 0, 2)
    with pytest.raises(ValueError, match="epochs must be an int"): lr_schedule_from_config(cfg, 256, 9, 0)


def test_excluded_lr_scale():
    from relicv2.optim import set_lr
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    for name in ("lars", "sgd", "adamw"):
        opt = build_optimizer(m, name, lr=1.0, excluded_lr_scale=0.25)
        set_lr(opt, 0.8)
        assert [g["lr"] for g in opt.param_groups] == [0.8, pytest.approx(0.2)]
    with pytest.raises(ValueError, match="optim.excluded_lr_scale must be a float >= 0"): build_optimizer(m, "lars", lr=1.0, excluded_lr_scale=-1)
