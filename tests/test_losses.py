"""Tests for losses.py: every loss against closed-form / hand-computed values (math module, not the code under
test), float64 gradcheck, and finiteness on the edge cases training hits (empty responses, avg log-prob 0,
huge margins)."""

import math

import pytest
import torch

from logprobs import average_logps, summed_logps
from losses import (
    dpo_loss,
    hinge_loss,
    ipo_loss,
    kto_loss,
    kto_mismatched_indices,
    log1mexp,
    orpo_loss,
    sft_loss,
    simpo_loss,
)


def t(*xs, dtype=torch.float64, grad=False):
    return torch.tensor(xs, dtype=dtype, requires_grad=grad)


def softplus(x):  # log(1 + e^x) = -logsigmoid(-x), written independently of torch
    return math.log1p(math.exp(x))


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


PAIRWISE = [dpo_loss, ipo_loss, hinge_loss]


# ---------------------------------------------------------------- sequence log-probs

def test_summed_logps_hand_example():
    token_logps = torch.tensor([[-1.0, -2.0, -3.0, -4.0],
                                [-0.5, -0.25, -9.0, -9.0],
                                [-7.0, -7.0, -7.0, -7.0]])
    mask = torch.tensor([[0, 1, 1, 0],   # prompt, 2 response tokens, padding
                         [1, 1, 0, 0],
                         [0, 0, 0, 0]])  # empty response
    logps, n = summed_logps(token_logps, mask)
    assert logps.tolist() == [-5.0, -0.75, 0.0]
    assert n.tolist() == [2.0, 2.0, 0.0]
    assert average_logps(logps, n).tolist() == [-2.5, -0.375, 0.0]  # empty -> 0, not NaN


def test_sft_loss_token_average():
    # -(-5 - 0.75) / (2 + 3) tokens
    assert sft_loss(t(-5.0, -0.75), t(2.0, 3.0)).item() == pytest.approx(5.75 / 5)
    assert sft_loss(t(0.0), t(0.0)).item() == 0.0


# ---------------------------------------------------------------- DPO

def test_dpo_equal_policy_and_ref_is_ln2():
    x = t(-3.0, -10.0, -0.5)
    y = t(-4.0, -1.0, -2.5)
    loss, cr, rr = dpo_loss(x, y, x.clone(), y.clone(), beta=0.3)
    assert loss.item() == pytest.approx(math.log(2))
    assert cr.tolist() == [0.0, 0.0, 0.0] and rr.tolist() == [0.0, 0.0, 0.0]


def test_dpo_hand_values():
    beta = 0.5
    pc, pr, rc, rr = t(-1.0, -6.0), t(-3.0, -2.0), t(-2.0, -5.0), t(-2.0, -2.5)
    # h = (pc - rc) - (pr - rr): [1 - (-1), -1 - 0.5] = [2, -1.5]
    expected = (softplus(-beta * 2) + softplus(-beta * -1.5)) / 2
    loss, cr_, rr_ = dpo_loss(pc, pr, rc, rr, beta=beta)
    assert loss.item() == pytest.approx(expected)
    assert cr_.tolist() == pytest.approx([0.5, -0.5])
    assert rr_.tolist() == pytest.approx([-0.5, 0.25])


def test_conservative_dpo_closed_form():
    beta, eps = 0.5, 0.1
    pc, pr, rc, rr = t(-1.0), t(-3.0), t(-2.0), t(-2.0)  # h = 2
    expected = (1 - eps) * softplus(-beta * 2) + eps * softplus(beta * 2)
    assert dpo_loss(pc, pr, rc, rr, beta, label_smoothing=eps)[0].item() == pytest.approx(expected)
    # eps = 0.5: labels are coin flips, the loss is symmetric in h: 0.5 (softplus(-x) + softplus(x))
    x = beta * 2
    assert dpo_loss(pc, pr, rc, rr, beta, 0.5)[0].item() == pytest.approx(0.5 * (softplus(-x) + softplus(x)))


def test_dpo_gradient_direction_and_size():
    beta = 0.5
    pc, pr = t(-1.0, -4.0, grad=True), t(-3.0, -2.0, grad=True)
    rc, rr = t(-2.0, -4.0), t(-2.0, -2.0)  # h = [2, 0]
    dpo_loss(pc, pr, rc, rr, beta)[0].backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()  # raising chosen / lowering rejected lowers the loss
    # d/dpc of mean(-logsigmoid(beta h)) = -beta * sigmoid(-beta h) / B
    exp = [-beta * sigmoid(-beta * 2) / 2, -beta * sigmoid(0.0) / 2]
    assert pc.grad.tolist() == pytest.approx(exp)
    assert pr.grad.tolist() == pytest.approx([-g for g in exp])


# ---------------------------------------------------------------- IPO / hinge

def test_ipo_closed_form():
    beta = 0.1
    x, y = t(-3.0, -1.0), t(-2.0, -5.0)
    loss, cr, rr = ipo_loss(x, y, x.clone(), y.clone(), beta)
    assert loss.item() == pytest.approx((1 / (2 * beta)) ** 2)  # h = 0 -> target^2 = 25
    assert cr.tolist() == [0.0, 0.0] and rr.tolist() == [0.0, 0.0]
    # beta = 0.5: target 1; h = [2, 0.5] -> ((2-1)^2 + (0.5-1)^2) / 2
    pc, pr, rc, rr_ = t(-1.0, -1.0), t(-3.0, -2.0), t(-2.0, -1.5), t(-2.0, -2.0)
    loss, cr, rr = ipo_loss(pc, pr, rc, rr_, beta=0.5)
    assert loss.item() == pytest.approx((1.0 + 0.25) / 2)
    assert cr.tolist() == pytest.approx([0.5, 0.25]) and rr.tolist() == pytest.approx([-0.5, 0.0])


def test_hinge_closed_form():
    x, y = t(-3.0, -1.0), t(-2.0, -5.0)
    assert hinge_loss(x, y, x.clone(), y.clone(), 0.1)[0].item() == pytest.approx(1.0)  # relu(1 - 0)
    # beta 0.1, h = [2, 20, -3] -> relu(1 - [0.2, 2, -0.3]) = [0.8, 0, 1.3]
    pc, pr, rc, rr = t(-1.0, 0.0, -5.0), t(-3.0, -20.0, -2.0), t(-2.0, 0.0, -2.0), t(-2.0, 0.0, -2.0)
    loss, cr, rr_ = hinge_loss(pc, pr, rc, rr, beta=0.1)
    assert loss.item() == pytest.approx((0.8 + 0.0 + 1.3) / 3)
    assert cr.tolist() == pytest.approx([0.1, 0.0, -0.3])


# ---------------------------------------------------------------- SimPO

def test_simpo_closed_form():
    beta, gamma = 2.0, 0.5
    pc, pr = t(-0.5, -2.0), t(-1.5, -1.0)
    # z = beta (pc - pr) - gamma = [1.5, -2.5]
    expected = (softplus(-1.5) + softplus(2.5)) / 2
    loss, cr, rr = simpo_loss(pc, pr, beta, gamma)
    assert loss.item() == pytest.approx(expected)
    assert cr.tolist() == [-1.0, -4.0] and rr.tolist() == [-3.0, -2.0]
    # gamma is in reward units: equal avg logps give -logsigmoid(-gamma) whatever beta is
    for b in (1.0, 2.5):
        assert simpo_loss(t(-1.0), t(-1.0), b, gamma)[0].item() == pytest.approx(softplus(gamma))


# ---------------------------------------------------------------- ORPO

def test_log1mexp_accuracy():
    xs = [-1e-7, -1e-5, -0.01, -0.5, -math.log(2), -0.8, -5.0, -40.0]
    ref = [math.log(-math.expm1(x)) for x in xs]
    assert log1mexp(t(*xs)).tolist() == pytest.approx(ref, rel=1e-12)
    # float32 too: naive log(1 - exp(x)) loses everything near 0, the stable form keeps ~1e-6 relative error
    got32 = log1mexp(torch.tensor(xs, dtype=torch.float32)).tolist()
    assert got32 == pytest.approx(ref, rel=1e-5)


def test_orpo_closed_form():
    lam = 0.2
    # probabilities: chosen [0.5, 0.9], rejected [0.2, 0.6] -> odds [1, 9] vs [0.25, 1.5] -> ratio [4, 6]
    pc, pr = t(math.log(0.5), math.log(0.9)), t(math.log(0.2), math.log(0.6))
    nll = torch.tensor(1.25, dtype=torch.float64)
    loss, cr, rr, log_odds_ratio, log_odds_chosen = orpo_loss(pc, pr, nll, lam)
    # logsigmoid(log k) = log(k / (k + 1))
    ratio_mean = (math.log(4 / 5) + math.log(6 / 7)) / 2
    assert loss.item() == pytest.approx(1.25 - lam * ratio_mean)
    assert log_odds_ratio.item() == pytest.approx(ratio_mean)
    assert log_odds_chosen.item() == pytest.approx((math.log(4) + math.log(6)) / 2)
    assert cr.tolist() == pytest.approx([lam * math.log(0.5), lam * math.log(0.9)])
    assert rr.tolist() == pytest.approx([lam * math.log(0.2), lam * math.log(0.6)])
    assert not log_odds_ratio.requires_grad and not cr.requires_grad


def test_orpo_avg_logprob_zero_and_empty_response_finite():
    # avg 0 = probability 1 or an empty response; the clamp to -1e-6 keeps log(1 - p) ~ log(1e-6)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        pc = torch.tensor([0.0, -0.3, 0.0], dtype=dtype, requires_grad=True)
        pr = torch.tensor([-2.0, 0.0, 0.0], dtype=dtype, requires_grad=True)
        nll = torch.tensor(0.7, dtype=dtype, requires_grad=True)
        out = orpo_loss(pc, pr, nll, 0.1)
        out[0].backward()
        assert all(torch.isfinite(o).all() for o in out)
        assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
    # pc = 0, pr = log 0.5: log_odds = (-1e-6 - log .5) - (log(1e-6) - log .5) = -1e-6 - log(1e-6) (to ~1e-6)
    _, _, _, _, lo = orpo_loss(t(0.0), t(math.log(0.5)), torch.tensor(0.0), 1.0)
    assert lo.item() == pytest.approx(-math.log(-math.expm1(-1e-6)) - 1e-6, rel=1e-9)


# ---------------------------------------------------------------- KTO

def test_kto_equal_policy_and_ref_is_half():
    x = t(-3.0, -10.0, -0.5, -2.0)
    desirable = torch.tensor([True, False, True, False])
    kl_logps = t(-4.0, -5.0, -6.0, -7.0)
    loss, rewards, kl = kto_loss(x, x.clone(), desirable, kl_logps, kl_logps.clone(), beta=0.1)
    assert loss.item() == pytest.approx(0.5) and kl.item() == 0.0
    assert rewards.tolist() == [0.0] * 4


def test_kto_weights_hand_values():
    beta, wd, wu = 0.5, 2.0, 0.75
    r = [1.0, -2.0, 3.0]  # policy - ref
    ref = t(-5.0, -5.0, -5.0)
    policy = ref + t(*r)
    desirable = torch.tensor([True, False, False])
    pkl, rkl = t(-4.0, -6.0, -2.0), t(-5.0, -6.0, -4.0)  # diffs [1, 0, 2] -> kl = 1
    kl = 1.0
    expected = (wd * (1 - sigmoid(beta * (r[0] - kl)))
                + wu * (1 - sigmoid(beta * (kl - r[1])))
                + wu * (1 - sigmoid(beta * (kl - r[2])))) / 3
    loss, rewards, kl_out = kto_loss(policy, ref, desirable, pkl, rkl, beta, wd, wu)
    assert loss.item() == pytest.approx(expected)
    assert kl_out.item() == pytest.approx(kl)
    assert rewards.tolist() == pytest.approx([beta * x for x in r])


def test_kto_kl_clamped_and_kl_reduce():
    policy, ref = t(-1.0, -2.0), t(-1.0, -2.0)
    desirable = torch.tensor([True, False])
    pkl, rkl = t(-6.0, -6.0), t(-5.0, -5.0)  # mean diff -1 -> clamped to 0
    assert kto_loss(policy, ref, desirable, pkl, rkl)[2].item() == 0.0
    seen = []

    def fake_all_reduce(x):  # pretends the other rank had mean diff +5: average (-1 + 5) / 2 = 2
        seen.append(x)
        return (x + 5.0) / 2
    loss, _, kl = kto_loss(policy, ref, desirable, pkl, rkl, beta=0.5, kl_reduce=fake_all_reduce)
    assert seen[0].item() == pytest.approx(-1.0) and not seen[0].requires_grad  # before clamping, detached
    assert kl.item() == pytest.approx(2.0)
    # r = 0: desirable 1 - sigmoid(-1), undesirable 1 - sigmoid(1)
    assert loss.item() == pytest.approx(((1 - sigmoid(-1.0)) + (1 - sigmoid(1.0))) / 2)


def test_kto_mismatched_indices():
    assert kto_mismatched_indices(1) == [0]  # documented degenerate case
    for n in range(2, 7):
        idx = kto_mismatched_indices(n)
        assert sorted(idx) == list(range(n))             # each completion used once
        assert all(j != i for i, j in enumerate(idx))    # no prompt keeps its own completion


def test_kto_kl_uses_mismatched_pairs():
    # Toy "models": summed log-prob of completion j given prompt i, for a micro-batch of 3.
    P = torch.tensor([[-2.0, -1.0, -9.0],
                      [-8.0, -3.0, -1.0],
                      [-2.0, -7.0, -4.0]], dtype=torch.float64)
    R = torch.tensor([[-2.0, -4.0, -1.0],
                      [-1.0, -3.0, -3.0],
                      [-5.0, -1.0, -4.0]], dtype=torch.float64)
    # matched pairs (diagonal): P - R = [0, 0, 0] -> matched KL estimate 0
    # mismatched pairs by the shift i -> i+1: (0,1), (1,2), (2,0): P - R = [3, 2, 3] -> KL estimate 8/3
    rows = torch.arange(3)
    idx = torch.tensor(kto_mismatched_indices(3))
    policy, ref = P[rows, rows] + t(1.0, -1.0, 0.5), P[rows, rows].clone()  # r = [1, -1, 0.5]
    desirable = torch.tensor([True, False, True])
    with torch.no_grad():  # as the script computes them
        pkl, rkl = P[rows, idx], R[rows, idx]
    loss, _, kl = kto_loss(policy, ref, desirable, pkl, rkl, beta=1.0)

    def by_hand(kl):
        return ((1 - sigmoid(1.0 - kl)) + (1 - sigmoid(kl + 1.0)) + (1 - sigmoid(0.5 - kl))) / 3
    assert kl.item() == pytest.approx(8 / 3)
    assert loss.item() == pytest.approx(by_hand(8 / 3))
    assert abs(loss.item() - by_hand(0.0)) > 0.05  # the matched-pair estimate would give a clearly other loss


# ---------------------------------------------------------------- gradients and numerical safety

def test_gradcheck_all_losses():
    gen = torch.Generator().manual_seed(0)

    def rnd(lo=-3.0, hi=-0.5):
        return (lo + (hi - lo) * torch.rand(4, generator=gen, dtype=torch.float64)).requires_grad_()
    pc, pr, rc, rr = rnd(), rnd(), rnd(), rnd()
    for fn in PAIRWISE:  # hinge: margins here are small, so every example sits on the smooth (linear) side
        assert torch.autograd.gradcheck(lambda *a, fn=fn: fn(*a, beta=0.5)[0], (pc, pr, rc, rr))
    assert torch.autograd.gradcheck(lambda *a: dpo_loss(*a, beta=0.5, label_smoothing=0.2)[0], (pc, pr, rc, rr))
    assert torch.autograd.gradcheck(lambda a, b: simpo_loss(a, b)[0], (pc, pr))
    nll = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)
    # ORPO: avg logps on both sides of the log1mexp branch point -ln2 and away from the clamp at -1e-6
    oc = t(-0.05, -0.3, -1.2, -2.0, grad=True)
    orr = t(-0.9, -0.01, -0.5, -4.0, grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: orpo_loss(a, b, c, 0.3)[0], (oc, orr, nll))
    desirable = torch.tensor([True, False, True, False])
    pkl, rkl = rnd(), rnd()  # detached inside kto_loss, so only check policy/ref
    assert torch.autograd.gradcheck(
        lambda a, b: kto_loss(a, b, desirable, pkl.detach(), rkl.detach(), 0.5, 1.5, 0.7)[0], (pc, rc))


@pytest.mark.parametrize("delta", [1e4, -1e4])
def test_huge_margins_finite(delta):
    z = torch.zeros(2, requires_grad=True)
    d = torch.tensor([delta, 0.0], requires_grad=True)
    zero = torch.zeros(2)
    outs = [fn(d, z, zero, zero)[0] for fn in PAIRWISE]
    outs.append(dpo_loss(d, z, zero, zero, 0.1, 0.1)[0])
    outs.append(simpo_loss(d, z)[0])
    # ORPO sees avg logps <= 0: chosen -1e4 vs rejected 0, and the other way round
    outs.append(orpo_loss(-d.abs(), z, torch.tensor(1.0), 0.1)[0])
    outs.append(orpo_loss(z, -d.abs(), torch.tensor(1.0), 0.1)[0])
    outs.append(kto_loss(d, zero, torch.tensor([True, False]), zero, zero)[0])
    outs.append(kto_loss(d, zero, torch.tensor([False, True]), zero, zero)[0])
    for out in outs:
        assert torch.isfinite(out)
        gd, gz = torch.autograd.grad(out, (d, z), allow_unused=True)
        for g in (gd, gz):
            assert g is None or torch.isfinite(g).all()
    # the saturated side of DPO is exactly linear: -logsigmoid(-beta * 1e4) = beta * 1e4 (+ e^-1000)
    if delta < 0:
        assert dpo_loss(d, z, zero, zero, 0.1)[0].item() == pytest.approx((1000.0 + math.log(2)) / 2)


def test_empty_responses_finite():
    # two empty responses: summed logps 0, n_tokens 0 -> averages 0
    logps, n = summed_logps(torch.randn(2, 5), torch.zeros(2, 5))
    avg = average_logps(logps, n)
    assert avg.tolist() == [0.0, 0.0]
    p = avg.clone().requires_grad_()
    outs = [fn(p, p * 1, avg, avg)[0] for fn in PAIRWISE]
    outs += [simpo_loss(p, avg)[0], orpo_loss(p, avg, sft_loss(logps, n), 0.1)[0],
             kto_loss(p, avg, torch.tensor([True, False]), avg, avg)[0]]
    for out in outs:
        (g,) = torch.autograd.grad(out, p)
        assert torch.isfinite(out) and torch.isfinite(g).all()
