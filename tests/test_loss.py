"""Tests for relicv2.loss: hand-computed values, gradients, numerics, sampling, aggregation and bad input.

The lesson cells of nbs/05_loss.ipynb hold the rest (cross-entropy equivalence, invariance zero at o == t,
the DDP anchor split, the pair grid)."""
import math

import pytest
import torch
from torch import nn

from relicv2.config import KL_DIRECTIONS, LossConfig
from relicv2.loss import (
    ReLICv2Loss, anchor_rows, anchored_log_probs, byol_pair_loss, contrast_indices, kl_invariance, loss_config,
    mean_over_pairs, pair_loss, prepare, relic_v1_loss, simclr_pair_loss, view_pairs,
)


# ---------------------------------------------------------------- plain-python reference (no torch)
def _unit(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def _log_softmax(xs):
    m = max(xs)
    lse = m + math.log(sum(math.exp(x - m) for x in xs))
    return [x - lse for x in xs]


def _kl(lp, lq):
    return sum(math.exp(a) * (a - b) for a, b in zip(lp, lq))


def _reference(o, t, tau, alpha, beta, direction, idx):
    """Mean pair loss and terms from lists of vectors; idx[a] = [anchor, negatives...]."""
    o, t = [_unit(v) for v in o], [_unit(v) for v in t]
    cs, invs = [], []
    for row in idx:
        i = row[0]
        w = [0.0] + [math.log(beta)] * (len(row) - 1)
        lp_o = _log_softmax([_dot(o[i], t[k]) / tau + wk for k, wk in zip(row, w)])
        lp_t = _log_softmax([_dot(t[i], o[k]) / tau + wk for k, wk in zip(row, w)])
        cs.append(-lp_o[0])
        kl = {"online_to_target": _kl(lp_o, lp_t), "target_to_online": _kl(lp_t, lp_o)}
        kl["symmetric"] = (kl["online_to_target"] + kl["target_to_online"]) / 2
        invs.append(kl[direction])
    c, inv = sum(cs) / len(cs), sum(invs) / len(invs)
    return c + alpha * inv, c, inv


# ---------------------------------------------------------------- hand-computed examples
def test_2x2_by_hand():
    # o = e1, e2; t = (0.6, 0.8), e2; tau = 0.5. Anchor 0: logits_o = [1.2, 0], logits_t = [1.2, 1.6];
    # anchor 1: logits_o = [2.0, 1.6], logits_t = [2.0, 0].
    o, t = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    c0, c1 = math.log(1 + math.exp(-1.2)), math.log(1 + math.exp(-0.4))

    def sm(a, b):
        return [math.exp(a) / (math.exp(a) + math.exp(b)), math.exp(b) / (math.exp(a) + math.exp(b))]

    po0, pt0, po1, pt1 = sm(1.2, 0.0), sm(1.2, 1.6), sm(2.0, 1.6), sm(2.0, 0.0)
    kl0 = sum(p * math.log(p / q) for p, q in zip(po0, pt0))
    kl1 = sum(p * math.log(p / q) for p, q in zip(po1, pt1))
    for n_e in (None, 1):  # with N = 2 the only negative is the other image
        loss, terms = pair_loss(o, t, loss_config(tau=0.5, alpha=0.5, n_negatives=n_e))
        assert terms["contrastive"].item() == pytest.approx((c0 + c1) / 2, rel=1e-6)
        assert terms["invariance"].item() == pytest.approx((kl0 + kl1) / 2, rel=1e-5)
        assert loss.item() == pytest.approx((c0 + c1) / 2 + 0.5 * (kl0 + kl1) / 2, rel=1e-6)
    # beta = 2 doubles the negative's weight: c0 = log(1 + 2 e^-1.2)
    _, terms = pair_loss(o, t, loss_config(tau=0.5, beta=2.0, n_negatives=None))
    assert terms["contrastive"].item() == pytest.approx((math.log(1 + 2 * math.exp(-1.2)) + math.log(1 + 2 * math.exp(-0.4))) / 2, rel=1e-6)


O3 = [[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, 1.0, 0.0]]  # not unit: normalisation happens inside
T3 = [[1.0, 0.0, 0.0], [0.0, 0.0, 5.0], [0.0, 1.0, 1.0]]


@pytest.mark.parametrize("direction", KL_DIRECTIONS)
@pytest.mark.parametrize("beta", [1.0, 0.3])
def test_3x3_by_hand_all_negatives(direction, beta):
    idx = [[0, 1, 2], [1, 0, 2], [2, 0, 1]]
    want, c, inv = _reference(O3, T3, 0.3, 0.7, beta, direction, idx)
    loss, terms = pair_loss(torch.tensor(O3), torch.tensor(T3),
                            loss_config(tau=0.3, alpha=0.7, beta=beta, n_negatives=None, kl_direction=direction))
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert terms["contrastive"].item() == pytest.approx(c, rel=1e-5)
    assert terms["invariance"].item() == pytest.approx(inv, rel=1e-4, abs=1e-7)


def test_3x3_by_hand_sampled_negative_and_anchors():
    # one sampled negative per anchor; the reference uses the indices the same seed draws
    anchors = torch.tensor([2, 0])
    idx = contrast_indices(3, anchors, 1, generator=torch.Generator().manual_seed(3))
    want, _, _ = _reference(O3, T3, 0.2, 1.0, 1.0, "online_to_target", idx.tolist())
    loss, _ = pair_loss(torch.tensor(O3), torch.tensor(T3), loss_config(tau=0.2, n_negatives=1), anchors=anchors,
                        generator=torch.Generator().manual_seed(3))
    assert loss.item() == pytest.approx(want, rel=1e-5)


def test_byol_by_hand():
    o, t = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    loss, terms = byol_pair_loss(o, t)
    assert loss.item() == pytest.approx(((2 - 2 * 0.6) + 0.0) / 2, rel=1e-6)
    assert byol_pair_loss(o, t, anchors=torch.tensor([0]))[0].item() == pytest.approx(0.8, rel=1e-6)
    assert not terms["byol"].requires_grad


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize("objective", ["relicv2", "infonce", "byol"])
def test_no_gradient_reaches_the_target_network(objective):
    torch.manual_seed(0)
    online, target = nn.Linear(6, 4), nn.Linear(6, 4)
    views = [torch.randn(8, 6) for _ in range(3)]
    crit = ReLICv2Loss(objective=objective, n_negatives=3)
    loss, terms = crit([online(v) for v in views[:2]], [online(views[2])], [target(v) for v in views[:2]])
    loss.backward()
    assert all(p.grad is None for p in target.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in online.parameters())
    assert all(not v.requires_grad for v in terms.values())


@pytest.mark.parametrize("direction", KL_DIRECTIONS)
def test_gradcheck_float64(direction):
    # p_t is under stop-gradient, so pair_loss is not the derivative-consistent function of o that gradcheck expects.
    # Its gradient must equal that of the loss with p_t's online outputs frozen at their current value, and that
    # frozen loss must pass gradcheck.
    torch.manual_seed(0)
    o0 = torch.randn(4, 3, dtype=torch.float64)
    t = torch.randn(4, 3, dtype=torch.float64)
    tau, beta = 0.3, 0.7
    idx = contrast_indices(4, torch.arange(4), None)

    def frozen(o):
        on, tn = prepare(o, t)
        log_p_o = anchored_log_probs(on, tn, idx, tau, beta)
        log_p_t = anchored_log_probs(tn, prepare(o0, t)[0], idx, tau, beta)  # the o_k inside p_t held at o0
        return (-log_p_o[:, 0] + 0.8 * kl_invariance(log_p_o, log_p_t, direction)).mean()

    o = o0.clone().requires_grad_()
    assert torch.autograd.gradcheck(frozen, (o,), eps=1e-6, atol=1e-7, fast_mode=True)
    loss, _ = pair_loss(o, t, loss_config(alpha=0.8, n_negatives=None, kl_direction=direction, tau=tau, beta=beta))
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(frozen(o0).item(), rel=1e-12)
    (g,) = torch.autograd.grad(loss, o)
    (g_frozen,) = torch.autograd.grad(frozen(o), o)
    assert torch.allclose(g, g_frozen, rtol=1e-10, atol=1e-12)


def test_gradcheck_contrastive_only_float64():
    # alpha = 0: no stop-gradient involved, so gradcheck applies to pair_loss itself
    torch.manual_seed(0)
    o = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 3, dtype=torch.float64)
    fn = lambda o: pair_loss(o, t, loss_config(tau=0.3, alpha=0.0, beta=0.7, n_negatives=None))[0]
    assert torch.autograd.gradcheck(fn, (o,), eps=1e-6, atol=1e-7)


def test_gradcheck_byol_float64():
    torch.manual_seed(0)
    o = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda o: byol_pair_loss(o, t)[0], (o,), eps=1e-6, atol=1e-6)


# ---------------------------------------------------------------- numerics
def test_bf16_autocast_computes_in_float32():
    torch.manual_seed(0)
    online, target = nn.Linear(16, 8), nn.Linear(16, 8)
    x = torch.randn(12, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o, t = online(x), target(x)
        assert o.dtype == torch.bfloat16
        loss, terms = pair_loss(o, t, loss_config(tau=0.1, n_negatives=5), generator=torch.Generator().manual_seed(0))
    assert loss.dtype == torch.float32 and loss.isfinite()
    # the same bf16 values, cast up outside autocast, give the very same number: nothing ran in bf16 inside
    ref, _ = pair_loss(o.detach().float(), t.float(), loss_config(tau=0.1, n_negatives=5), generator=torch.Generator().manual_seed(0))
    assert loss.item() == ref.item()
    loss.backward()
    assert all(p.grad.isfinite().all() for p in online.parameters())


@pytest.mark.parametrize("direction", KL_DIRECTIONS)
def test_extreme_logits_tau_001(direction):
    torch.manual_seed(0)
    t = torch.randn(16, 8) * 1e3
    for o in (t.clone(), -t.clone(), torch.randn(16, 8) * 1e-3):  # perfect match, anti-match (logits +-100), tiny norms
        o.requires_grad_()
        loss, terms = pair_loss(o, t, loss_config(tau=0.01, n_negatives=None, kl_direction=direction))
        loss.backward()
        assert loss.isfinite() and all(v.isfinite() for v in terms.values()) and o.grad.isfinite().all()
    # anti-matched: the positive has logit -100 and the best negatives close to +100, so the loss is about 200
    loss, _ = pair_loss(-t, t, loss_config(tau=0.01, alpha=0.0, n_negatives=None))
    assert 100 < loss.item() < 220


# ---------------------------------------------------------------- sampling of negatives
def test_negatives_exclude_self_and_are_distinct():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        anchors = torch.randperm(20, generator=g)[:12]
        idx = contrast_indices(20, anchors, 7, generator=g)
        assert idx.shape == (12, 8) and (idx[:, 0] == anchors).all()
        assert (idx[:, 1:] != anchors[:, None]).all()
        assert all(len(set(r)) == 8 for r in idx.tolist())
        assert idx.min() >= 0 and idx.max() < 20


def test_negatives_are_drawn_per_anchor_and_reproducible():
    idx = contrast_indices(32, torch.arange(32), 5, generator=torch.Generator().manual_seed(0))
    assert len({frozenset(r) for r in idx[:, 1:].tolist()}) > 28  # each anchor its own draw
    # two anchors that are the same row still get independent draws
    twice = contrast_indices(32, torch.tensor([3, 3]), 5, generator=torch.Generator().manual_seed(0))
    assert set(twice[0, 1:].tolist()) != set(twice[1, 1:].tolist())
    again = contrast_indices(32, torch.arange(32), 5, generator=torch.Generator().manual_seed(0))
    other = contrast_indices(32, torch.arange(32), 5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(idx, again) and not torch.equal(idx, other)


def test_negatives_are_uniform():
    # anchor 0 of 5 images, 2 negatives: each of the 6 pairs of {1, 2, 3, 4} has probability 1/6
    draws = 30000
    idx = contrast_indices(5, torch.zeros(draws, dtype=torch.long), 2, generator=torch.Generator().manual_seed(0))
    pairs = torch.sort(idx[:, 1:], dim=1).values
    codes = pairs[:, 0] * 5 + pairs[:, 1]
    counts = torch.bincount(codes, minlength=25)[[7, 8, 9, 13, 14, 19]].double()
    chi2 = ((counts - draws / 6) ** 2 / (draws / 6)).sum().item()
    assert counts.sum() == draws and chi2 < 20.5  # chi-square, 5 dof: P(> 20.5) < 0.001


def test_n_negatives_is_bounded_by_the_global_batch():
    # under DDP a rank owns 2 anchors of a gathered batch of 8: 7 negatives are allowed
    o, t = torch.randn(8, 4), torch.randn(8, 4)
    loss, _ = pair_loss(o, t, loss_config(n_negatives=7), anchors=torch.tensor([6, 7]), generator=torch.Generator().manual_seed(0))
    ref, _ = pair_loss(o, t, loss_config(n_negatives=None), anchors=torch.tensor([6, 7]))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)  # all 7 others: same set, another order


@pytest.mark.parametrize("direction", KL_DIRECTIONS)
def test_invariance_zero_when_outputs_coincide_with_sampling_and_beta(direction):
    t = torch.randn(10, 6)
    _, terms = pair_loss(t * 3, t, loss_config(n_negatives=3, beta=0.5, kl_direction=direction), generator=torch.Generator().manual_seed(0))
    assert abs(terms["invariance"].item()) < 1e-6


# ---------------------------------------------------------------- aggregation over views
def test_pair_grid_and_normaliser():
    assert view_pairs(2, 1) == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert view_pairs(2, 0, include_same=False) == [(0, 1), (1, 0)]
    calls = []
    ones = lambda o, t: (calls.append(1) or torch.tensor(1.0), {"x": torch.tensor(2.0)})
    x = [torch.zeros(2, 2)]
    loss, terms = mean_over_pairs(ones, x * 4, x * 2, x * 4)
    assert len(calls) == (4 + 2) * 4 and loss.item() == 1.0 and terms["x"].item() == 2.0


def test_identical_views_equal_a_single_pair():
    torch.manual_seed(0)
    o, t = torch.randn(6, 5), torch.randn(6, 5)
    single, single_terms = pair_loss(o, t, loss_config(n_negatives=None, tau=0.3))
    loss, terms = ReLICv2Loss(n_negatives=None, tau=0.3)([o] * 3, [o] * 2, [t] * 3)
    assert loss.item() == pytest.approx(single.item(), rel=1e-6)
    for k in ("contrastive", "invariance"):
        assert terms[k].item() == pytest.approx(single_terms[k].item(), rel=1e-5)


def test_byol_symmetrised_over_different_views():
    torch.manual_seed(0)
    o, t = [torch.randn(6, 5) for _ in range(2)], [torch.randn(6, 5) for _ in range(2)]
    byol = ReLICv2Loss(objective="byol")
    loss, _ = byol(o, [], t)
    want = (byol_pair_loss(o[0], t[1])[0] + byol_pair_loss(o[1], t[0])[0]) / 2  # BYOL's two pairs, averaged
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    # a view against its own target output is not counted: identical online/target views cost nothing extra
    same, _ = byol(o, [], o)
    assert same.item() == pytest.approx(((byol_pair_loss(o[0], o[1])[0] + byol_pair_loss(o[1], o[0])[0]) / 2).item(), rel=1e-6)


def test_module_is_built_from_the_config_and_is_the_mean_of_its_pairs():
    torch.manual_seed(0)
    ol, os_, tl = [torch.randn(8, 4) for _ in range(2)], [torch.randn(8, 4)], [torch.randn(8, 4) for _ in range(2)]
    cfg = LossConfig(tau=0.3, alpha=0.5, n_negatives=3, beta=0.8, kl_direction="symmetric")
    crit = ReLICv2Loss(cfg)
    assert crit.cfg == cfg and crit.cfg is not cfg and (crit.tau, crit.objective) == (0.3, "relicv2")
    assert ReLICv2Loss(tau=0.3).cfg == loss_config(tau=0.3) == LossConfig(tau=0.3)  # overrides on the defaults
    a, ta = crit(ol, os_, tl, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    b, tb = mean_over_pairs(lambda o, t: pair_loss(o, t, cfg, generator=g), ol, os_, tl)
    assert a.item() == b.item() and ta.keys() == tb.keys() == {"contrastive", "invariance"}
    i, _ = ReLICv2Loss(objective="infonce", alpha=5.0, n_negatives=None)(ol, os_, tl)  # alpha is ignored by infonce
    r, _ = ReLICv2Loss(alpha=0.0, n_negatives=None)(ol, os_, tl)
    assert i.item() == r.item()


# ---------------------------------------------------------------- ReLIC's own KL construction
def _views(seed, n=8, d=5, n_large=2, n_small=1):
    g = torch.Generator().manual_seed(seed)
    mk = lambda: torch.randn(n, d, generator=g)
    return [mk() for _ in range(n_large)], [mk() for _ in range(n_small)], [mk() for _ in range(n_large)]


def test_relic_v1_matches_a_plain_python_reference():
    ol, os_, tl = _views(0)
    tau, alpha = 0.3, 0.7
    loss, terms = relic_v1_loss(ol, os_, tl, loss_config(tau=tau, alpha=alpha, n_negatives=None))
    rows = lambda o, t: [_log_softmax([_dot(_unit(a), _unit(b)) / tau for b in t.tolist()]) for a in o.tolist()]
    online = ol + os_
    pairs = [(i, j) for i in range(3) for j in range(2)]
    lp = {(i, j): rows(online[i], tl[j]) for i, j in pairs}
    contrastive = sum(-lp[p][a][a] for p in pairs for a in range(8)) / (8 * len(pairs))
    kl = lambda p, q: sum(math.exp(x) * (x - y) for x, y in zip(p, q))
    invariance = sum(kl(lp[i, j][a], lp[j, i][a]) for i, j in [(0, 1), (1, 0)] for a in range(8)) / 16
    assert terms["contrastive"].item() == pytest.approx(contrastive, rel=1e-5)
    assert terms["invariance"].item() == pytest.approx(invariance, rel=1e-5)
    assert loss.item() == pytest.approx(contrastive + alpha * invariance, rel=1e-5)


def test_relic_v1_orderings_share_their_negatives():
    # the same crop twice: both orderings give the same distribution, so the KL is zero only if they use the same negatives
    ol, _, tl = _views(1, n=32)
    _, terms = relic_v1_loss([ol[0], ol[0]], [], [tl[0], tl[0]], loss_config(n_negatives=3), generator=torch.Generator().manual_seed(0))
    assert terms["invariance"].item() < 1e-6
    _, other = ReLICv2Loss(n_negatives=3)([ol[0], ol[0]], [], [tl[0], tl[0]], generator=torch.Generator().manual_seed(0))
    assert other["invariance"].item() > 1e-3  # anchor_swap still sees online and target disagree


def test_relic_v1_gradients_shards_and_dispatch():
    ol, os_, tl = _views(2)
    ol = [x.requires_grad_() for x in ol]; os_ = [x.requires_grad_() for x in os_]; tl = [x.requires_grad_() for x in tl]
    all_neg = loss_config(n_negatives=None)
    loss, _ = relic_v1_loss(ol, os_, tl, all_neg)
    loss.backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in ol + os_) and all(x.grad is None for x in tl)
    # two ranks, each owning half of the rows, add up to the whole batch
    full, _ = relic_v1_loss(ol, os_, tl, all_neg)
    halves = [relic_v1_loss(ol, os_, tl, all_neg, anchors=torch.arange(r * 4, r * 4 + 4))[0] for r in (0, 1)]
    assert ((halves[0] + halves[1]) / 2).item() == pytest.approx(full.item(), rel=1e-6)
    # through the module; infonce ignores the construction's invariance (alpha = 0)
    crit = ReLICv2Loss(LossConfig(n_negatives=None, kl_construction="relic_v1"))
    assert crit(ol, os_, tl)[0].item() == pytest.approx(full.item(), rel=1e-6)
    i, _ = ReLICv2Loss(crit.cfg, objective="infonce")(ol, os_, tl)
    assert i.item() == pytest.approx(ReLICv2Loss(alpha=0.0, n_negatives=None)(ol, os_, tl)[0].item(), rel=1e-6)


def test_simclr_shards_of_a_batch_add_up_to_its_gradient_with_the_cross_shard_part():
    """Two simulated ranks' SimCLR losses (their own anchors, every row a key) average to the full loss; their gradients
    sum to the full batch's only with the part each sends to the other's rows, which gather_with_grad hands back."""
    torch.manual_seed(0)
    z = [torch.randn(8, 5, requires_grad=True) for _ in range(3)]
    simclr = ReLICv2Loss(objective="simclr", n_negatives=None, tau=0.3)
    full, _ = simclr(z[:2], z[2:], None)
    g_full = torch.autograd.grad(full, z)
    halves = [simclr(z[:2], z[2:], None, anchors=torch.arange(r * 4, r * 4 + 4))[0] for r in (0, 1)]
    assert ((halves[0] + halves[1]) / 2).item() == pytest.approx(full.item(), rel=1e-6)
    g = [torch.autograd.grad(h, z) for h in halves]
    for k in range(3): torch.testing.assert_close((g[0][k] + g[1][k]) / 2, g_full[k], rtol=1e-5, atol=1e-7)
    assert g[0][1][4:].abs().sum() > 0  # rank 0's loss reaches rank 1's rows of a large view (keys), unlike relicv2's
    assert g[0][2][4:].abs().sum() == 0  # a small view is only an anchor: no key role, no cross-shard gradient


# ---------------------------------------------------------------- bad input
X = torch.randn(4, 3)
ALL = loss_config(n_negatives=None)
BAD = [
    (lambda: pair_loss(X, torch.randn(4, 2)), "same shape"),
    (lambda: pair_loss(X, torch.randn(5, 3)), "same shape"),
    (lambda: pair_loss(X[0], X[0]), "2-D"),
    (lambda: pair_loss(X[None], X[None]), "2-D"),
    (lambda: pair_loss(X[:1], X[:1], ALL), "at least 2 rows"),
    (lambda: loss_config(n_negatives=0), "loss.n_negatives must be none or an int >= 1, got 0"),
    (lambda: pair_loss(X, X, loss_config(n_negatives=4)), r"n_negatives must be None or an int in \[1, 3\] for this batch of N=4"),
    (lambda: loss_config(n_negatives=2.0), "loss.n_negatives"),
    (lambda: loss_config(n_negatives=True), "loss.n_negatives"),
    (lambda: loss_config(tau=0), r"loss.tau must be in \[0.01, 100.0\], got 0.0"),
    (lambda: loss_config(tau=-0.1), "loss.tau"),
    (lambda: loss_config(tau=float("nan")), "loss.tau must be finite"),
    (lambda: loss_config(alpha=-0.5), r"loss.alpha must be in \[0.0, 1000.0\]"),
    (lambda: loss_config(beta=0.0), r"loss.beta must be in \(0, 1000\]"),
    (lambda: loss_config(kl_direction="forward"), "loss.kl_direction' must be one of 'online_to_target', 'target_to_online', 'symmetric'"),
    (lambda: loss_config(temperature=0.1), "unknown config field loss.temperature"),
    (lambda: pair_loss(X, X, loss_config(n_negatives=2), anchors=range(2, 5)), r"anchors must be row indices in \[0, 3\] .* got range\(2, 5\)"),
    (lambda: anchor_rows(torch.tensor([4]), 4, "cpu"), r"anchors must be row indices in \[0, 3\]"),
    (lambda: anchor_rows(torch.tensor([-1]), 4, "cpu"), "anchors"),
    (lambda: anchor_rows(torch.tensor([0.0]), 4, "cpu"), "anchors must be None, a range or a non-empty 1-D integer"),
    (lambda: anchor_rows(torch.tensor([[0]]), 4, "cpu"), "anchors"),
    (lambda: anchor_rows(torch.tensor([], dtype=torch.long), 4, "cpu"), "anchors"),
    (lambda: ReLICv2Loss(n_negatives=2)([X], [], [X], anchors=torch.tensor([4])), r"anchors must be row indices in \[0, 3\]"),
    (lambda: byol_pair_loss(X, X[:, :2]), "same shape"),
    (lambda: kl_invariance(X, X, "forward"), "kl_direction must be one of 'online_to_target', 'target_to_online', 'symmetric'"),
    (lambda: ReLICv2Loss(objective="supervised"), "objective must be one of 'relicv2', 'infonce', 'byol', 'simclr' for a loss of views"),
    (lambda: ReLICv2Loss(objective="simclr")([X], [], [X]), "objective 'simclr' compares online views with each other: target_large must be None"),
    (lambda: ReLICv2Loss()([X], [], None), "objective 'relicv2' needs target_large"),
    (lambda: ReLICv2Loss(objective="simclr")([X], [], None), "no view pairs"),
    (lambda: simclr_pair_loss(X, X, loss_config(n_negatives=4)), r"n_negatives must be None or an int in \[1, 3\]"),
    (lambda: simclr_pair_loss(X, X[:, :2]), "same shape"),
    (lambda: ReLICv2Loss(objective="byol", tau=0), "loss.tau"),
    (lambda: ReLICv2Loss()([], [], []), "online_large must hold at least one"),
    (lambda: ReLICv2Loss()([X, X], [], [X]), r"target_large must hold one tensor per large view \(L=2\)"),
    (lambda: ReLICv2Loss()(X, [], [X]), "online_large must be a list"),
    (lambda: ReLICv2Loss(objective="byol")([X], [], [X]), "no view pairs"),
    (lambda: ReLICv2Loss(n_negatives=2)([X], [X[:, :2]], [X]), "same shape"),
    (lambda: ReLICv2Loss(objective="supervised"), "objective must be one of"),
    (lambda: ReLICv2Loss(kl_direction="both"), "kl_direction"),
    (lambda: ReLICv2Loss(LossConfig(alpha=-1.0)), "alpha"),
    (lambda: ReLICv2Loss(kl_construction="relic"), "kl_construction' must be one of 'anchor_swap', 'relic_v1'"),
    (lambda: ReLICv2Loss(kl_construction="relic_v1")([X], [], [X]), r"needs at least 2 large views .*L=1"),
    (lambda: relic_v1_loss([X, X], [X[:, :2]], [X, X]), "same shape"),
    (lambda: relic_v1_loss([X, X], [], [X, X], loss_config(n_negatives=4)), r"n_negatives must be None or an int in \[1, 3\]"),
]


@pytest.mark.parametrize("call,match", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_module_takes_a_loss_config_only():
    with pytest.raises(TypeError, match="cfg must be a LossConfig or None, got dict"):
        ReLICv2Loss({"tau": 0.3})
