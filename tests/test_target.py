"Edge cases and bad input for the EMA target network (relicv2.target)."
import math

import pytest
import torch
from torch import nn

from relicv2.target import ema_momentum, make_target, momentum_schedule, update_target

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _net(seed=0, device="cpu", dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3)).to(device, dtype)


def _online_with_grads(device="cpu", dtype=torch.float32):
    online = _net(1, device, dtype)
    online(torch.randn(8, 5, device=device, dtype=dtype)).square().sum().backward()
    assert all(p.grad is not None and p.requires_grad for p in online.parameters())
    return online


def _params(m):
    return [p.detach().clone() for p in m.parameters()]


# ---------------------------------------------------------------- schedule

def test_schedule_matches_scalar_formula():
    K, base = 37, 0.99
    s = momentum_schedule(K, base)
    assert s.dtype == torch.float64 and s.shape == (K,)
    for k in range(K):
        expected = 1 - (1 - base) * (math.cos(math.pi * k / K) + 1) / 2
        assert s[k].item() == pytest.approx(expected, abs=1e-15)
        assert ema_momentum(k, K, base) == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize("base_momentum", [0.0, 0.5, 1.0])
def test_schedule_extremes(base_momentum):
    s = momentum_schedule(10, base_momentum)
    assert s[0].item() == pytest.approx(base_momentum)
    assert ema_momentum(10, 10, base_momentum) == 1.0
    assert (s.diff() >= 0).all()
    if base_momentum == 1.0: assert (s == 1.0).all()


def test_schedule_single_step():
    assert momentum_schedule(1, 0.9).tolist() == [pytest.approx(0.9)]


@pytest.mark.parametrize("kwargs, match", [
    (dict(step=0, total_steps=0), "total_steps"),
    (dict(step=0, total_steps=2.0), "total_steps"),
    (dict(step=0, total_steps=True), "total_steps"),
    (dict(step=-1, total_steps=10), "step"),
    (dict(step=11, total_steps=10), "step"),
    (dict(step=1.5, total_steps=10), "step"),
    (dict(step=0, total_steps=10, base_momentum=1.1), "base_momentum"),
    (dict(step=0, total_steps=10, base_momentum=-0.1), "base_momentum"),
    (dict(step=0, total_steps=10, base_momentum=float("nan")), "base_momentum"),
    (dict(step=0, total_steps=10, base_momentum="0.99"), "base_momentum"),
])
def test_ema_momentum_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match): ema_momentum(**kwargs)


@pytest.mark.parametrize("args, match", [((0,), "total_steps"), ((-3,), "total_steps"), ((10, 2.0), "base_momentum")])
def test_momentum_schedule_bad_input(args, match):
    with pytest.raises(ValueError, match=match): momentum_schedule(*args)


# ---------------------------------------------------------------- make_target

def test_make_target_is_frozen_independent_copy():
    online = _online_with_grads()
    target = make_target(online)
    for p, q in zip(online.parameters(), target.parameters()):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr()
        assert not q.requires_grad and q.grad is None
        assert p.requires_grad and p.grad is not None  # the online network is untouched
    for a, b in zip(online.buffers(), target.buffers()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    with torch.no_grad(): next(online.parameters()).add_(1.0)
    assert not torch.equal(next(online.parameters()), next(target.parameters()))


def test_make_target_rejects_non_module():
    with pytest.raises(TypeError, match="online"): make_target(torch.zeros(3))


# ---------------------------------------------------------------- update_target

@pytest.mark.parametrize("device", DEVICES)
def test_momentum_one_leaves_target_bit_for_bit(device):
    target, online = make_target(_net(0, device)), _online_with_grads(device)
    before = _params(target)
    update_target(target, online, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, target.parameters()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_momentum_zero_copies_online_exactly(device, dtype):
    target, online = make_target(_net(0, device, dtype)), _online_with_grads(device, dtype)
    update_target(target, online, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(target.parameters(), online.parameters()))


@pytest.mark.parametrize("device", DEVICES)
def test_momentum_half_is_the_average(device):
    target, online = make_target(_net(0, device)), _online_with_grads(device)
    expected = [(a + b) / 2 for a, b in zip(_params(target), _params(online))]
    update_target(target, online, 0.5)
    for e, p in zip(expected, target.parameters()): torch.testing.assert_close(p, e, rtol=0, atol=1e-7)


def test_general_momentum_and_tensor_momentum():
    target, online = make_target(_net(0)), _online_with_grads()
    m = momentum_schedule(100, 0.9)[10]  # a 0-d float64 tensor, as the trainer would index it
    expected = [m.item() * a + (1 - m.item()) * b for a, b in zip(_params(target), _params(online))]
    update_target(target, online, m)
    for e, p in zip(expected, target.parameters()): torch.testing.assert_close(p, e)


def test_no_graph_and_online_untouched():
    target, online = make_target(_net(0)), _online_with_grads()
    online_before = _params(online)
    grads_before = [p.grad.clone() for p in online.parameters()]
    with torch.enable_grad(): update_target(target, online, 0.7)
    for q in target.parameters(): assert q.grad_fn is None and not q.requires_grad and q.grad is None
    for p, b, g in zip(online.parameters(), online_before, grads_before):
        assert torch.equal(p, b) and torch.equal(p.grad, g) and p.requires_grad


def test_repeated_updates_converge_to_online():
    target, online = make_target(_net(0)), _net(1)
    for _ in range(200): update_target(target, online, 0.9)
    for p, q in zip(online.parameters(), target.parameters()): torch.testing.assert_close(q, p, rtol=0, atol=1e-6)


def test_buffer_modes():
    online = _net(1)
    target = make_target(_net(0))
    online(torch.randn(8, 5) + 2)  # change the online BN statistics
    own = [b.clone() for b in target.buffers()]
    update_target(target, online, 0.5)  # default "own": buffers untouched
    assert all(torch.equal(a, b) for a, b in zip(own, target.buffers()))
    update_target(target, online, 0.5, buffers="ema")
    bn_t, bn_o = target[1], online[1]
    torch.testing.assert_close(bn_t.running_mean, (own[0] + bn_o.running_mean) / 2)
    assert bn_t.num_batches_tracked.item() == bn_o.num_batches_tracked.item()  # integer counter copied
    update_target(target, online, 0.5, buffers="copy")
    assert all(torch.equal(a, b) for a, b in zip(target.buffers(), online.buffers()))


def test_module_without_parameters():
    update_target(nn.ReLU(), nn.ReLU(), 0.5)  # nothing to do, no error


@pytest.mark.parametrize("momentum", [-0.1, 1.0001, float("nan"), float("inf")])
def test_bad_momentum(momentum):
    with pytest.raises(ValueError, match="momentum"): update_target(make_target(_net()), _net(), momentum)


def test_bad_buffers_mode():
    with pytest.raises(ValueError, match="buffers must be one of own, copy, ema"):
        update_target(make_target(_net()), _net(), 0.5, buffers="average")


def test_same_module_refused():
    net = _net()
    with pytest.raises(ValueError, match="same module"): update_target(net, net, 0.5)


def test_mismatched_names_refused():
    online = nn.Sequential(_net(), nn.Linear(3, 2))  # e.g. a predictor passed along by mistake
    with pytest.raises(ValueError, match="only in online"): update_target(make_target(_net()), online, 0.5)


def test_wrapped_names_refused_with_hint():
    class Wrapper(nn.Module):
        def __init__(self, m): super().__init__(); self.module = m
    with pytest.raises(ValueError, match="inner module"): update_target(make_target(_net()), Wrapper(_net()), 0.5)


def test_mismatched_shapes_refused():
    other = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 4))
    with pytest.raises(ValueError, match=r"3.weight: \(3, 7\) vs \(4, 7\)"): update_target(make_target(_net()), other, 0.5)


def test_mismatched_buffers_refused():
    online = _net()
    target = make_target(nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.ReLU(), nn.Linear(7, 3)))
    with pytest.raises(ValueError, match="buffers"): update_target(target, online, 0.5, buffers="copy")


@pytest.mark.parametrize("K, base_momentum", [(1, 0.5), (156, 0.996), (468, 0.97), (1000, 0.99)])
def test_target_init_share_is_what_the_ema_leaves(K, base_momentum):
    "With an online network held at zero, the target after K updates is exactly share x its initial weights."
    from relicv2.target import target_init_share
    torch.manual_seed(0)
    online, target = nn.Linear(4, 3), nn.Linear(4, 3)
    nn.init.zeros_(online.weight); nn.init.zeros_(online.bias)
    w0 = target.weight.detach().clone()
    momenta = momentum_schedule(K, base_momentum)
    for t in momenta: update_target(target, online, float(t))
    share = target_init_share(momenta)
    torch.testing.assert_close(target.weight.detach(), share * w0, rtol=1e-4, atol=1e-7)
    assert 0 < share < 1


def test_target_init_share_bad_input():
    from relicv2.target import target_init_share
    with pytest.raises(ValueError, match="momenta must be a 1-D tensor"): target_init_share(0.99)
    assert target_init_share(torch.zeros(0)) == 1.0
