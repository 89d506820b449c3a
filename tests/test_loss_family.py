"""The rest of TRL's DPO family (losses.py), the f-divergences, dpo.py's compute_loss (the --loss_type
lookup, weighted combinations, RPO, WPO weights, BCO's running mean), WPO and LD-DPO (logprobs.py) and TR-DPO's
moving reference (nanopo/checkpoint.py). Every value is computed independently: by hand with the math module,
in closed form, or from a plain per-row forward written here; gradients by float64 gradcheck. compute_loss is
the real one, taken from a dpo.py run (runpy), with the log-probs of a hand batch put in place of the model's."""

import math

import pytest
import torch
import torch.nn.functional as F

from data import collate_pairs
from logprobs import (average_logps, concatenated_logps, length_desensitized, prefix_shared_logps, summed_logps,
                      wpo_token_logps, wpo_weights)
from losses import (EXP_CAP, aot_loss, apo_down_loss, apo_zero_loss, bco_loss, capped_exp, discopop_loss, dpo_loss,
                    exo_loss, f_divergence, hinge_loss, ipo_loss, nca_loss, robust_loss, sppo_hard_loss)
from model import GPT, GPTConfig
from nanopo import runtime
from nanopo.checkpoint import ReferenceSync, mix_into
from nanopo.runtime import SINGLE_PROCESS_CPU, RunningMean
from test_dpo_options import SFT, run_script

LN2 = math.log(2)
E, PAD = 256, 257  # the byte tokenizer's EOS and padding ids


def t(*xs, grad=False):
    return torch.tensor(xs, dtype=torch.float64, requires_grad=grad)


def softplus(x):  # log(1 + e^x), by the math module
    return x + math.log1p(math.exp(-x)) if x > 0 else math.log1p(math.exp(x))


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


# One batch of two pairs used for the hand values: chosen log-ratios c = pc - rc = [1, -1], rejected log-ratios
# r = pr - rr = [-1, 0.5], margins h = c - r = [2, -1.5]; beta = 0.5
PC, PR, RC, RR = t(-1.0, -6.0), t(-3.0, -2.0), t(-2.0, -5.0), t(-2.0, -2.5)
C, R, H, BETA = [1.0, -1.0], [-1.0, 0.5], [2.0, -1.5], 0.5


def mean(xs):
    return sum(xs) / len(xs)


HAND = {  # name: (the loss as called, its value by hand)
    "robust": (lambda: robust_loss(PC, PR, RC, RR, BETA, 0.1),
               mean([(0.9 * softplus(-BETA * h) - 0.1 * softplus(BETA * h)) / 0.8 for h in H])),
    "exo": (lambda: exo_loss(PC, PR, RC, RR, BETA, 0.01),
            mean([sigmoid(BETA * h) * (math.log(sigmoid(BETA * h)) - math.log(0.99))
                  + sigmoid(-BETA * h) * (math.log(sigmoid(-BETA * h)) - math.log(0.01)) for h in H])),
    "nca": (lambda: nca_loss(PC, PR, RC, RR, BETA),
            mean([softplus(-BETA * c) + 0.5 * softplus(BETA * c) + 0.5 * softplus(BETA * r) for c, r in zip(C, R)])),
    "bco": (lambda: bco_loss(PC, PR, RC, RR, BETA, delta=0.3),
            mean([softplus(-(BETA * c - 0.3)) + softplus(BETA * r - 0.3) for c, r in zip(C, R)])),
    "sppo_hard": (lambda: sppo_hard_loss(PC, PR, RC, RR, BETA),
                  mean([(c - 1.0) ** 2 + (r + 1.0) ** 2 for c, r in zip(C, R)])),  # 1 / (2 beta) = 1
    # paired: sort(pc - pr) = sort([2, -4]) = [-4, 2], sort(rc - rr) = sort([0, -2.5]) = [-2.5, 0]
    "aot": (lambda: aot_loss(PC, PR, RC, RR, BETA), mean([softplus(-BETA * d) for d in (-1.5, 2.0)])),
    # unpaired: sort(c) = [-1, 1], sort(r) = [-1, 0.5]
    "aot_unpaired": (lambda: aot_loss(PC, PR, RC, RR, BETA, unpaired=True),
                     mean([softplus(-BETA * d) for d in (0.0, 0.5)])),
    "aot_smoothed": (lambda: aot_loss(PC, PR, RC, RR, BETA, 0.2),
                     mean([0.8 * softplus(-BETA * d) + 0.2 * softplus(BETA * d) for d in (-1.5, 2.0)])),
    "apo_zero": (lambda: apo_zero_loss(PC, PR, RC, RR, BETA),
                 mean([1 - sigmoid(BETA * c) + sigmoid(BETA * r) for c, r in zip(C, R)])),
    "apo_down": (lambda: apo_down_loss(PC, PR, RC, RR, BETA),
                 mean([sigmoid(BETA * c) + 1 - sigmoid(BETA * (c - r)) for c, r in zip(C, R)])),
    "discopop": (lambda: discopop_loss(PC, PR, RC, RR, BETA, tau=0.25),
                 mean([(1 - sigmoid(BETA * h / 0.25)) * softplus(-BETA * h) + sigmoid(BETA * h / 0.25)
                       * math.exp(-BETA * h) for h in H])),
}


@pytest.mark.parametrize("name", HAND)
def test_hand_values_and_rewards(name):
    fn, expected = HAND[name]
    loss, chosen_rewards, rejected_rewards = fn()
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert chosen_rewards.tolist() == pytest.approx([BETA * c for c in C])  # beta (policy - ref), unsorted
    assert rejected_rewards.tolist() == pytest.approx([BETA * r for r in R])
    assert not chosen_rewards.requires_grad


AT_REFERENCE = {  # loss at policy = reference, in closed form (beta = 0.3)
    dpo_loss: LN2, robust_loss: LN2, aot_loss: LN2, nca_loss: 2 * LN2, bco_loss: 2 * LN2,
    sppo_hard_loss: 1 / (2 * 0.3 ** 2), apo_zero_loss: 1.0, apo_down_loss: 1.0, discopop_loss: (1 + LN2) / 2,
    exo_loss: math.log(0.5) - 0.5 * math.log(1e-3 * (1 - 1e-3)),
}


@pytest.mark.parametrize("fn", AT_REFERENCE, ids=lambda f: f.__name__)
def test_value_at_policy_equal_reference(fn):
    x, y = t(-3.0, -10.0, -0.5), t(-4.0, -1.0, -2.5)
    loss, cr, rr = fn(x, y, x.clone(), y.clone(), beta=0.3)
    assert loss.item() == pytest.approx(AT_REFERENCE[fn], rel=1e-12)
    assert cr.tolist() == [0.0] * 3 and rr.tolist() == [0.0] * 3
    if fn is aot_loss:
        assert aot_loss(x, y, x.clone(), y.clone(), 0.3, unpaired=True)[0].item() == pytest.approx(LN2)


def test_special_cases_reduce_to_known_losses():
    dpo = dpo_loss(PC, PR, RC, RR, BETA)[0].item()
    assert robust_loss(PC, PR, RC, RR, BETA, 0.0)[0].item() == pytest.approx(dpo)  # rDPO with eps = 0 is DPO
    # EXO's minimum, 0, at beta h = log((1 - eps) / eps)
    eps = 0.05
    h = math.log((1 - eps) / eps) / BETA
    assert exo_loss(t(h), t(0.0), t(0.0), t(0.0), BETA, eps)[0].item() == pytest.approx(0.0, abs=1e-12)
    # NCA's chosen reward settles at ln 2: d loss / d pc = 0 there (rejected far below, its term flat)
    pc = t(LN2 / BETA, grad=True)
    nca_loss(pc, t(-200.0), t(0.0), t(0.0), BETA)[0].backward()
    assert pc.grad.item() == pytest.approx(0.0, abs=1e-12)
    # hinge and IPO accept WPO weights too: mean(w * loss_i)
    w = t(0.5, 0.25)
    assert hinge_loss(PC, PR, RC, RR, BETA, weights=w)[0].item() == pytest.approx(
        mean([0.5 * max(0.0, 1 - BETA * 2.0), 0.25 * max(0.0, 1 - BETA * -1.5)]))
    assert ipo_loss(PC, PR, RC, RR, BETA, weights=w)[0].item() == pytest.approx(
        mean([0.5 * (2.0 - 1.0) ** 2, 0.25 * (-1.5 - 1.0) ** 2]))


def test_discopop_bump_near_zero():
    """The docstring's claims: with tau = 0.05 the loss rises with the margin at h = 0 (pushing it negative) and
    has a local minimum near beta h = -0.12; with tau = 0.25 it falls at 0, as DPO does."""
    x = torch.linspace(-0.5, 0.5, 20001, dtype=torch.float64)
    zero = torch.zeros_like(x)
    per_pair = torch.sigmoid(-x / 0.05) * F.softplus(-x) + torch.sigmoid(x / 0.05) * torch.exp(-x)  # by formula
    assert discopop_loss(x, zero, zero, zero, 1.0, 0.05)[0].item() == pytest.approx(per_pair.mean().item())
    slope = torch.diff(per_pair)
    minima = x[1:-1][(slope[:-1] < 0) & (slope[1:] >= 0)]
    assert len(minima) == 1 and -0.13 < minima.item() < -0.11
    for tau, sign in ((0.05, 1), (0.25, -1)):
        h = t(0.0, grad=True)
        discopop_loss(h, t(0.0), t(0.0), t(0.0), 1.0, tau)[0].backward()
        assert h.grad.item() * sign > 0


def test_aot_sorts_within_the_batch_it_is_given():
    """The documented micro-batch semantics: the loss of a batch is not the mean of its halves' losses (each
    half is sorted on its own), while DPO's is."""
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(8, generator=g, dtype=torch.float64) for _ in range(4))
    halves = [(pc[i:i + 4], pr[i:i + 4], rc[i:i + 4], rr[i:i + 4]) for i in (0, 4)]
    for fn, same in ((dpo_loss, True), (aot_loss, False)):
        whole = fn(pc, pr, rc, rr, 1.0)[0].item()
        split = mean([fn(*half, 1.0)[0].item() for half in halves])
        assert (abs(whole - split) < 1e-12) == same
    # and what "sorted" means: permuting the pairs leaves AOT unchanged, pairing chosen i with rejected j does
    # not matter for aot_unpaired either
    perm = torch.randperm(8, generator=g)
    whole = aot_loss(pc, pr, rc, rr, 1.0)[0].item()
    assert aot_loss(pc[perm], pr[perm], rc[perm], rr[perm], 1.0)[0].item() == pytest.approx(whole)
    assert aot_loss(pc, pr[perm], rc, rr[perm], 1.0)[0].item() != pytest.approx(whole)  # paired: it does matter
    assert aot_loss(pc, pr[perm], rc, rr[perm], 1.0, unpaired=True)[0].item() == pytest.approx(
        aot_loss(pc, pr, rc, rr, 1.0, unpaired=True)[0].item())


# ---------------------------------------------------------------- f-divergences

def test_f_divergence_closed_forms():
    u, a = [-2.0, -0.3, 0.0, 0.7, 3.0], 0.4
    x = t(*u)
    assert f_divergence(x, "reverse_kl").tolist() == u
    assert f_divergence(x, "forward_kl").tolist() == pytest.approx([1 - math.exp(-v) for v in u], rel=1e-12)
    assert f_divergence(x, "js").tolist() == pytest.approx([math.log(2 * math.exp(v) / (1 + math.exp(v))) for v in u])
    assert f_divergence(x, "alpha", a).tolist() == pytest.approx([(1 - math.exp(-a * v)) / a for v in u])
    # alpha = 1 is forward KL; alpha -> 0 approaches reverse KL
    assert f_divergence(x, "alpha", 1.0).tolist() == pytest.approx(f_divergence(x, "forward_kl").tolist())
    assert f_divergence(x, "alpha", 1e-6).tolist() == pytest.approx(u, abs=1e-5)
    with pytest.raises(ValueError):
        f_divergence(x, "kl")


def test_capped_exp_is_exp_then_its_tangent():
    x = t(EXP_CAP - 1.0, EXP_CAP, EXP_CAP + 3.0, 1e4, grad=True)
    y = capped_exp(x)
    cap = math.exp(EXP_CAP)
    assert y.tolist() == pytest.approx([math.exp(EXP_CAP - 1.0), cap, cap * 4.0, cap * (1 + 1e4 - EXP_CAP)])
    y.sum().backward()
    assert x.grad.tolist() == pytest.approx([math.exp(EXP_CAP - 1.0), cap, cap, cap])


def f_divergence_dpo(pc, pr, rc, rr, beta, kind, coef, weights=None):
    """DPO whose margin compares psi(log-ratio), composed by hand from losses.py's two functions."""
    zero = torch.zeros_like(pc)
    return dpo_loss(f_divergence(pc - rc, kind, coef), f_divergence(pr - rr, kind, coef), zero, zero, beta,
                    weights=weights)


@pytest.mark.parametrize("kind", ["forward_kl", "js", "alpha"])
def test_f_divergence_in_the_dpo_loss_by_hand(kind, compute_loss_for):
    """dpo with --f_divergence_type: -logsigmoid(beta (psi(c) - psi(r))), psi by hand; rewards stay beta *
    log-ratio (dpo.py's compute_loss)."""
    psi = {"forward_kl": lambda v: 1 - math.exp(-v), "js": lambda v: LN2 - softplus(-v),
           "alpha": lambda v: (1 - math.exp(-0.5 * v)) / 0.5}[kind]
    compute_loss = compute_loss_for("dpo", f_divergence_type=kind)
    loss, metrics = compute_loss(None, None, [None, None])
    assert loss.item() == pytest.approx(mean([softplus(-BETA * (psi(c) - psi(r))) for c, r in zip(C, R)]))
    assert metrics["rewards/chosen"].item() == pytest.approx(mean([BETA * c for c in C]))
    assert metrics["rewards/rejected"].item() == pytest.approx(mean([BETA * r for r in R]))
    # at policy = reference every psi(0) = 0: still ln 2
    x = t(-3.0, -1.0)
    assert f_divergence_dpo(x, x, x, x, BETA, kind, 0.5)[0].item() == pytest.approx(LN2)


# ---------------------------------------------------------------- gradients and numerical safety

ONE = torch.ones(1)  # token counts (only the NLL reads them)


def new_losses(weights=None):
    """Every loss of this file's family as f(pc, pr, rc, rr) -> scalar."""
    w = {"weights": weights}
    return {
        "robust": lambda *a: robust_loss(*a, 0.5, 0.2, **w)[0], "exo": lambda *a: exo_loss(*a, 0.5, 0.05, **w)[0],
        "nca": lambda *a: nca_loss(*a, 0.5, **w)[0], "bco": lambda *a: bco_loss(*a, 0.5, 0.4, **w)[0],
        "sppo_hard": lambda *a: sppo_hard_loss(*a, 0.5, **w)[0], "aot": lambda *a: aot_loss(*a, 0.5, 0.1)[0],
        "aot_unpaired": lambda *a: aot_loss(*a, 0.5, unpaired=True)[0],
        "apo_zero": lambda *a: apo_zero_loss(*a, 0.5, **w)[0], "apo_down": lambda *a: apo_down_loss(*a, 0.5, **w)[0],
        "discopop": lambda *a: discopop_loss(*a, 0.5, 0.05, **w)[0],
        "dpo_wpo": lambda *a: dpo_loss(*a, 0.5, **w)[0],
        **{f"dpo_{k}": (lambda *a, k=k: f_divergence_dpo(*a, 0.5, k, 0.7, **w)[0])
           for k in ("forward_kl", "js", "alpha")},
    }


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(0)

    def rnd():
        return (-3.0 + 2.5 * torch.rand(4, generator=g, dtype=torch.float64)).requires_grad_()
    inputs = (rnd(), rnd(), rnd(), rnd())
    weights = torch.rand(4, generator=g, dtype=torch.float64)
    for name, fn in {**new_losses(), **{k + "_weighted": v for k, v in new_losses(weights).items()}}.items():
        assert torch.autograd.gradcheck(fn, inputs), name
    for kind in ("forward_kl", "js", "alpha"):
        assert torch.autograd.gradcheck(lambda u, kind=kind: f_divergence(u, kind, 0.3), (inputs[0],)), kind


@pytest.mark.parametrize("delta", [1e4, -1e4])
def test_huge_margins_finite(delta):
    d = torch.tensor([delta, 0.0], dtype=torch.float32, requires_grad=True)
    z = torch.zeros(2, requires_grad=True)
    zero = torch.zeros(2)
    for name, fn in new_losses(torch.tensor([1.0, 0.5])).items():
        for args in ((d, z, zero, zero), (z, d, zero, zero), (z, z, d, zero)):  # as chosen, rejected, reference
            out = fn(*args)
            grads = torch.autograd.grad(out, (d, z), allow_unused=True)
            assert torch.isfinite(out), (name, args)
            assert all(g is None or torch.isfinite(g).all() for g in grads), name


def test_empty_responses_and_average_log_prob_zero_finite():
    logps, n = summed_logps(torch.randn(2, 5), torch.zeros(2, 5))  # two empty responses: sums 0, counts 0
    avg = average_logps(logps, n)
    assert avg.tolist() == [0.0, 0.0]
    p = avg.clone().requires_grad_()
    for name, fn in new_losses().items():
        out = fn(p, p * 1, avg, avg)
        (g,) = torch.autograd.grad(out, p)
        assert torch.isfinite(out) and torch.isfinite(g).all(), name


# ---------------------------------------------------------------- dpo.py's compute_loss: combinations, RPO, BCO

NC, NR = t(2.0, 4.0), t(3.0, 1.0)  # token counts of the hand batch
W = t(1.0, 0.5)  # WPO weights of the hand batch


@pytest.fixture(scope="module")
def sft_ckpt(tmp_path_factory, repo_root):
    out = tmp_path_factory.mktemp("sft")
    run_script(repo_root, "sft.py", SFT + ["--max_iters=20", "--eval_interval=20", "--n_eval=20", f"--out_dir={out}"])
    return str(out / "ckpt.pt")


@pytest.fixture(scope="module")
def compute_loss_for(sft_ckpt, repo_root, tmp_path_factory):
    """compute_loss_for(loss_type, **settings): dpo.py's own compute_loss after a run of 0 steps with those
    settings (beta = BETA), whose log-prob functions are replaced by the hand batch: the policy's PC, PR (token
    counts NC, NR, WPO weights W), the reference's RC, RR."""
    def make(loss_type, **settings):
        out = tmp_path_factory.mktemp("dpo")
        args = [f"--loss_type={loss_type}", f"--beta={BETA}", "--max_iters=0", "--n_pairs=16", "--n_eval=10",
                "--batch_size=8", f"--sft_ckpt={sft_ckpt}", f"--out_dir={out}"]
        args += [f"--{k}={v}" for k, v in settings.items()]
        compute_loss = run_script(repo_root, "dpo.py", args)["compute_loss"]
        scope = compute_loss.__globals__  # the run's module globals, which compute_loss reads

        def pair_logps(model, pairs, wpo=False):
            if wpo:
                return PC, PR, NC, NR, W
            return PC, PR, NC, NR

        scope["pair_logps"] = pair_logps
        scope["reference_logps"] = lambda model, pairs, table_rows=None: (RC, RR)
        return compute_loss
    return make


def test_combination_is_the_weighted_sum_with_every_term_named(compute_loss_for):
    compute_loss = compute_loss_for("dpo+bco+sft", loss_weights="0.8,0.2,1.0", bco_running_delta=False)
    loss, metrics = compute_loss(None, None, [None, None])
    dpo = mean([softplus(-BETA * h) for h in H])
    bco = mean([softplus(-BETA * c) + softplus(BETA * r) for c, r in zip(C, R)])
    sft = (1.0 + 6.0) / (2.0 + 4.0)  # -sum(pc) / sum(nc)
    assert loss.item() == pytest.approx(0.8 * dpo + 0.2 * bco + 1.0 * sft)
    assert metrics["dpo/loss"].item() == pytest.approx(dpo) and metrics["bco/loss"].item() == pytest.approx(bco)
    assert metrics["sft/loss"].item() == pytest.approx(sft) and metrics["sft/nll_loss"].item() == pytest.approx(sft)
    assert metrics["bco/delta"].item() == 0.0
    margins = mean([BETA * h for h in H])
    for key in ("rewards/margins", "dpo/rewards/margins", "bco/rewards/margins"):
        assert metrics[key].item() == pytest.approx(margins), key
    assert metrics["rewards/accuracies"].item() == 0.5
    assert not any(k.startswith("sft/rewards") for k in metrics)
    # one term logs TRL's plain names only
    _, single = compute_loss_for("dpo")(None, None, [None, None])
    assert set(single) == {"logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected",
                           "rewards/margins", "rewards/accuracies"}


def test_options_act_on_the_terms_they_apply_to(compute_loss_for):
    """In dpo+nca, the f-divergence reshapes DPO's margin only; NCA keeps its own log-ratios."""
    _, metrics = compute_loss_for("dpo+nca", f_divergence_type="js")(None, None, [None, None])
    psi = lambda v: LN2 - softplus(-v)  # noqa: E731
    expected = mean([softplus(-BETA * (psi(c) - psi(r))) for c, r in zip(C, R)])
    assert metrics["dpo/loss"].item() == pytest.approx(expected)
    assert metrics["nca/loss"].item() == pytest.approx(HAND["nca"][1])


def test_dpo_norm_is_dpo_on_average_log_probs(compute_loss_for):
    loss, metrics = compute_loss_for("dpo_norm")(None, None, [None, None])
    # h on averages: (pc/nc - rc/nc) - (pr/nr - rr/nr) = [1/2 - (-1/3), -1/4 - 1/2]
    hs = [0.5 + 1 / 3, -0.25 - 0.5]
    assert loss.item() == pytest.approx(mean([softplus(-BETA * h) for h in hs]))
    assert metrics["rewards/margins"].item() == pytest.approx(mean([BETA * h for h in hs]))


def test_rpo_and_wpo_in_compute_loss(compute_loss_for):
    compute_loss = compute_loss_for("nca", rpo_alpha=0.5, use_weighting=True)
    loss, metrics = compute_loss(None, None, [None, None])
    nca = mean([wi * (softplus(-BETA * c) + 0.5 * softplus(BETA * c) + 0.5 * softplus(BETA * r))
                for wi, c, r in zip(W.tolist(), C, R)])
    assert loss.item() == pytest.approx(nca + 0.5 * 7.0 / 6.0)
    assert metrics["nll_loss"].item() == pytest.approx(7.0 / 6.0)
    assert metrics["wpo_weight"].item() == pytest.approx(0.75)


def test_bco_running_mean_moves_on_training_batches_only(compute_loss_for):
    compute_loss = compute_loss_for("bco")  # bco_running_delta=True, dpo.py's default
    running = compute_loss.__globals__["bco_reward_mean"]
    # the 0-step run evaluated no held-out rows through the loss (the embedded task has a verifier)
    assert running.count == 0
    seen = [BETA * c for c in C] + [BETA * r for r in R]  # first batch's rewards: mean -0.125
    loss, metrics = compute_loss(None, None, [None, None])
    delta = mean(seen)
    assert metrics["delta"].item() == pytest.approx(delta)
    assert loss.item() == pytest.approx(mean([softplus(-(BETA * c - delta)) + softplus(BETA * r - delta)
                                              for c, r in zip(C, R)]))
    scope = compute_loss.__globals__
    scope["pair_logps"] = lambda model, pairs, wpo=False: (PC + 1.0, PR + 1.0, NC, NR)
    compute_loss(None, None, [None, None])  # second batch: every reward + 0.5
    seen += [s + 0.5 for s in seen]
    assert running.mean == pytest.approx(mean(seen))
    with torch.no_grad():  # held-out evaluation reads the mean, never moves it
        _, metrics = compute_loss(None, None, [None, None])
    assert metrics["delta"].item() == pytest.approx(mean(seen)) and running.count == 8


def test_running_mean_checkpoint_round_trip():
    m = RunningMean("bco_running_delta")
    assert m.state_dict() == {} and m.mean == 0.0  # nothing seen: nothing to keep
    m.update(t(1.0, 2.0, 4.0))
    again = RunningMean("bco_running_delta")
    again.load_state_dict({"iter_num": 3, **m.state_dict()})
    assert (again.total, again.count, again.mean) == (7.0, 3, pytest.approx(7.0 / 3))


def test_running_mean_adds_the_ranks_first(monkeypatch):
    class FakeRanks:  # as if another rank had sent sum 10 over 2 values
        ddp = True
    m = RunningMean("delta")
    monkeypatch.setattr(runtime, "all_reduce_sum",
                        lambda totals, rt: totals + torch.tensor([10.0, 2.0], dtype=torch.float64))
    m.update(t(1.0, 2.0, 3.0), FakeRanks())
    assert m.mean == pytest.approx((6.0 + 10.0) / 5)


# ---------------------------------------------------------------- WPO and LD-DPO (logprobs.py)

def test_wpo_token_log_weights_by_hand():
    logits = torch.tensor([[[0.0, 1.0, 2.0], [3.0, 0.0, -1.0]]])  # (1, 2, 3)
    targets = torch.tensor([[1, 0]])
    expected = []
    for row, y in zip(logits[0].tolist(), targets[0].tolist()):
        z = sum(math.exp(v) for v in row)
        p = [math.exp(v) / z for v in row]
        expected.append(math.log(p[y]) - math.log(sum(q * q for q in p)))
    assert wpo_token_logps(logits, targets)[0].tolist() == pytest.approx(expected, rel=1e-6)
    # a pair's weight: exp(mean over chosen + mean over rejected), capped at 1
    w = wpo_weights(t(-1.0, 0.4), t(-0.5, 0.6), t(2.0, 1.0), t(1.0, 2.0))
    assert w.tolist() == pytest.approx([math.exp(-0.5 - 0.5), 1.0])


def test_length_desensitized_by_hand():
    per_token = torch.tensor([[-9.0, -1.0, -2.0, -3.0, -7.0],    # prompt, 3 response tokens, padding
                              [-9.0, -9.0, -0.5, -4.0, -7.0]])   # 2 prompt tokens, 2 response tokens, padding
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 0]], dtype=torch.float32)
    public = torch.tensor([2.0, 2.0])  # min(3, 2): the pair's shared length
    assert length_desensitized(per_token, mask, public, 0.5).tolist() == [-1.0 - 2.0 + 0.5 * -3.0, -4.5]
    assert length_desensitized(per_token, mask, public, 1.0).tolist() == summed_logps(per_token, mask)[0].tolist()
    assert length_desensitized(per_token, mask, public, 0.0).tolist() == [-3.0, -4.5]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=32, vocab_size=258, n_layer=2, n_head=2, n_embd=32, dropout=0.0))
    with torch.no_grad():  # larger weights than GPT-2's init, so log-probs and weights vary clearly
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.eval()


PAIRS = [([10, 11, 12], [20, 21, 22, 23, E], [30, E]), ([40, 41], [50, E], [60, 61, 62, E]),
         ([70], [80, 81, E], [90, 91, 92, E])]


def by_hand(model, prompt, response, public, alpha):
    """Summed LD log-prob and the WPO mean log-weight of one response, from a forward of its own row, token by
    token with the math module."""
    logits = model(torch.tensor([prompt + response[:-1]]))[0].double()
    ld, log_w = 0.0, 0.0
    for k, y in enumerate(response):
        row = logits[len(prompt) - 1 + k].tolist()
        z = max(row) + math.log(sum(math.exp(v - max(row)) for v in row))
        logp = row[y] - z
        ld += logp if k < public else alpha * logp
        log_w += logp - math.log(sum(math.exp(2 * (v - z)) for v in row))
    return ld, log_w / len(response)


@pytest.mark.parametrize("layout", ["concatenated", "prefix_shared"])
def test_wpo_and_ld_dpo_against_per_row_forwards(model, layout):
    alpha = 0.3
    fn = concatenated_logps if layout == "concatenated" else prefix_shared_logps
    with torch.no_grad():
        pc, pr, nc, nr, w = fn(model, PAIRS, PAD, 32, "cpu", ld_alpha=alpha, wpo=True)
    for i, (p, c, r) in enumerate(PAIRS):
        public = min(len(c), len(r))
        ld_c, w_c = by_hand(model, p, c, public, alpha)
        ld_r, w_r = by_hand(model, p, r, public, alpha)
        assert pc[i].item() == pytest.approx(ld_c, abs=1e-4) and pr[i].item() == pytest.approx(ld_r, abs=1e-4)
        assert w[i].item() == pytest.approx(min(1.0, math.exp(w_c + w_r)), rel=1e-4)
        assert (nc[i].item(), nr[i].item()) == (len(c), len(r))
    assert 0 < w.min() and w.max() <= 1 and w.min() < 1  # the check is not trivially "all ones"
    idx, targets, mask = collate_pairs(PAIRS, PAD)
    plain = summed_logps(torch.log_softmax(model(idx), -1).gather(2, targets[..., None])[..., 0], mask)[0]
    assert (pc - plain[:3]).abs().max() > 0.1  # the discount changed something


# ---------------------------------------------------------------- TR-DPO (nanopo/checkpoint.py)

def tiny(seed):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=16, vocab_size=40, n_layer=1, n_head=2, n_embd=16, dropout=0.0))


def test_mix_equals_a_hand_mix():
    reference, policy = tiny(0), tiny(1)
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    mix_into(reference, policy, 0.3)
    pol = policy.state_dict()
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(value, 0.3 * pol[name] + 0.7 * before[name], rtol=0, atol=1e-7)


def test_reference_sync_schedule_and_state():
    reference, policy = tiny(0), tiny(1)
    sync = ReferenceSync(reference, policy, steps=3, alpha=1.0, rt=SINGLE_PROCESS_CPU)
    assert sync.state_dict() == {}  # not moved yet: a checkpoint needs nothing
    for it in range(2):
        sync.after_step(it)
    assert sync.syncs == 0 and not torch.equal(reference.lm_head.weight, policy.lm_head.weight)
    sync.after_step(2)  # the third step: alpha = 1 copies the policy
    assert sync.syncs == 1 and all(torch.equal(a, b) for a, b in zip(reference.parameters(), policy.parameters()))
    state = sync.state_dict()
    fresh_reference = tiny(2)
    resumed = ReferenceSync(fresh_reference, policy, steps=3, alpha=1.0, rt=SINGLE_PROCESS_CPU)
    resumed.load_state_dict(state)
    assert resumed.syncs == 1
    assert all(torch.equal(a, b) for a, b in zip(fresh_reference.parameters(), reference.parameters()))
    off = ReferenceSync(reference, policy, steps=0, alpha=0.5, rt=SINGLE_PROCESS_CPU)
    for it in range(10):
        off.after_step(it)
    assert off.syncs == 0
