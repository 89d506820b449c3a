"""
Preference-optimisation losses, each a short pure function of per-sequence log-probabilities, and
preference_loss(), the one place where --loss_type picks one of them.

Conventions (one name for one thing, everywhere in this repo):
  policy_* / ref_*          the model being trained / the frozen reference (the SFT checkpoint)
  chosen / rejected         the preferred / dispreferred response of a pair
  *_logps                   summed log-prob of a response (its tokens + EOS), shape (B,)
  *_avg_logps               the same divided by the number of response tokens, shape (B,)
                            (logprobs.average_logps; an empty response gives 0, never 0/0)
Every loss returns a scalar, the mean over the batch's pairs (sft_loss: over its response tokens); rewards are
returned detached, per example, for logging. Pairwise losses return (loss, chosen_rewards, rejected_rewards);
orpo_loss adds two metrics, kto_loss returns (loss, rewards, kl): see them.

Which log-probs each loss wants (preference_loss honours this):
  dpo_loss, hinge_loss       summed log-probs
  ipo_loss                   per-token AVERAGE log-probs (see its docstring)
  simpo_loss, orpo_loss      per-token average log-probs, policy only (no reference model)
  kto_loss                   summed log-probs, unpaired examples + mismatched pairs for the KL estimate (kto.py)

RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization", arXiv:2404.19733) is not a separate
function: it adds alpha * (per-token NLL of the chosen responses) to any pairwise loss, i.e.
    loss = pairwise_loss + rpo_alpha * sft_loss(policy_chosen_logps, policy_chosen_n_tokens)
which keeps the likelihood of the chosen answers from falling while the margin grows.

Numerical safety: losses use F.logsigmoid (never log(sigmoid)), so |margins| of 1e4 give finite values and
gradients; empty responses (0 tokens -> avg log-prob 0) and average log-prob 0 are finite everywhere.
"""

import math

import torch
import torch.nn.functional as F

import configurator
from errors import UserError
from logprobs import average_logps


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta=0.1, label_smoothing=0.0):
    """Direct Preference Optimization (Rafailov et al. 2023, arXiv:2305.18290), sigmoid form.

        h      = (pc - rc) - (pr - rr)                 # = (chosen reward - rejected reward) / beta
        loss   = -logsigmoid(beta * h)                 # label_smoothing = 0
        loss   = -(1 - eps) logsigmoid(beta h) - eps logsigmoid(-beta h)   # conservative DPO, eps > 0
        reward = beta * (policy - ref), per response

    pc, pr, rc, rr are summed log-probs of whole responses (not averages). The gradient of the plain loss is
    -beta * sigmoid(-beta h) * (grad pc - grad pr): it pushes chosen up and rejected down, weighted by how wrong
    the implicit reward model is. Conservative DPO (cDPO, Mitchell 2023 note) assumes labels flip with
    probability eps, so the loss no longer drives h to infinity.
    beta sets the strength of the KL penalty towards the reference: larger beta = stay closer.
    Returns (loss: scalar batch mean, chosen_rewards: (B,), rejected_rewards: (B,))."""
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses.mean(), chosen_rewards, rejected_rewards


def sft_loss(policy_chosen_logps, policy_chosen_n_tokens):
    """Negative log-likelihood of the chosen responses, per token: -sum(pc) / sum(n_tokens).
    dpo.py's `--loss_type=sft` uses it as the honest baseline (continued SFT on the verified answers of the
    same pairs), and RPO adds it to a pairwise loss. Token-averaged over the batch as SFT is; an empty batch
    gives 0, never 0/0."""
    return -policy_chosen_logps.sum() / policy_chosen_n_tokens.sum().clamp(min=1)


def ipo_loss(policy_chosen_avg_logps, policy_rejected_avg_logps, ref_chosen_avg_logps, ref_rejected_avg_logps,
             beta=0.1):
    """Identity Preference Optimisation ("A General Theoretical Paradigm to Understand Learning from Human
    Preferences", Azar et al. 2023, arXiv:2310.12036, eq. 17; beta is the paper's tau).

        h      = (pc - rc) - (pr - rr)                 # per-token average log-probs
        loss   = mean over the batch of (h - 1 / (2 beta))**2
        reward = beta * (policy - ref), per response

    Feed it per-token AVERAGE log-probs (logprobs.average_logps), not sums. IPO regresses h onto a fixed target
    1/(2 beta) instead of pushing it to infinity as DPO's logistic loss does. The paper writes it with whole-
    sequence log-likelihoods, but the target is a fixed number: with summed log-probs a 3-token and a
    30-token answer would have to reach the same total margin, so the strength of the regularisation would
    depend on response length. TRL therefore averages over tokens for IPO, which puts the margin on a
    per-token scale; we do the same. Smaller beta = larger target margin = further from the reference.
    Returns (loss: scalar, chosen_rewards: (B,), rejected_rewards: (B,))."""
    h = (policy_chosen_avg_logps - ref_chosen_avg_logps) - (policy_rejected_avg_logps - ref_rejected_avg_logps)
    losses = (h - 1 / (2 * beta)) ** 2
    chosen_rewards = beta * (policy_chosen_avg_logps - ref_chosen_avg_logps).detach()
    rejected_rewards = beta * (policy_rejected_avg_logps - ref_rejected_avg_logps).detach()
    return losses.mean(), chosen_rewards, rejected_rewards


def hinge_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=0.1):
    """Hinge (SLiC-style) preference loss ("SLiC-HF: Sequence Likelihood Calibration with Human Feedback",
    Zhao et al. 2023, arXiv:2305.10425), written with DPO's reference-relative margin as TRL does.

        h      = (pc - rc) - (pr - rr)                 # summed log-probs
        loss   = mean over the batch of relu(1 - beta * h)
        reward = beta * (policy - ref), per response

    A pair stops contributing (zero gradient) once beta * h >= 1, i.e. the margin reaches 1/beta nats.
    Returns (loss: scalar, chosen_rewards: (B,), rejected_rewards: (B,))."""
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    losses = F.relu(1 - beta * h)
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses.mean(), chosen_rewards, rejected_rewards


def simpo_loss(policy_chosen_avg_logps, policy_rejected_avg_logps, beta=2.0, gamma=0.5):
    """Simple Preference Optimization ("SimPO: Simple Preference Optimization with a Reference-Free Reward",
    Meng et al. 2024, arXiv:2405.14734), reference-free.

        reward = beta * avg_logps                      # per-token average log-prob, no reference model
        loss   = mean over the batch of -logsigmoid(beta * (pc_avg - pr_avg) - gamma)

    gamma is exactly the paper's target reward margin: it is subtracted AFTER scaling by beta, so it is in
    reward units (the chosen reward must beat the rejected one by gamma). On the average-log-prob scale the
    margin is gamma / beta nats per token (0.25 with the defaults). TRL's `simpo_gamma` means the same;
    implementations that take a `gamma_beta_ratio` pass gamma / beta instead.
    Returns (loss: scalar, chosen_rewards: (B,), rejected_rewards: (B,))."""
    losses = -F.logsigmoid(beta * (policy_chosen_avg_logps - policy_rejected_avg_logps) - gamma)
    return losses.mean(), beta * policy_chosen_avg_logps.detach(), beta * policy_rejected_avg_logps.detach()


def log1mexp(x):
    """log(1 - exp(x)) for x <= 0, accurate everywhere (Maechler 2012): log(-expm1(x)) near 0, log1p(-exp(x))
    for x <= -ln 2. Both branches are finite for x < 0, so torch.where gives finite gradients too."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


ORPO_EPS = 1e-6  # keeps avg log-probs <= -ORPO_EPS so log(1 - p) stays finite when p -> 1 (or avg = 0)


def orpo_loss(policy_chosen_avg_logps, policy_rejected_avg_logps, chosen_nll, lam=0.1):
    """Odds Ratio Preference Optimization ("ORPO: Monolithic Preference Optimization without Reference Model",
    Hong et al. 2024, arXiv:2403.07691), reference-free, SFT and preference in one loss.

        log odds(y) = log(p / (1 - p)) with log p = avg_logps (per-token average, the paper's definition)
        log_odds    = (pc - pr) - (log(1 - exp(pc)) - log(1 - exp(pr)))          # (B,)
        loss        = chosen_nll - lam * mean over the batch of logsigmoid(log_odds)
        reward      = lam * avg_logps, per response

    chosen_nll is a scalar: the batch's per-token NLL of the chosen responses (sft_loss). The odds term is
    computed in at least float32 (bf16/fp16 inputs are upcast; float64 stays float64) with a stable log1mexp.
    The averages are clamped to <= -ORPO_EPS (1e-6) first: an average log-prob of 0 (probability 1, or an empty
    response, whose average is defined as 0) would make log(1 - p) = -inf; the clamp caps |log(1 - p)| at
    about 13.8 and only ever touches log-probs within 1e-6 of 0 (where its gradient is zero).
    Returns (loss: scalar, chosen_rewards: (B,), rejected_rewards: (B,),
             log_odds_ratio: scalar mean of logsigmoid(log_odds), log_odds_chosen: scalar mean of log_odds),
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


def kto_mismatched_indices(n):
    """For a micro-batch of n rows, the completion index each prompt is paired with for KTO's KL estimate:
    prompt i gets completion (i + 1) % n (a shift by one, so no row keeps its own completion when n >= 2;
    TRL shifts the other way, which is equivalent). With n == 1 it returns [0]: the only "mismatched" pair is
    the matched one, so the KL estimate degenerates to that example's own log-ratio (biased); use
    micro-batches of at least 2 rows for KTO. Returns a list of ints (indexes Python lists and tensors)."""
    return [(i + 1) % n for i in range(n)]


def kto_loss(policy_logps, ref_logps, desirable, policy_kl_logps, ref_kl_logps, beta=0.1,
             desirable_weight=1.0, undesirable_weight=1.0, kl_reduce=None):
    """Kahneman-Tversky Optimization ("KTO: Model Alignment as Prospect Theoretic Optimization",
    Ethayarajh et al. 2024, arXiv:2402.01306), for unpaired examples each labelled desirable or not.

        r    = policy_logps - ref_logps                                  # summed log-probs, (B,)
        kl   = clamp(mean(policy_kl_logps - ref_kl_logps), min=0)        # detached scalar reference point
        loss_i = desirable_weight   * (1 - sigmoid(beta * (r_i - kl)))   if desirable[i]
                 undesirable_weight * (1 - sigmoid(beta * (kl - r_i)))   otherwise
        loss = sum_i loss_i / B                                          # weights are NOT renormalised
        reward = beta * r, per example

    desirable is a bool tensor (B,). *_kl_logps are summed log-probs of MISMATCHED (prompt, completion) pairs
    from the same micro-batch (kto_mismatched_indices), computed under no_grad for both models: the paper's
    biased estimate of KL(policy || ref) over the batch's prompts, which sets the reference point z0.
    kl_reduce, if given, is applied to the detached batch mean before clamping, e.g. an all-reduce average
    across DDP ranks so every rank uses the same z0. 1 - sigmoid(z) is computed as sigmoid(-z): finite for
    any |z|. Returns (loss: scalar, rewards: (B,) detached, kl: scalar detached)."""
    kl = (policy_kl_logps - ref_kl_logps).detach().mean()
    if kl_reduce is not None:
        kl = kl_reduce(kl)
    kl = kl.clamp(min=0)
    r = policy_logps - ref_logps
    losses = torch.where(desirable,
                         desirable_weight * torch.sigmoid(-beta * (r - kl)),
                         undesirable_weight * torch.sigmoid(-beta * (kl - r)))
    return losses.sum() / max(losses.numel(), 1), beta * r.detach(), kl


# -----------------------------------------------------------------------------------------------------------
# --loss_type: which loss, which options, which log-probs

LOSS_TYPES = ("dpo", "ipo", "hinge", "simpo", "orpo", "kto", "sft")

IN_USE = "set"  # an option counts as in use when the command line or a config file changed its default
# option: (the losses it applies to, when it counts as in use, why not elsewhere). An option in use with any
# other loss is an error naming it, never a silent no-op.
LOSS_OPTIONS = {
    "label_smoothing": (("dpo",), lambda v: v > 0, "it is conservative DPO's label-flip rate"),
    "rpo_alpha": (("dpo", "ipo", "hinge", "simpo"), lambda v: v > 0,
                  "it adds an NLL term; orpo and sft have one already, kto has no chosen answers"),
    "reference_free": (("dpo", "ipo", "hinge"), bool, "simpo, orpo and sft never have a reference, kto needs one"),
    "precompute_ref": (("dpo", "ipo", "hinge"), bool,
                       "kto's KL term pairs completions across each batch; simpo, orpo and sft have no reference"),
    "simpo_gamma": (("simpo",), IN_USE, "it is SimPO's target margin"),
    "desirable_weight": (("kto",), IN_USE, "it weights KTO's desirable examples"),
    "undesirable_weight": (("kto",), IN_USE, "it weights KTO's undesirable examples"),
}


def check_loss_options(cfg):
    """One line for an unknown --loss_type, or for an option set with a loss it does nothing for."""
    loss_type = cfg["loss_type"]
    if loss_type not in LOSS_TYPES:
        raise UserError(f"unknown loss_type '{loss_type}': expected one of {', '.join(LOSS_TYPES)}")
    for option, (applies_to, in_use, why) in LOSS_OPTIONS.items():
        value = cfg[option]
        used = value != configurator.defaults.get(option, value) if in_use == IN_USE else in_use(value)
        if used and loss_type not in applies_to:
            names = applies_to[0] + " only" if len(applies_to) == 1 else (
                ", ".join(applies_to[:-1]) + " and " + applies_to[-1])
            raise UserError(f"{option} applies to {names}, not '{loss_type}' ({why})")
    if cfg["precompute_ref"] and cfg["reference_free"]:
        raise UserError("precompute_ref with reference_free: there is no reference to precompute")


def needs_reference(loss_type, reference_free=False):
    """Whether the loss compares the policy with a reference model (simpo, orpo and sft never do)."""
    return loss_type in ("dpo", "ipo", "hinge", "kto") and not reference_free


def preference_loss(loss_type, pc, pr, rc, rr, nc, nr, beta, label_smoothing=0.0, simpo_gamma=0.5, rpo_alpha=0.0):
    """The loss --loss_type names, on a batch of pairs, and its metrics (TRL's names).
    pc, pr: the policy's summed log-probs of chosen / rejected; rc, rr: the reference's (0 for a uniform
    reference); nc, nr: their token counts; all (B,). Averages per token are taken here for the losses that
    want them. Returns (loss: scalar, {metric name: scalar tensor})."""
    nll = sft_loss(pc, nc)  # the chosen answers' per-token NLL: sft's loss, ORPO's first term, RPO's addition
    metrics = {"logps/chosen": pc.detach().mean(), "logps/rejected": pr.detach().mean()}
    if loss_type == "sft":
        return nll, {**metrics, "nll_loss": nll.detach()}
    if loss_type == "dpo":
        loss, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta, label_smoothing)
    elif loss_type == "hinge":
        loss, chosen_rewards, rejected_rewards = hinge_loss(pc, pr, rc, rr, beta)
    elif loss_type == "ipo":  # IPO's target margin is per token: it takes average log-probs (see ipo_loss)
        loss, chosen_rewards, rejected_rewards = ipo_loss(average_logps(pc, nc), average_logps(pr, nr),
                                                          average_logps(rc, nc), average_logps(rr, nr), beta)
    elif loss_type == "simpo":
        loss, chosen_rewards, rejected_rewards = simpo_loss(average_logps(pc, nc), average_logps(pr, nr), beta,
                                                            simpo_gamma)
    elif loss_type == "orpo":
        loss, chosen_rewards, rejected_rewards, log_odds_ratio, log_odds_chosen = orpo_loss(
            average_logps(pc, nc), average_logps(pr, nr), nll, beta)
        metrics.update({"nll_loss": nll.detach(), "log_odds_ratio": log_odds_ratio,
                        "log_odds_chosen": log_odds_chosen})
    else:
        raise ValueError(f"preference_loss: no pairwise loss '{loss_type}' (kto's is in kto.py)")
    if rpo_alpha > 0:
        loss = loss + rpo_alpha * nll
        metrics["nll_loss"] = nll.detach()
    return loss, {**metrics, "rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
                  "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
                  "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean()}
