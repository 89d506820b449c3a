"""
Preference-optimisation losses, each a short pure function of per-sequence log-probabilities: the
whole family side by side, the one place to compare them. Which one a run uses is a table at the end
(LOSSES, looked up by dpo.py's compute_loss), with which setting applies to which loss.

TRL's DPOTrainer loss_type (1.16) -> our --loss_type -> the function here
  sigmoid        dpo            dpo_loss (label_smoothing > 0: conservative DPO)
  sigmoid_norm   dpo_norm       dpo_loss on per-token average log-probs (length-normalised DPO)
  ipo            ipo            ipo_loss (average log-probs, as TRL)
  hinge          hinge          hinge_loss
  robust         robust         robust_loss
  exo_pair       exo            exo_loss
  nca_pair       nca            nca_loss
  bco_pair       bco            bco_loss (delta = 0 is TRL's; dpo.py keeps the paper's running mean)
  sppo_hard      sppo_hard      sppo_hard_loss
  aot            aot            aot_loss
  aot_unpaired   aot_unpaired   aot_loss(unpaired=True)
  apo_zero       apo_zero       apo_zero_loss
  apo_down       apo_down       apo_down_loss
  discopop       discopop       discopop_loss
  sft            sft            sft_loss
  [a, b, ...] + loss_weights (MPO)  --loss_type=a+b+...          dpo.py's compute_loss
                                    --loss_weights=...
  f_divergence_type                 --f_divergence_type          f_divergence
  rpo_alpha                         --rpo_alpha                  + rpo_alpha * sft_loss
  use_weighting (WPO), ld_alpha     --use_weighting, --ld_alpha  logprobs.py (they act on log-probs)
  sync_ref_model (TR-DPO)           --ref_sync_steps,            nanopo/checkpoint.py
                                    --ref_mixup_alpha
TRL's other trainers: CPOTrainer's simpo -> simpo (simpo_loss), ORPOTrainer -> orpo (orpo_loss),
KTOTrainer -> kto (kto_loss, batches in nanopo/kto.py).

Names, everywhere in this repo: pc, pr = the policy's log-probs of the chosen / rejected response;
rc, rr = the reference's (the frozen SFT model); *_logps = summed over the response's tokens + EOS,
*_avg_logps = divided by their number (logprobs.average_logps; an empty response gives 0,
never 0/0); all (B,). h = (pc - rc) - (pr - rr), the implicit-reward margin.
Pairwise losses return (loss, chosen_rewards, rejected_rewards): loss is the batch mean
(weighted by WPO's `weights` when given), rewards are beta * (policy - reference) per
response, detached.

Numerical safety: logsigmoid, never log(sigmoid); exponentials only of arguments bounded above.
|margins| of 1e4, empty responses and average log-prob 0 give finite values and gradients
(tests/test_losses.py).
"""

import math

import torch
import torch.nn.functional as F

import configurator
from configurator import UserError


def batch_mean(losses, weights=None):
    """Mean of per-pair losses (B,), each weighted by `weights` (B,) when given (WPO; detached)."""
    return losses.mean() if weights is None else (losses * weights).mean()


def implicit_rewards(beta, pc, pr, rc, rr):
    """DPO's implicit rewards beta * (policy - reference) of the chosen and the rejected
    responses, detached."""
    return beta * (pc - rc).detach(), beta * (pr - rr).detach()


# --------------------------------------------------------------------------------------------------
# Pairwise, against a reference: functions of the margin h

def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
             reference_rejected_logps, beta=0.1, label_smoothing=0.0, weights=None):
    """Direct Preference Optimization (Rafailov et al. 2023, arXiv:2305.18290), sigmoid form.

        h      = (pc - rc) - (pr - rr)                 # = (chosen reward - rejected reward) / beta
        loss   = -logsigmoid(beta * h)                 # label_smoothing = 0
        # conservative DPO, eps > 0:
        loss   = -(1 - eps) logsigmoid(beta h) - eps logsigmoid(-beta h)
        reward = beta * (policy - ref), per response

    pc, pr, rc, rr are summed log-probs of whole responses (not averages). The gradient of the plain
    loss is -beta * sigmoid(-beta h) * (grad pc - grad pr): it pushes chosen up and rejected down,
    weighted by how wrong the implicit reward model is. Conservative DPO (cDPO, Mitchell 2023 note)
    assumes labels flip with probability eps, so the loss no longer drives h to infinity.
    beta sets the strength of the KL penalty towards the reference: larger beta = stay closer.
    Fed per-token average log-probs it is length-normalised DPO (TRL's sigmoid_norm, our dpo_norm).
    Returns (loss: scalar batch mean, chosen_rewards: (B,), rejected_rewards: (B,))."""
    pc, pr = policy_chosen_logps, policy_rejected_logps
    rc, rr = reference_chosen_logps, reference_rejected_logps
    h = (pc - rc) - (pr - rr)
    losses = (-F.logsigmoid(beta * h) * (1 - label_smoothing)
              - F.logsigmoid(-beta * h) * label_smoothing)
    return batch_mean(losses, weights), *implicit_rewards(beta, pc, pr, rc, rr)


def robust_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                reference_rejected_logps, beta=0.1, label_smoothing=0.0, weights=None):
    """Robust DPO, rDPO ("Provably Robust DPO: Aligning Language Models with Noisy Feedback",
    Chowdhury et al. 2024, arXiv:2403.00409): unbiased under labels flipped with probability
    eps = label_smoothing < 1/2.

        loss = ((1 - eps) * -logsigmoid(beta h) - eps * -logsigmoid(-beta h)) / (1 - 2 eps)

    Its expectation over the random flip is DPO's loss on the true label. cDPO averages the two
    labels' losses and so stops at a finite margin; rDPO subtracts the flipped label's loss, so it
    never stops: the push on h tends to beta eps / (1 - 2 eps) as h grows, not to 0. eps = 0 is DPO;
    ln 2 at h = 0. Summed log-probs."""
    pc, pr = policy_chosen_logps, policy_rejected_logps
    rc, rr = reference_chosen_logps, reference_rejected_logps
    h = (pc - rc) - (pr - rr)
    eps = label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    return batch_mean(losses, weights), *implicit_rewards(beta, pc, pr, rc, rr)


def ipo_loss(policy_chosen_avg_logps, policy_rejected_avg_logps, reference_chosen_avg_logps,
             reference_rejected_avg_logps, beta=0.1, weights=None):
    """Identity Preference Optimisation ("A General Theoretical Paradigm to Understand Learning from
    Human Preferences", Azar et al. 2023, arXiv:2310.12036, eq. 17; beta is the paper's tau).

        h      = (pc - rc) - (pr - rr)                 # per-token average log-probs
        loss   = mean over the batch of (h - 1 / (2 beta))**2
        reward = beta * (policy - ref), per response

    Feed it per-token AVERAGE log-probs (logprobs.average_logps), not sums. IPO regresses h onto a
    fixed target 1/(2 beta) instead of pushing it to infinity as DPO's logistic loss does. The paper
    writes it with whole-sequence log-likelihoods, but the target is a fixed number: with summed
    log-probs a 3-token and a 30-token answer would have to reach the same total margin, so the
    strength of the regularisation would depend on response length. TRL therefore averages over
    tokens for IPO, which puts the margin on a per-token scale; we do the same.
    Smaller beta = larger target margin = further from the reference.
    Returns (loss: scalar, chosen_rewards: (B,), rejected_rewards: (B,))."""
    pc, pr = policy_chosen_avg_logps, policy_rejected_avg_logps
    rc, rr = reference_chosen_avg_logps, reference_rejected_avg_logps
    losses = ((pc - rc) - (pr - rr) - 1 / (2 * beta)) ** 2
    return batch_mean(losses, weights), *implicit_rewards(beta, pc, pr, rc, rr)


def hinge_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
               reference_rejected_logps, beta=0.1, weights=None):
    """Hinge (SLiC-style) preference loss ("SLiC-HF: Sequence Likelihood Calibration with Human
    Feedback", Zhao et al. 2023, arXiv:2305.10425), written with DPO's reference-relative margin
    as TRL does.

        h      = (pc - rc) - (pr - rr)                 # summed log-probs
        loss   = mean over the batch of relu(1 - beta * h)
        reward = beta * (policy - ref), per response

    A pair stops contributing (zero gradient) once beta * h >= 1, i.e. the margin reaches
    1/beta nats.
    Returns (loss: scalar, chosen_rewards: (B,), rejected_rewards: (B,))."""
    pc, pr = policy_chosen_logps, policy_rejected_logps
    rc, rr = reference_chosen_logps, reference_rejected_logps
    losses = F.relu(1 - beta * ((pc - rc) - (pr - rr)))
    return batch_mean(losses, weights), *implicit_rewards(beta, pc, pr, rc, rr)


def exo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
             reference_rejected_logps, beta=0.1, label_smoothing=1e-3, weights=None):
    """EXO, pairwise ("Towards Efficient Exact Optimization of Language Model Alignment", Ji et al.
    2024, arXiv:2402.00856, eq. 16, as TRL's exo_pair): the REVERSE KL from the model's preference
    probability p = sigmoid(beta h) to the labels' (1 - eps, eps), eps = label_smoothing > 0:

        loss = p (log p - log(1 - eps)) + (1 - p) (log(1 - p) - log eps)
             = KL(p || 1 - eps) >= 0

    DPO minimises the forward KL (cross-entropy) from the labels to p, which is mean-seeking; EXO's
    reverse KL is mode-seeking. Its minimum, 0, sits at beta h = log((1 - eps) / eps), 6.9 for TRL's
    eps = 1e-3 (used when label_smoothing is 0): a finite target margin, as in cDPO. At h = 0 it is
    log(1/2) - log(eps (1 - eps)) / 2 (2.76 for 1e-3), not ln 2."""
    pc, pr = policy_chosen_logps, policy_rejected_logps
    rc, rr = reference_chosen_logps, reference_rejected_logps
    if not 0 < label_smoothing < 1:
        raise ValueError(f"exo_loss: label_smoothing must be in (0, 1), got {label_smoothing}")
    h = (pc - rc) - (pr - rr)
    log_p, log_q = F.logsigmoid(beta * h), F.logsigmoid(-beta * h)  # log p, log(1 - p)
    losses = (log_p.exp() * (log_p - math.log(1 - label_smoothing))
              + log_q.exp() * (log_q - math.log(label_smoothing)))
    return batch_mean(losses, weights), *implicit_rewards(beta, pc, pr, rc, rr)


def discopop_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                  reference_rejected_logps, beta=0.1, tau=0.05, weights=None):
    """DiscoPOP ("Discovering Preference Optimization Algorithms with and for Large Language
    Models", Lu et al. 2024, arXiv:2406.08414, eq. 5: the log-ratio modulated loss), found by an LLM
    proposing objectives and a search keeping what trained best. A blend of DPO's logistic loss and
    an exponential loss, switched by the sign of the margin over a width tau:

        x = beta h,   m = sigmoid(x / tau)
        loss = (1 - m) * -logsigmoid(x) + m * exp(-x)

    Logistic for x << 0, exponential for x >> 0 (the two agree there to first order).
    exp(-x) >= -logsigmoid(x) everywhere, so the switch adds a bump: with tau < 0.1 the loss RISES
    with x around 0 and has a local minimum at a small negative margin (x near -0.12 for
    tau = 0.05), which notebook 01 draws. m * exp(-x) is computed as exp(-x + logsigmoid(x / tau)),
    bounded by 1 for tau <= 1 (configurator checks 0 < tau <= 1).
    (1 + ln 2) / 2 at h = 0."""
    pc, pr = policy_chosen_logps, policy_rejected_logps
    rc, rr = reference_chosen_logps, reference_rejected_logps
    x = beta * ((pc - rc) - (pr - rr))
    losses = torch.sigmoid(-x / tau) * -F.logsigmoid(x) + torch.exp(-x + F.logsigmoid(x / tau))
    return batch_mean(losses, weights), *implicit_rewards(beta, pc, pr, rc, rr)


def aot_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
             reference_rejected_logps, beta=0.1, label_smoothing=0.0, unpaired=False):
    """AOT, alignment via optimal transport ("Distributional Preference Alignment of LLMs via
    Optimal Transport", Melnyk et al. 2024, arXiv:2406.05882): asks the batch's DISTRIBUTION of
    scores to dominate another in first order (every quantile higher), not each pair. In one
    dimension the optimal-transport plan matches two samples in sorted order, so (sort = ascending,
    over the batch):

        # the policy's margins over the reference's
        aot (paired):  u = sort(pc - pr),  v = sort(rc - rr)
        # chosen log-ratios over rejected ones
        aot_unpaired:  u = sort(pc - rc),  v = sort(pr - rr)
        loss = mean over k of -(1 - eps) logsigmoid(beta (u_k - v_k))
                              - eps logsigmoid(-beta (u_k - v_k))

    eps = label_smoothing as in cDPO. The unpaired form never uses which chosen goes with which
    rejected. "The batch" is whatever this function is given: dpo.py calls it once per micro-batch
    on each rank, so the quantiles are those of one micro-batch's pairs (batch_size of them;
    batch_size / world_size when a micro-batch is shared out over ranks) and nothing is gathered
    across micro-batches or ranks. Unlike every other loss here, AOT therefore depends on the
    micro-batch size: more gradient accumulation or more ranks with smaller micro-batches is another
    objective. No WPO weights: the sorted terms are not pairs.
    ln 2 at policy = reference. Rewards: beta * (policy - ref) per response, unsorted."""
    pc, pr = policy_chosen_logps, policy_rejected_logps
    rc, rr = reference_chosen_logps, reference_rejected_logps
    u, v = (pc - rc, pr - rr) if unpaired else (pc - pr, rc - rr)
    delta = beta * (torch.sort(u).values - torch.sort(v).values)
    losses = -(1 - label_smoothing) * F.logsigmoid(delta) - label_smoothing * F.logsigmoid(-delta)
    return losses.mean(), *implicit_rewards(beta, pc, pr, rc, rr)


# --------------------------------------------------------------------------------------------------
# Pairwise, against a reference: each response's log-ratio judged on its own
# (not functions of h alone)

def nca_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
             reference_rejected_logps, beta=0.1, weights=None):
    """NCA, pairwise ("Noise Contrastive Alignment of Language Models with Explicit Rewards",
    Chen et al. 2024, arXiv:2402.05369), as TRL's nca_pair:

        r_c = beta (pc - rc),  r_r = beta (pr - rr)
        loss = -logsigmoid(r_c) - (logsigmoid(-r_c) + logsigmoid(-r_r)) / 2

    Each reward is scored on its own, not just their difference. The rejected reward is pushed down
    without end, while the chosen one settles at r_c = ln 2 (where sigmoid(r_c) = 2/3): NCA holds
    the chosen answer's likelihood ABOVE the reference's, where DPO lets it fall as long as the
    margin grows (the paper's point).
    2 ln 2 at policy = reference. Summed log-probs."""
    pc, pr = policy_chosen_logps, policy_rejected_logps
    rc, rr = reference_chosen_logps, reference_rejected_logps
    r_c, r_r = beta * (pc - rc), beta * (pr - rr)
    losses = -F.logsigmoid(r_c) - 0.5 * F.logsigmoid(-r_c) - 0.5 * F.logsigmoid(-r_r)
    return batch_mean(losses, weights), *implicit_rewards(beta, pc, pr, rc, rr)


def bco_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
             reference_rejected_logps, beta=0.1, delta=0.0, weights=None):
    """BCO, pairwise ("Binary Classifier Optimization for Large Language Model Alignment",
    Jung et al. 2024, arXiv:2404.04656): a logistic classifier whose logit is the implicit reward,
    chosen = class 1, rejected = class 0, with the decision threshold delta (the reward shift):

        r_c = beta (pc - rc),  r_r = beta (pr - rr)
        loss = -logsigmoid(r_c - delta) - logsigmoid(-(r_r - delta))

    Chosen is pushed up and rejected down, each on its own and without end. The paper keeps delta at
    the running mean of all rewards seen (nanopo/runtime.py's RunningMean, what dpo.py does), so the
    threshold follows the rewards as they drift; delta = 0 is TRL 1.16's bco_pair.
    2 ln 2 at policy = reference with delta = 0."""
    pc, pr = policy_chosen_logps, policy_rejected_logps
    rc, rr = reference_chosen_logps, reference_rejected_logps
    r_c, r_r = beta * (pc - rc), beta * (pr - rr)
    losses = -F.logsigmoid(r_c - delta) - F.logsigmoid(-(r_r - delta))
    return batch_mean(losses, weights), *implicit_rewards(beta, pc, pr, rc, rr)


def sppo_hard_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                   reference_rejected_logps, beta=0.1, weights=None):
    """SPPO with hard probabilities ("Self-Play Preference Optimization for Language Model
    Alignment", Wu et al. 2024, arXiv:2405.00675, eq. 4.7 with P(chosen wins) = 1 and
    P(rejected wins) = 0, as TRL's sppo_hard):

        loss = (pc - rc - 1/(2 beta))**2 + (pr - rr + 1/(2 beta))**2          # summed log-probs

    SPPO regresses each log-ratio onto eta (P(y wins) - 1/2), eta = 1/beta: the chosen one onto
    +1/(2 beta) nats, the rejected one onto -1/(2 beta), separately (IPO regresses only their
    difference). Both answers stop at a fixed distance from the reference, and a rejected answer
    pushed too far down is pulled back.
    1/(2 beta^2) at policy = reference."""
    pc, pr = policy_chosen_logps, policy_rejected_logps
    rc, rr = reference_chosen_logps, reference_rejected_logps
    losses = (pc - rc - 0.5 / beta) ** 2 + (pr - rr + 0.5 / beta) ** 2
    return batch_mean(losses, weights), *implicit_rewards(beta, pc, pr, rc, rr)


def apo_zero_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                  reference_rejected_logps, beta=0.1, weights=None):
    """APO-zero ("Anchored Preference Optimization and Contrastive Revisions", D'Oosterlinck et al.
    2024, arXiv:2408.06266, eq. 7). Anchored: each response's likelihood moves in a set direction.

        loss = (1 - sigmoid(beta (pc - rc))) + sigmoid(beta (pr - rr))   # chosen up, rejected down

    The right one when the chosen answers are BETTER than what the model would say itself, as on the
    embedded task (the verified answer against the model's own mistake). Saturates both ways.
    1 at policy = reference."""
    pc, pr = policy_chosen_logps, policy_rejected_logps
    rc, rr = reference_chosen_logps, reference_rejected_logps
    # 1 - sigmoid(x) = sigmoid(-x)
    losses = torch.sigmoid(-beta * (pc - rc)) + torch.sigmoid(beta * (pr - rr))
    return batch_mean(losses, weights), *implicit_rewards(beta, pc, pr, rc, rr)


def apo_down_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                  reference_rejected_logps, beta=0.1, weights=None):
    """APO-down (same paper, eq. 8):

        loss = sigmoid(beta (pc - rc)) + (1 - sigmoid(beta ((pc - rc) - (pr - rr))))

    pushes the chosen answer's likelihood DOWN, and the rejected one's further down so the margin
    still grows: the right one when the model is already better than the chosen answers (e.g.
    chosen = a revision of a weaker model's output), so that even the preferred data should not be
    imitated. On data whose chosen answers are the ones to learn, it works against the task
    (docs/results.md). 1 at policy = reference."""
    pc, pr = policy_chosen_logps, policy_rejected_logps
    rc, rr = reference_chosen_logps, reference_rejected_logps
    losses = torch.sigmoid(beta * (pc - rc)) + torch.sigmoid(-beta * ((pc - rc) - (pr - rr)))
    return batch_mean(losses, weights), *implicit_rewards(beta, pc, pr, rc, rr)


# --------------------------------------------------------------------------------------------------
# Pairwise, reference-free: the policy's own log-probs only

def simpo_loss(policy_chosen_avg_logps, policy_rejected_avg_logps, beta=2.0, gamma=0.5):
    """Simple Preference Optimization ("SimPO: Simple Preference Optimization with a Reference-Free
    Reward", Meng et al. 2024, arXiv:2405.14734), reference-free.

        reward = beta * avg_logps   # per-token average log-prob, no reference model
        loss   = mean over the batch of -logsigmoid(beta * (pc_avg - pr_avg) - gamma)

    gamma is exactly the paper's target reward margin: it is subtracted AFTER scaling by beta, so it
    is in reward units (the chosen reward must beat the rejected one by gamma). On the
    average-log-prob scale the margin is gamma / beta nats per token (0.25 with the defaults).
    TRL's `simpo_gamma` means the same; implementations that take a `gamma_beta_ratio` pass
    gamma / beta instead.
    Returns (loss: scalar, chosen_rewards: (B,), rejected_rewards: (B,))."""
    losses = -F.logsigmoid(beta * (policy_chosen_avg_logps - policy_rejected_avg_logps) - gamma)
    return (losses.mean(), beta * policy_chosen_avg_logps.detach(),
            beta * policy_rejected_avg_logps.detach())


def log1mexp(x):
    """log(1 - exp(x)) for x <= 0, accurate everywhere (Maechler 2012): log(-expm1(x)) near 0,
    log1p(-exp(x)) for x <= -ln 2.
    Both branches are finite for x < 0, so torch.where gives finite gradients too."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


# keeps avg log-probs <= -ORPO_EPS so log(1 - p) stays finite when p -> 1 (or avg = 0)
ORPO_EPS = 1e-6


def orpo_loss(policy_chosen_avg_logps, policy_rejected_avg_logps, chosen_nll, lam=0.1):
    """Odds Ratio Preference Optimization ("ORPO: Monolithic Preference Optimization without
    Reference Model", Hong et al. 2024, arXiv:2403.07691), reference-free, SFT and preference in
    one loss.

        log odds(y) = log(p / (1 - p)) with log p = avg_logps
                      (per-token average, the paper's definition)
        log_odds    = (pc - pr) - (log(1 - exp(pc)) - log(1 - exp(pr)))          # (B,)
        loss        = chosen_nll - lam * mean over the batch of logsigmoid(log_odds)
        reward      = lam * avg_logps, per response

    chosen_nll is a scalar: the batch's per-token NLL of the chosen responses (sft_loss). The odds
    term is computed in at least float32 (bf16/fp16 inputs are upcast; float64 stays float64) with a
    stable log1mexp. The averages are clamped to <= -ORPO_EPS (1e-6) first: an average log-prob of 0
    (probability 1, or an empty response, whose average is defined as 0) would make
    log(1 - p) = -inf; the clamp caps |log(1 - p)| at about 13.8 and only ever touches log-probs
    within 1e-6 of 0 (where its gradient is zero).
    Returns (loss: scalar, chosen_rewards: (B,), rejected_rewards: (B,),
             log_odds_ratio: scalar mean of logsigmoid(log_odds),
             log_odds_chosen: scalar mean of log_odds),
    the last two detached and named after TRL's metrics `log_odds_ratio` and `log_odds_chosen`."""
    dtype = torch.promote_types(policy_chosen_avg_logps.dtype, torch.float32)
    pc_avg = policy_chosen_avg_logps.to(dtype).clamp(max=-ORPO_EPS)
    pr_avg = policy_rejected_avg_logps.to(dtype).clamp(max=-ORPO_EPS)
    log_odds = (pc_avg - pr_avg) - (log1mexp(pc_avg) - log1mexp(pr_avg))
    ratio = F.logsigmoid(log_odds)  # (B,)
    loss = chosen_nll - lam * ratio.mean()
    chosen_rewards = lam * policy_chosen_avg_logps.detach()
    rejected_rewards = lam * policy_rejected_avg_logps.detach()
    return loss, chosen_rewards, rejected_rewards, ratio.mean().detach(), log_odds.mean().detach()


# --------------------------------------------------------------------------------------------------
# Unpaired: single answers labelled desirable or not

def kto_mismatched_indices(n):
    """For a micro-batch of n rows, the completion index each prompt is paired with for KTO's KL
    estimate: prompt i gets completion (i + 1) % n (a shift by one, so no row keeps its own
    completion when n >= 2; TRL shifts the other way, which is equivalent). With n == 1 it returns
    [0]: the only "mismatched" pair is the matched one, so the KL estimate degenerates to that
    example's own log-ratio (biased); use micro-batches of at least 2 rows for KTO.
    Returns a list of ints (indexes Python lists and tensors)."""
    return [(i + 1) % n for i in range(n)]


def kto_loss(policy_logps, reference_logps, desirable, policy_kl_logps, reference_kl_logps,
             beta=0.1, desirable_weight=1.0, undesirable_weight=1.0, kl_reduce=None):
    """Kahneman-Tversky Optimization ("KTO: Model Alignment as Prospect Theoretic Optimization",
    Ethayarajh et al. 2024, arXiv:2402.01306), for unpaired examples each labelled desirable or not.

        r    = policy_logps - reference_logps                     # summed log-probs, (B,)
        # detached scalar reference point:
        kl   = clamp(mean(policy_kl_logps - reference_kl_logps), min=0)
        loss_i = desirable_weight   * (1 - sigmoid(beta * (r_i - kl)))   if desirable[i]
                 undesirable_weight * (1 - sigmoid(beta * (kl - r_i)))   otherwise
        loss = sum_i loss_i / B                                   # weights are NOT renormalised
        reward = beta * r, per example

    desirable is a bool tensor (B,). *_kl_logps are summed log-probs of MISMATCHED (prompt,
    completion) pairs from the same micro-batch (kto_mismatched_indices), computed under no_grad for
    both models: the paper's biased estimate of KL(policy || ref) over the batch's prompts, which
    sets the reference point z0. kl_reduce, if given, is applied to the detached batch mean before
    clamping, e.g. an all-reduce average across DDP ranks so every rank uses the same z0.
    1 - sigmoid(z) is computed as sigmoid(-z): finite for any |z|.
    Returns (loss: scalar, rewards: (B,) detached, kl: scalar detached)."""
    kl = (policy_kl_logps - reference_kl_logps).detach().mean()
    if kl_reduce is not None:
        kl = kl_reduce(kl)
    kl = kl.clamp(min=0)
    r = policy_logps - reference_logps
    losses = torch.where(desirable,
                         desirable_weight * torch.sigmoid(-beta * (r - kl)),
                         undesirable_weight * torch.sigmoid(-beta * (kl - r)))
    return losses.sum() / max(losses.numel(), 1), beta * r.detach(), kl


# --------------------------------------------------------------------------------------------------
# Regularisers: the chosen answers' likelihood (SFT, RPO) and the divergence that defines the reward

def sft_loss(policy_chosen_logps, policy_chosen_n_tokens):
    """Negative log-likelihood of the chosen responses, per token: -sum(pc) / sum(n_tokens).
    dpo.py's `--loss_type=sft` uses it as the honest baseline (continued SFT on the verified answers
    of the same pairs), and RPO adds it to a pairwise loss: loss = pairwise + rpo_alpha * sft_loss
    (Pang et al. 2024, "Iterative Reasoning Preference Optimization", arXiv:2404.19733), which keeps
    the likelihood of the chosen answers from falling while the margin grows; MPO
    (--loss_type=dpo+bco+sft) adds it as a weighted term.
    Token-averaged over the batch as SFT is; an empty batch gives 0, never 0/0."""
    return -policy_chosen_logps.sum() / policy_chosen_n_tokens.sum().clamp(min=1)


F_DIVERGENCES = ("reverse_kl", "forward_kl", "js", "alpha")
# f_divergence's exponentials continue as their tangent line past e^20 (~5e8): finite, monotone
EXP_CAP = 20.0


def capped_exp(x):
    """exp(x) up to x = EXP_CAP, then its tangent line there: the same value and slope at the joint,
    finite for any x (a plain exp overflows float32 at x ~ 89, and the loss would be inf and its
    gradient NaN)."""
    return torch.where(x > EXP_CAP, math.exp(EXP_CAP) * (1 + x - EXP_CAP),
                       torch.exp(x.clamp(max=EXP_CAP)))


def f_divergence(logratios, kind="reverse_kl", alpha=0.5):
    """The score psi(u) of a log-ratio u = log pi - log pi_ref that the Bradley-Terry term compares
    when the KL penalty is another f-divergence ("Beyond Reverse KL: Generalizing Direct Preference
    Optimization with Diverse Divergence Constraints", Wang et al. 2023, arXiv:2309.16240). With the
    penalty beta E[f(pi/pi_ref)] the optimal policy's implicit reward is beta f'(pi/pi_ref), so the
    loss compares psi(u) = f'(e^u), shifted here so that psi(0) = 0 (the shift cancels in h):

        reverse_kl  f(x) = x log x                                 psi(u) = u   (DPO)
        forward_kl  f(x) = -log x                                  psi(u) = 1 - e^-u
        js          f(x) = x log x - (x + 1) log((x + 1) / 2)      psi(u) = log 2 + logsigmoid(u)
        alpha       f(x) = (x^(1-a) - (1-a) x - a) / (a (a - 1))   psi(u) = (1 - e^(-a u)) / a
                    (a = alpha > 0)

    dpo.py uses h = psi(pc - rc) - psi(pr - rr) in place of DPO's margin in the sigmoid, hinge and
    IPO-style losses. alpha -> 0 is reverse KL, alpha = 1 is forward KL (TRL's default alpha
    coefficient, 1.0). Forward KL and small alpha penalise a log-ratio far below 0 (mass the policy
    removed) exponentially: mass-covering, where reverse KL is mode-seeking; JS saturates for large
    u, capping how much one response's gain counts.
    Finite for any input: e^-u grows as capped_exp, linearly past u = -EXP_CAP / alpha."""
    if kind == "reverse_kl":
        return logratios
    if kind == "forward_kl":
        return 1 - capped_exp(-logratios)
    if kind == "js":
        return math.log(2) + F.logsigmoid(logratios)
    if kind == "alpha":
        return (1 - capped_exp(-alpha * logratios)) / alpha
    raise ValueError(f"f_divergence: unknown kind '{kind}', expected one of {F_DIVERGENCES}")


# --------------------------------------------------------------------------------------------------
# The road DPO avoids: reinforcement learning with a reward function (GRPO, grpo.py). Per-token
# log-probs here, (B, T), since the PPO ratio and the KL estimate are per token.

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")


def group_advantages(rewards, group_size, scale_rewards="group"):
    """GRPO's advantages (Shao et al. 2024, "DeepSeekMath", arXiv:2402.03300): each answer's reward
    minus the mean reward of its group (the G answers sampled for one prompt, consecutive rows), so
    no value network is needed: the group is the baseline. rewards (B,) with B = prompts x G.

        A_i = (r_i - mean(group)) / (std + 1e-4)   scale_rewards='group': the group's std
                                                   'batch': the whole batch's std
        A_i =  r_i - mean(group)                   'none' (Dr. GRPO, arXiv:2503.20783: dividing
                                                   by the std favours too easy or too hard prompts)

    std is the unbiased one, as TRL's. A group whose answers all earned the same reward gets
    advantage 0 in every mode (it carries no signal), never 0/0."""
    grouped = rewards.view(-1, group_size)
    baseline = grouped.mean(dim=1).repeat_interleave(group_size)
    advantages = rewards - baseline
    if scale_rewards == "group":
        std = grouped.std(dim=1).repeat_interleave(group_size)
    elif scale_rewards == "batch":
        std = rewards.std().expand_as(rewards)
    elif scale_rewards == "none":
        return advantages
    else:
        raise UserError(f"unknown scale_rewards '{scale_rewards}': expected one of "
                        f"{', '.join(SCALE_REWARDS)}")
    return advantages / (std + 1e-4)


def grpo_loss(policy_logps, old_logps, reference_logps, mask, advantages, beta=0.0, epsilon=0.2,
              epsilon_high=None, loss_type="grpo", importance_sampling_level="token",
              max_completion_length=None):
    """GRPO's clipped surrogate with a KL penalty, as TRL's GRPOTrainer computes it:

        ratio_t = exp(logp_t - old_t)           token level (PPO's); 'sequence' (GSPO,
                                                arXiv:2507.18071): one ratio per answer,
                                                exp(mean_t(logp_t - old_t))
        term_t  = -min(ratio_t * A, clip(ratio_t, 1 - epsilon, 1 + epsilon_high) * A)
                  + beta * (exp(ref_t - logp_t) - (ref_t - logp_t) - 1)

    The KL term is Schulman's k3 estimator of KL(policy || reference): unbiased for samples drawn
    from the policy, and never negative. policy_logps (B, T), with gradients; old_logps (B, T), the
    policy that sampled the answers (None: this policy, detached, so ratio = 1 and the clipped
    term's gradient is that of A * logp: REINFORCE with the group mean as baseline, plus the KL
    term's when beta > 0); reference_logps
    (B, T), needed when beta > 0; mask (B, T), 1 on the answer's tokens and EOS; advantages (B,).
    epsilon_high None = epsilon (DAPO, arXiv:2503.14476, raises it to let rare tokens grow).

    loss_type says how the terms are averaged over this micro-batch:
      grpo     each answer's mean over its tokens, then the mean over answers (the paper's)
      bnpo     the mean over all the micro-batch's tokens
      dr_grpo  the sum over tokens / (B * max_completion_length): no length bias (Dr. GRPO)
      dapo     as bnpo here; grpo.py weights each micro-batch by its share of the step's tokens
               (not rows), which makes it the mean over the global batch's tokens, as TRL's
    Returns (loss, metrics): TRL's kl (the masked mean of the k3 terms) when beta > 0, and
    clip_ratio/low_mean, high_mean, region_mean: the share of tokens (sequence level: of answers)
    whose ratio was clipped. Log-probs are those of the sampling temperature's distribution
    (grpo.py divides the logits by it, as TRL does)."""
    if epsilon_high is None:
        epsilon_high = epsilon
    if old_logps is None:
        old_logps = policy_logps.detach()
    on = mask.bool()                                             # the answers' tokens
    # Padding positions are zeroed before anything is exponentiated: whatever log-probs padding
    # has, no inf can appear there and turn the loss or its gradient into NaN (inf * 0).
    log_ratio = torch.where(on, policy_logps - old_logps, 0.0)   # (B, T)
    if importance_sampling_level == "sequence":
        # one weight per answer: its mean per-token log-ratio, (B, 1)
        log_ratio = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        log_ratio = log_ratio.unsqueeze(-1)
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    A = advantages.unsqueeze(-1)                                 # (B, 1)
    terms = -torch.min(ratio * A, clipped * A)                   # (B, T), or (B, 1) by sequence
    metrics = {}
    if beta != 0.0:
        delta = torch.where(on, reference_logps - policy_logps, 0.0)
        kl = torch.exp(delta) - delta - 1                        # (B, T), >= 0, 0 on padding
        terms = terms + beta * kl
        metrics["kl"] = (kl.sum() / mask.sum().clamp(min=1.0)).detach()
    terms = torch.where(on, terms, 0.0)                          # (B, T)
    if loss_type == "grpo":
        loss = (terms.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type in ("bnpo", "dapo"):
        loss = terms.sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = terms.sum() / (terms.size(0) * max_completion_length)
    else:
        raise UserError(f"unknown GRPO loss_type '{loss_type}': expected one of "
                        f"{', '.join(GRPO_LOSS_TYPES)}")
    # clipping bites where the ratio left the range in the direction the advantage pushes it
    low = ((ratio < 1 - epsilon) & (A < 0)).float()
    high = ((ratio > 1 + epsilon_high) & (A > 0)).float()
    if importance_sampling_level == "sequence":
        # one ratio per answer: the share of answers, as TRL counts them
        shares = [x.mean() for x in (low, high, torch.maximum(low, high))]
    else:
        tokens = mask.sum().clamp(min=1.0)
        shares = [(x * mask).sum() / tokens for x in (low, high, torch.maximum(low, high))]
    metrics["clip_ratio/low_mean"], metrics["clip_ratio/high_mean"] = shares[0], shares[1]
    metrics["clip_ratio/region_mean"] = shares[2]
    return loss, metrics


# --------------------------------------------------------------------------------------------------
# The table: --loss_type -> its function. dpo.py looks the name up here and calls the function with
# the policy's and the reference's log-probs of the chosen and the rejected responses, (B,) each,
# and beta, plus by keyword the settings that loss reads (dpo.py's LOSS_SETTINGS). Each returns
# (loss, chosen_rewards, rejected_rewards).
# simpo, orpo and sft have no reference and are called apart.

def aot_unpaired_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                      reference_rejected_logps, beta=0.1, label_smoothing=0.0):
    """AOT's unpaired form (aot_loss with unpaired=True): chosen log-ratios against
    rejected ones, sorted."""
    pc, pr = policy_chosen_logps, policy_rejected_logps
    rc, rr = reference_chosen_logps, reference_rejected_logps
    return aot_loss(pc, pr, rc, rr, beta, label_smoothing, unpaired=True)


LOSSES = {
    "dpo": dpo_loss,
    "dpo_norm": dpo_loss,  # on per-token averages (PER_TOKEN_AVERAGE)
    "ipo": ipo_loss,
    "hinge": hinge_loss,
    "robust": robust_loss,
    "exo": exo_loss,
    "discopop": discopop_loss,
    "aot": aot_loss,
    "aot_unpaired": aot_unpaired_loss,
    "nca": nca_loss,
    "bco": bco_loss,
    "sppo_hard": sppo_hard_loss,
    "apo_zero": apo_zero_loss,
    "apo_down": apo_down_loss,
}
# the losses that compare per-token average log-probs instead of sums (simpo and orpo do too)
PER_TOKEN_AVERAGE = ("dpo_norm", "ipo")
# the losses whose margin --f_divergence_type reshapes: functions of h = (pc - rc) - (pr - rr)
F_DIVERGENCE_LOSSES = ("dpo", "dpo_norm", "ipo", "hinge", "robust", "exo")


def reward_metrics(chosen_rewards, rejected_rewards):
    """TRL's reward metrics of a batch: the means of the chosen and rejected rewards and of their
    margin, and the fraction of pairs whose chosen reward is the larger."""
    return {"rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean()}


# --------------------------------------------------------------------------------------------------
# Which setting applies to which loss. dpo.py checks them before any work: a setting that does
# nothing for the chosen loss is a one-line error, never a silent no-op.

# The pairwise losses, by what they read. kto (unpaired, nanopo/kto.py) stands apart.
# MARGIN: the functions of the margin h.
MARGIN = ("dpo", "dpo_norm", "ipo", "hinge", "robust", "exo", "discopop", "aot")
WITH_REFERENCE = MARGIN + ("nca", "bco", "sppo_hard", "aot_unpaired", "apo_zero", "apo_down")
PAIRWISE = WITH_REFERENCE + ("simpo", "orpo", "sft")
LOSS_TYPES = PAIRWISE + ("kto",)
TRL_NAMES = {"sigmoid": "dpo", "sigmoid_norm": "dpo_norm", "exo_pair": "exo", "nca_pair": "nca",
             "bco_pair": "bco"}
TRL_DIVERGENCES = {"js_divergence": "js", "alpha_divergence": "alpha"}

# an option counts as in use when the command line or a config file changed its default
IN_USE = "set"
# option: (the losses it applies to, when it counts as in use, why not elsewhere). In a combination
# an option must apply to at least one term, and acts on those (EVERY_TERM options: on all of them,
# or it is an error).
LOSS_OPTIONS = {
    "label_smoothing": (("dpo", "robust", "exo", "aot", "aot_unpaired"), lambda v: v > 0,
                        "it is the label-flip rate of cDPO, rDPO, EXO and AOT"),
    "rpo_alpha": (WITH_REFERENCE + ("simpo",), lambda v: v > 0,
                  "it adds an NLL term; orpo and sft have one already, kto has no chosen answers"),
    "reference_free": (MARGIN, bool,
                       "simpo, orpo and sft never have a reference, kto needs one, and the others "
                       "score each log-ratio against the reference's on its own"),
    "precompute_ref": (WITH_REFERENCE, bool,
                       "kto's KL term pairs completions across each batch; "
                       "simpo, orpo and sft have no reference"),
    "simpo_gamma": (("simpo",), IN_USE, "it is SimPO's target margin"),
    "desirable_weight": (("kto",), IN_USE, "it weights KTO's desirable examples"),
    "undesirable_weight": (("kto",), IN_USE, "it weights KTO's undesirable examples"),
    "discopop_tau": (("discopop",), IN_USE, "it is DiscoPOP's switching width"),
    "bco_running_delta": (("bco",), IN_USE, "it is BCO's reward shift"),
    "f_divergence_type": (F_DIVERGENCE_LOSSES, lambda v: v != "reverse_kl",
                          "it reshapes the margin of the sigmoid, hinge and IPO-style losses"),
    "use_weighting": (tuple(n for n in WITH_REFERENCE if not n.startswith("aot")), bool,
                      "WPO weights TRL's DPO-family pairs; aot's sorted terms are not pairs"),
    "ld_alpha": (tuple(n for n in WITH_REFERENCE if n not in PER_TOKEN_AVERAGE), lambda v: v < 1,
                 "it discounts summed log-probs of pairs; averages are length-free already, "
                 "kto has no pairs, and the NLL of sft must see the plain sum"),
    "ref_sync_steps": (WITH_REFERENCE + ("kto",), lambda v: v > 0,
                       "it moves the reference model (TR-DPO); simpo, orpo and sft have none"),
}
EVERY_TERM = ("ld_alpha",)  # it changes the log-probs every term sees


def trl_hint(name, trl_names):
    """" (TRL's 'x' is our 'y')" when `name` is TRL's word for one of ours, else ''."""
    if name in trl_names:
        return f" (TRL's '{name}' is our '{trl_names[name]}')"
    return ""


def parse_loss_type(loss_type, loss_weights=""):
    """'dpo+bco+sft' and '0.8,0.2,1' -> (['dpo', 'bco', 'sft'], [0.8, 0.2, 1.0])
    (weights all 1 when ''), with a one-line error for an unknown name, a repeated one, kto in a
    combination, or weights that do not fit."""
    names = loss_type.split("+")
    for name in names:
        if name not in LOSS_TYPES:
            hint = trl_hint(name, TRL_NAMES)
            raise UserError(f"unknown loss_type '{name}'{hint}: expected one of "
                            f"{', '.join(LOSS_TYPES)}, or several joined by '+' (dpo+bco+sft)")
    if len(set(names)) < len(names):
        raise UserError(f"loss_type '{loss_type}' names a loss twice: "
                        "give it a larger weight instead")
    if len(names) > 1 and "kto" in names:
        raise UserError(f"loss_type '{loss_type}': kto learns from unpaired examples, "
                        "it cannot join pairwise losses")
    if not loss_weights:
        return names, [1.0] * len(names)
    try:
        weights = [float(w) for w in str(loss_weights).split(",")]
    except ValueError:
        raise UserError(f"loss_weights='{loss_weights}': "
                        "expected numbers separated by commas") from None
    if len(weights) != len(names):
        raise UserError(f"loss_weights='{loss_weights}' has {len(weights)} weight(s) for the "
                        f"{len(names)} loss(es) of '{loss_type}'")
    if not all(math.isfinite(w) and w >= 0 for w in weights) or not any(weights):
        raise UserError(f"loss_weights='{loss_weights}': "
                        "weights must be finite, >= 0 and not all 0")
    return names, weights


def described(names):
    """('a',) -> 'a only'; ('a', 'b', 'c') -> 'a, b and c';
    most losses -> 'every loss but x and y'."""
    if len(names) == 1:
        return names[0] + " only"
    others = [n for n in LOSS_TYPES if n not in names]
    listed = others if len(others) < len(names) else names
    text = ", ".join(listed[:-1]) + " and " + listed[-1] if len(listed) > 1 else listed[0]
    return "every loss but " + text if listed is others else text


def check_loss_options(cfg):
    """One line for an unknown --loss_type, for an option set with a loss it does nothing for, and
    for options that contradict each other (run before any work)."""
    names, _ = parse_loss_type(cfg["loss_type"], cfg.get("loss_weights", ""))
    for option, (applies_to, in_use, why) in LOSS_OPTIONS.items():
        if option not in cfg:
            continue
        value = cfg[option]
        if in_use == IN_USE:
            used = value != configurator.defaults.get(option, value)
        else:
            used = in_use(value)
        fits = all if option in EVERY_TERM else any
        if used and not fits(n in applies_to for n in names):
            raise UserError(f"{option} applies to {described(applies_to)}, "
                            f"not '{cfg['loss_type']}' ({why})")
    if cfg["precompute_ref"] and cfg["reference_free"]:
        raise UserError("precompute_ref with reference_free: there is no reference to precompute")
    kind = cfg.get("f_divergence_type", "reverse_kl")
    if kind not in F_DIVERGENCES:
        hint = trl_hint(kind, TRL_DIVERGENCES)
        raise UserError(f"unknown f_divergence_type '{kind}'{hint}: "
                        f"expected one of {', '.join(F_DIVERGENCES)}")
    default_coef = configurator.defaults.get("f_alpha_divergence_coef")
    if cfg.get("f_alpha_divergence_coef") != default_coef and kind != "alpha":
        raise UserError("f_alpha_divergence_coef applies to f_divergence_type='alpha' only")
    if cfg.get("ld_alpha", 1.0) < 1 and cfg["rpo_alpha"] > 0:
        raise UserError("ld_alpha with rpo_alpha: "
                        "RPO's NLL would read the length-discounted log-probs")
    sync = cfg.get("ref_sync_steps", 0) > 0
    moved = "ref_sync_steps moves the reference during training"
    if cfg.get("ref_mixup_alpha") != configurator.defaults.get("ref_mixup_alpha") and not sync:
        raise UserError("ref_mixup_alpha applies only with ref_sync_steps > 0 (TR-DPO)")
    if sync and (cfg["precompute_ref"] or cfg["reference_free"]):
        setting = "precompute_ref" if cfg["precompute_ref"] else "reference_free"
        raise UserError(f"{moved}: with {setting} there is no reference model to move")


def needs_reference(loss_type, reference_free=False):
    """Whether the loss (any term of a combination) compares the policy with a reference model."""
    terms = loss_type.split("+")
    return any(n in WITH_REFERENCE + ("kto",) for n in terms) and not reference_free
