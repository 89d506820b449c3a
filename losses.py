"""
Preference-optimisation losses, each a short pure function of per-sequence log-probabilities.

Conventions (one name for one thing, everywhere in this repo):
  policy_* / ref_*          the model being trained / the frozen reference (the SFT checkpoint)
  chosen / rejected         the preferred / dispreferred response of a pair
  *_logps                   summed log-prob of a response (its tokens + EOS), shape (B,)
  *_avg_logps               the same divided by the number of response tokens, shape (B,)
Every loss returns the batch mean; rewards are returned detached, per example, for logging.
"""

import torch
import torch.nn.functional as F


def sequence_logprobs(token_logps, mask):
    """Sum per-token log-probs over the response (mask = 1 on response tokens and EOS, 0 on prompt and padding).
    token_logps, mask: (B, T). Returns (logps, n_tokens), both (B,): logps is the summed log-prob,
    n_tokens how many tokens it sums (float). Divide them for the per-token average; an empty mask gives
    logps 0 and n_tokens 0, so callers clamp n_tokens before dividing."""
    mask = mask.to(token_logps.dtype)
    return (token_logps * mask).sum(-1), mask.sum(-1)


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta=0.1, label_smoothing=0.0):
    """Direct Preference Optimization (Rafailov et al. 2023, arXiv:2305.18290), sigmoid form.

        h      = (pc - rc) - (pr - rr)                 # difference of implicit rewards, / beta
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
