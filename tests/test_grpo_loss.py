"""losses.grpo_loss and losses.group_advantages against independent computations: plain Python
loops over the tokens in float64 for every loss_type and both importance-sampling levels, with
answers of unequal lengths; REINFORCE's gradient in closed form; the k3 estimator's expectation
equal to the exact KL on a tiny vocabulary; advantages by hand for each scale_rewards."""

import math

import pytest
import torch

import losses
from configurator import UserError


def by_hand(logp, old, ref, mask, adv, beta, eps, eps_high, loss_type, level, max_len):
    """The loss, token by token, in Python floats."""
    B, T = len(logp), len(logp[0])
    per_answer = []
    for b in range(B):
        tokens = [t for t in range(T) if mask[b][t]]
        seq_ratio = None
        if level == "sequence":
            mean_log_ratio = sum(logp[b][t] - old[b][t] for t in tokens) / max(len(tokens), 1)
            seq_ratio = math.exp(mean_log_ratio)
        terms = []
        for t in tokens:
            r = seq_ratio if seq_ratio is not None else math.exp(logp[b][t] - old[b][t])
            c = min(max(r, 1 - eps), 1 + eps_high)
            term = -min(r * adv[b], c * adv[b])
            if beta:
                d = ref[b][t] - logp[b][t]
                term += beta * (math.exp(d) - d - 1)
            terms.append(term)
        per_answer.append(terms)
    if loss_type == "grpo":
        return sum(sum(ts) / max(len(ts), 1) for ts in per_answer) / B
    if loss_type in ("bnpo", "dapo"):
        return sum(sum(ts) for ts in per_answer) / max(sum(len(ts) for ts in per_answer), 1)
    return sum(sum(ts) for ts in per_answer) / (B * max_len)


def random_batch(seed, B=5, T=7):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    # the old policy within a ratio of e^0.6 of the current one: some tokens get clipped
    old = logp + (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5) * 1.2
    ref = logp + (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5) * 2.0
    lengths = [7, 3, 1, 5, 0]  # unequal, and one empty answer
    mask = torch.tensor([[1.0 if t < n else 0.0 for t in range(T)] for n in lengths],
                        dtype=torch.float64)
    adv = torch.tensor([1.3, -0.7, 0.4, -1.9, 0.8], dtype=torch.float64)
    return logp, old, ref, mask, adv


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_against_token_by_token_values(loss_type, level, beta):
    logp, old, ref, mask, adv = random_batch(0)
    loss, metrics = losses.grpo_loss(logp, old, ref, mask, adv, beta=beta, epsilon=0.2,
                                     epsilon_high=0.28, loss_type=loss_type,
                                     importance_sampling_level=level, max_completion_length=9)
    want = by_hand(logp.tolist(), old.tolist(), ref.tolist(), mask.tolist(), adv.tolist(), beta,
                   0.2, 0.28, loss_type, level, 9)
    assert loss.item() == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert ("kl" in metrics) == (beta != 0)
    if level == "token":
        # clipping happened somewhere in this batch, in both directions
        assert 0 < metrics["clip_ratio/low_mean"] < 1 and 0 < metrics["clip_ratio/high_mean"] < 1
    else:
        # one ratio per answer: the clip ratios count answers, as TRL's, so they are multiples of 1/5
        for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
            assert (metrics[key].item() * 5) == pytest.approx(round(metrics[key].item() * 5))


def test_kl_metric_and_clip_ratios_by_hand():
    logp, old, ref, mask, adv = random_batch(1)
    _, metrics = losses.grpo_loss(logp, old, ref, mask, adv, beta=0.1, epsilon=0.2)
    kl, low, high, n = 0.0, 0, 0, 0
    for b in range(5):
        for t in range(7):
            if mask[b, t]:
                d = (ref[b, t] - logp[b, t]).item()
                kl += math.exp(d) - d - 1
                r = math.exp((logp[b, t] - old[b, t]).item())
                low += r < 0.8 and adv[b] < 0
                high += r > 1.2 and adv[b] > 0
                n += 1
    assert metrics["kl"].item() == pytest.approx(kl / n, rel=1e-12)
    assert metrics["clip_ratio/low_mean"].item() == pytest.approx(low / n)
    assert metrics["clip_ratio/high_mean"].item() == pytest.approx(high / n)
    assert metrics["clip_ratio/region_mean"].item() == pytest.approx((low + high) / n)


def test_on_policy_without_kl_the_gradient_is_reinforce_with_the_group_baseline():
    """old = None (ratio 1) and beta = 0: d loss / d logp_t = -A_b / (B * |y_b|) on the answer's
    tokens (loss_type grpo), the policy-gradient estimate with the group mean as baseline."""
    logp, _, _, mask, _ = random_batch(2)
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 2.0], dtype=torch.float64)
    adv = losses.group_advantages(rewards, group_size=5, scale_rewards="none")
    logp = logp.clone().requires_grad_(True)
    loss, _ = losses.grpo_loss(logp, None, None, mask, adv, loss_type="grpo")
    loss.backward()
    mean = sum(rewards.tolist()) / 5
    for b in range(5):
        n = int(mask[b].sum())
        for t in range(7):
            want = -(rewards[b].item() - mean) / (5 * n) if t < n else 0.0
            assert logp.grad[b, t].item() == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_k3_estimates_the_exact_kl_on_a_tiny_vocabulary():
    """Over tokens drawn from the policy p, k3 = q/p - log(q/p) - 1 has expectation KL(p || q)
    exactly (E_p[q/p] = 1); its sample mean lands within 4 standard errors."""
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=torch.float64)
    q = torch.tensor([0.3, 0.3, 0.2, 0.1, 0.1], dtype=torch.float64)
    exact = sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist()))
    k3 = torch.exp(q.log() - p.log()) - (q.log() - p.log()) - 1
    assert (p * k3).sum().item() == pytest.approx(exact, rel=1e-12)
    g = torch.Generator().manual_seed(0)
    tokens = torch.multinomial(p, 200_000, replacement=True, generator=g)
    logp, ref = p.log()[tokens].unsqueeze(0), q.log()[tokens].unsqueeze(0)
    mask = torch.ones_like(logp)
    _, metrics = losses.grpo_loss(logp, None, ref, mask, torch.zeros(1, dtype=torch.float64),
                                  beta=1.0)
    stderr = k3[tokens].std().item() / math.sqrt(len(tokens))
    assert abs(metrics["kl"].item() - exact) < 4 * stderr


def test_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])  # two groups of 4
    group = losses.group_advantages(rewards, 4, "group")
    # group 1: mean 0.5, unbiased std sqrt(1/3); group 2: all equal, so 0 (never 0/0)
    s = math.sqrt(1 / 3)
    want = [0.5 / (s + 1e-4), -0.5 / (s + 1e-4), -0.5 / (s + 1e-4), 0.5 / (s + 1e-4), 0, 0, 0, 0]
    assert group.tolist() == pytest.approx(want, rel=1e-6, abs=1e-7)
    batch = losses.group_advantages(rewards, 4, "batch")
    mean_all = sum(rewards.tolist()) / 8
    std_all = math.sqrt(sum((r - mean_all) ** 2 for r in rewards.tolist()) / 7)
    assert batch.tolist() == pytest.approx([x * (s + 1e-4) / (std_all + 1e-4) for x in want],
                                           rel=1e-6, abs=1e-7)
    none = losses.group_advantages(rewards, 4, "none")
    assert none.tolist() == [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]
    assert torch.isfinite(losses.group_advantages(torch.ones(8), 4, "group")).all()


def test_dapo_is_the_global_token_mean_when_weighted_by_token_share():
    """Two micro-batches weighted by their share of the step's tokens give the loss over all
    tokens at once (what TRL's dapo divides by); bnpo's row shares would not."""
    logp, old, ref, mask, adv = random_batch(3)
    whole, _ = losses.grpo_loss(logp, old, ref, mask, adv, beta=0.04, loss_type="dapo")
    parts = 0.0
    for rows in (slice(0, 2), slice(2, 5)):
        part, _ = losses.grpo_loss(logp[rows], old[rows], ref[rows], mask[rows], adv[rows],
                                   beta=0.04, loss_type="dapo")
        parts += part * mask[rows].sum() / mask.sum()
    assert parts.item() == pytest.approx(whole.item(), rel=1e-12)


def test_bad_names_are_one_line_errors():
    logp, old, ref, mask, adv = random_batch(4)
    with pytest.raises(UserError, match="unknown GRPO loss_type 'ppo'"):
        losses.grpo_loss(logp, old, ref, mask, adv, loss_type="ppo")
    with pytest.raises(UserError, match="unknown scale_rewards 'rank'"):
        losses.group_advantages(torch.zeros(4), 2, "rank")


def test_the_sequence_level_ratio_is_one_number_per_answer():
    """GSPO: shifting every token's log-prob of one answer by the same c changes its ratio by e^c,
    whatever its length; the token level would compound it per token in the mean instead."""
    logp, _, _, mask, adv = random_batch(5)
    old = logp.detach().clone()
    old[0] -= 0.1  # answer 0's ratio: e^0.1 at every token, and e^0.1 for the sequence
    seq, _ = losses.grpo_loss(logp, old, None, mask, adv, epsilon=1.0,
                              importance_sampling_level="sequence")
    tok, _ = losses.grpo_loss(logp, old, None, mask, adv, epsilon=1.0)
    assert seq.item() == pytest.approx(tok.item(), rel=1e-12)
    want = (-math.exp(0.1) * 1.3 + 0.7 - 0.4 + 1.9 + 0.0) / 5  # the empty answer adds 0
    assert seq.item() == pytest.approx(want, rel=1e-12)


def test_a_padding_position_that_overflows_gives_no_nan():
    """A padding column whose log-probs are nonsense (the ratio and exp(ref - logp) overflow to
    inf) must not turn the loss or its gradient into NaN (inf * 0): padding is masked by where."""
    logp, old, ref, mask, adv = random_batch(6)
    logp, old, ref = logp.clone(), old.clone(), ref.clone()
    logp[1, 6], old[1, 6], ref[1, 6] = 0.0, -1e4, 1e4  # row 1 has 3 tokens: column 6 is padding
    logp.requires_grad_(True)
    for level in ("token", "sequence"):
        loss, metrics = losses.grpo_loss(logp, old, ref, mask, adv, beta=0.04,
                                         importance_sampling_level=level)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
        assert torch.isfinite(metrics["kl"])
        logp.grad = None
