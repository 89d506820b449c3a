"""
What a run optimises: --loss_type names one loss of losses.py, or a weighted sum of several ('dpo+bco+sft' with
--loss_weights=0.8,0.2,1.0, MPO); which setting applies to which loss (LOSS_OPTIONS: one set where it does
nothing is a one-line error, never a silent no-op); and Objective, what dpo.py calls on a micro-batch's
log-probs. This is the one dispatch point: the losses themselves stay pure functions in losses.py.
"""

import math
import os

import torch

import configurator
from nanopo import kto
from configurator import UserError
from logprobs import average_logps
from losses import (F_DIVERGENCES, aot_loss, apo_down_loss, apo_zero_loss, bco_loss, discopop_loss, dpo_loss,
                    exo_loss, f_divergence, hinge_loss, implicit_rewards, ipo_loss, nca_loss, orpo_loss, robust_loss,
                    sft_loss, simpo_loss, sppo_hard_loss)
from nanopo.runtime import all_reduce_sum, micro_batches

# The pairwise losses, by what they read. kto (unpaired, kto.py) stands apart.
AVERAGED = ("dpo_norm", "ipo")  # per-token average log-probs of policy and reference; the rest sum them
MARGIN = ("dpo", "dpo_norm", "ipo", "hinge", "robust", "exo", "discopop", "aot")  # functions of the margin h
WITH_REFERENCE = MARGIN + ("nca", "bco", "sppo_hard", "aot_unpaired", "apo_zero", "apo_down")
F_DIVERGENCE_TERMS = ("dpo", "dpo_norm", "ipo", "hinge", "robust", "exo")  # sigmoid, hinge and IPO-style losses
PAIRWISE = WITH_REFERENCE + ("simpo", "orpo", "sft")
LOSS_TYPES = PAIRWISE + ("kto",)
TRL_NAMES = {"sigmoid": "dpo", "sigmoid_norm": "dpo_norm", "exo_pair": "exo", "nca_pair": "nca", "bco_pair": "bco"}
TRL_DIVERGENCES = {"js_divergence": "js", "alpha_divergence": "alpha"}

IN_USE = "set"  # an option counts as in use when the command line or a config file changed its default
# option: (the losses it applies to, when it counts as in use, why not elsewhere). In a combination an option
# must apply to at least one term, and acts on those (EVERY_TERM options: on all of them, or it is an error).
LOSS_OPTIONS = {
    "label_smoothing": (("dpo", "robust", "exo", "aot", "aot_unpaired"), lambda v: v > 0,
                        "it is the label-flip rate of cDPO, rDPO, EXO and AOT"),
    "rpo_alpha": (WITH_REFERENCE + ("simpo",), lambda v: v > 0,
                  "it adds an NLL term; orpo and sft have one already, kto has no chosen answers"),
    "reference_free": (MARGIN, bool, "simpo, orpo and sft never have a reference, kto needs one, and the "
                       "others score each log-ratio against the reference's on its own"),
    "precompute_ref": (WITH_REFERENCE, bool,
                       "kto's KL term pairs completions across each batch; simpo, orpo and sft have no reference"),
    "simpo_gamma": (("simpo",), IN_USE, "it is SimPO's target margin"),
    "desirable_weight": (("kto",), IN_USE, "it weights KTO's desirable examples"),
    "undesirable_weight": (("kto",), IN_USE, "it weights KTO's undesirable examples"),
    "discopop_tau": (("discopop",), IN_USE, "it is DiscoPOP's switching width"),
    "bco_running_delta": (("bco",), IN_USE, "it is BCO's reward shift"),
    "f_divergence_type": (F_DIVERGENCE_TERMS, lambda v: v != "reverse_kl",
                          "it reshapes the margin of the sigmoid, hinge and IPO-style losses"),
    "use_weighting": (tuple(n for n in WITH_REFERENCE if not n.startswith("aot")), bool,
                      "WPO weights TRL's DPO-family pairs; aot's sorted terms are not pairs"),
    "ld_alpha": (tuple(n for n in WITH_REFERENCE if n not in AVERAGED), lambda v: v < 1,
                 "it discounts summed log-probs of pairs; averages are length-free already, kto has no pairs, "
                 "and the NLL of sft must see the plain sum"),
    "ref_sync_steps": (WITH_REFERENCE + ("kto",), lambda v: v > 0,
                       "it moves the reference model (TR-DPO); simpo, orpo and sft have none"),
}
EVERY_TERM = ("ld_alpha",)  # it changes the log-probs every term sees


def loss_terms(loss_type, loss_weights=""):
    """'dpo+bco+sft' and '0.8,0.2,1' -> (['dpo', 'bco', 'sft'], [0.8, 0.2, 1.0]) (weights all 1 when ''), with a
    one-line error for an unknown name, a repeated one, kto in a combination, or weights that do not fit."""
    names = loss_type.split("+")
    for name in names:
        if name not in LOSS_TYPES:
            hint = f" (TRL's '{name}' is our '{TRL_NAMES[name]}')" if name in TRL_NAMES else ""
            raise UserError(f"unknown loss_type '{name}'{hint}: expected one of {', '.join(LOSS_TYPES)}, or "
                            "several joined by '+' (dpo+bco+sft)")
    if len(set(names)) < len(names):
        raise UserError(f"loss_type '{loss_type}' names a loss twice: give it a larger weight instead")
    if len(names) > 1 and "kto" in names:
        raise UserError(f"loss_type '{loss_type}': kto learns from unpaired examples, it cannot join pairwise losses")
    if not loss_weights:
        return names, [1.0] * len(names)
    try:
        weights = [float(w) for w in str(loss_weights).split(",")]
    except ValueError:
        raise UserError(f"loss_weights='{loss_weights}': expected numbers separated by commas") from None
    if len(weights) != len(names):
        raise UserError(f"loss_weights='{loss_weights}' has {len(weights)} weight(s) for the {len(names)} "
                        f"loss(es) of '{loss_type}'")
    if not all(math.isfinite(w) and w >= 0 for w in weights) or not any(weights):
        raise UserError(f"loss_weights='{loss_weights}': weights must be finite, >= 0 and not all 0")
    return names, weights


def described(names):
    """('a',) -> 'a only'; ('a', 'b', 'c') -> 'a, b and c'; most losses -> 'every loss but x and y'."""
    if len(names) == 1:
        return names[0] + " only"
    others = [n for n in LOSS_TYPES if n not in names]
    listed = others if len(others) < len(names) else names
    text = ", ".join(listed[:-1]) + " and " + listed[-1] if len(listed) > 1 else listed[0]
    return "every loss but " + text if listed is others else text


def check_loss_options(cfg):
    """One line for an unknown --loss_type, for an option set with a loss it does nothing for, and for options
    that contradict each other (run before any work)."""
    names, _ = loss_terms(cfg["loss_type"], cfg.get("loss_weights", ""))
    for option, (applies_to, in_use, why) in LOSS_OPTIONS.items():
        if option not in cfg:
            continue
        value = cfg[option]
        used = value != configurator.defaults.get(option, value) if in_use == IN_USE else in_use(value)
        fits = all if option in EVERY_TERM else any
        if used and not fits(n in applies_to for n in names):
            raise UserError(f"{option} applies to {described(applies_to)}, not '{cfg['loss_type']}' ({why})")
    if cfg["precompute_ref"] and cfg["reference_free"]:
        raise UserError("precompute_ref with reference_free: there is no reference to precompute")
    kind = cfg.get("f_divergence_type", "reverse_kl")
    if kind not in F_DIVERGENCES:
        hint = f" (TRL's '{kind}' is our '{TRL_DIVERGENCES[kind]}')" if kind in TRL_DIVERGENCES else ""
        raise UserError(f"unknown f_divergence_type '{kind}'{hint}: expected one of {', '.join(F_DIVERGENCES)}")
    if cfg.get("f_alpha_divergence_coef") != configurator.defaults.get("f_alpha_divergence_coef") and kind != "alpha":
        raise UserError("f_alpha_divergence_coef applies to f_divergence_type='alpha' only")
    if cfg.get("ld_alpha", 1.0) < 1 and cfg["rpo_alpha"] > 0:
        raise UserError("ld_alpha with rpo_alpha: RPO's NLL would read the length-discounted log-probs")
    sync, moved = cfg.get("ref_sync_steps", 0) > 0, "ref_sync_steps moves the reference during training"
    if cfg.get("ref_mixup_alpha") != configurator.defaults.get("ref_mixup_alpha") and not sync:
        raise UserError("ref_mixup_alpha applies only with ref_sync_steps > 0 (TR-DPO)")
    if sync and (cfg["precompute_ref"] or cfg["reference_free"]):
        raise UserError(f"{moved}: with {'precompute_ref' if cfg['precompute_ref'] else 'reference_free'} "
                        "there is no reference model to move")
    if "kto" in names:  # the ranks torchrun starts: WORLD_SIZE is set before the script runs
        kto.check_micro_batch(micro_batches(cfg["batch_size"], cfg["gradient_accumulation_steps"],
                                            int(os.environ.get("WORLD_SIZE", 1)))[1])


def needs_reference(loss_type, reference_free=False):
    """Whether the loss (any term of a combination) compares the policy with a reference model."""
    return any(n in WITH_REFERENCE + ("kto",) for n in loss_type.split("+")) and not reference_free


# -----------------------------------------------------------------------------------------------------------
# One term: the dispatch

BETA_ONLY = {"ipo": ipo_loss, "hinge": hinge_loss, "nca": nca_loss, "sppo_hard": sppo_hard_loss,
             "apo_zero": apo_zero_loss, "apo_down": apo_down_loss}  # the losses with no setting but beta


def preference_loss(name, pc, pr, rc, rr, nc, nr, beta, label_smoothing=0.0, simpo_gamma=0.5, discopop_tau=0.05,
                    f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, weights=None, delta=0.0):
    """The loss `name` on a batch of pairs. pc, pr: the policy's summed log-probs of chosen / rejected; rc, rr:
    the reference's (0 for a uniform reference); nc, nr: their token counts; all (B,). weights: WPO's per-pair
    weights or None; delta: BCO's reward shift. Averages per token are taken here for the losses that want
    them. Returns (loss: scalar, chosen_rewards, rejected_rewards: (B,) or None for sft, {metric: scalar})."""
    nll = sft_loss(pc, nc)  # the chosen answers' per-token NLL: sft's loss, ORPO's first term
    if name == "sft":
        return nll, None, None, {"nll_loss": nll.detach()}
    if name in ("simpo", "orpo"):  # reference-free, per-token averages of the policy alone
        pc_avg, pr_avg = average_logps(pc, nc), average_logps(pr, nr)
        if name == "simpo":
            return *simpo_loss(pc_avg, pr_avg, beta, simpo_gamma), {}
        loss, chosen_rewards, rejected_rewards, log_odds_ratio, log_odds_chosen = orpo_loss(pc_avg, pr_avg, nll, beta)
        return loss, chosen_rewards, rejected_rewards, {"nll_loss": nll.detach(), "log_odds_ratio": log_odds_ratio,
                                                        "log_odds_chosen": log_odds_chosen}
    if name in AVERAGED:  # IPO's target and dpo_norm's margin are per token (see ipo_loss)
        pc, pr, rc, rr = average_logps(pc, nc), average_logps(pr, nr), average_logps(rc, nc), average_logps(rr, nr)
    rewards = implicit_rewards(beta, pc, pr, rc, rr)  # beta * (policy - ref), whatever shape the loss gives h
    if f_divergence_type != "reverse_kl" and name in F_DIVERGENCE_TERMS:  # h = psi(pc - rc) - psi(pr - rr)
        pc = f_divergence(pc - rc, f_divergence_type, f_alpha_divergence_coef)
        pr = f_divergence(pr - rr, f_divergence_type, f_alpha_divergence_coef)
        rc, rr = torch.zeros_like(pc), torch.zeros_like(pr)
    args = (pc, pr, rc, rr, beta)
    if name in ("dpo", "dpo_norm"):
        loss = dpo_loss(*args, label_smoothing, weights=weights)[0]
    elif name == "robust":
        loss = robust_loss(*args, label_smoothing, weights=weights)[0]
    elif name == "exo":  # EXO needs eps > 0: TRL's 1e-3 unless label_smoothing says otherwise
        loss = exo_loss(*args, label_smoothing or 1e-3, weights=weights)[0]
    elif name in ("aot", "aot_unpaired"):
        loss = aot_loss(*args, label_smoothing, unpaired=name == "aot_unpaired")[0]
    elif name == "discopop":
        loss = discopop_loss(*args, discopop_tau, weights=weights)[0]
    elif name == "bco":
        loss = bco_loss(*args, delta, weights=weights)[0]
        return loss, *rewards, {"delta": pc.new_tensor(float(delta))}
    elif name in BETA_ONLY:
        loss = BETA_ONLY[name](*args, weights=weights)[0]
    else:
        raise ValueError(f"preference_loss: no pairwise loss '{name}' (kto's is in kto.py)")
    return loss, *rewards, {}


# -----------------------------------------------------------------------------------------------------------
# The objective: one term or a weighted sum, with RPO and BCO's running mean

class RunningMean:
    """The mean of every value seen so far: BCO's reward shift delta (Jung et al. 2024 keep it as a running
    average of the rewards). Under DDP / FSDP the ranks' sums and counts are added first, so every rank holds
    the same mean. Kept in Python floats (float64) and saved in checkpoints, so a resumed run continues it."""

    def __init__(self):
        self.total, self.count = 0.0, 0

    def update(self, values, rt=None):
        """Add a batch of rewards (summed over all ranks) to the running mean."""
        totals = torch.stack([values.detach().double().sum(), torch.tensor(float(values.numel()), dtype=torch.float64,
                                                                           device=values.device)])
        if rt is not None:
            totals = all_reduce_sum(totals, rt)
        self.total += totals[0].item()
        self.count += int(totals[1].item())

    @property
    def mean(self):
        return self.total / self.count if self.count else 0.0


SETTINGS = ("beta", "label_smoothing", "simpo_gamma", "discopop_tau", "f_divergence_type", "f_alpha_divergence_coef")


class Objective:
    """--loss_type with its settings: call it on a micro-batch's (pc, pr, rc, rr, nc, nr[, WPO weights]) for
    (loss, metrics). One term logs TRL's metric names (rewards/chosen, ..., plus its own: nll_loss, delta, ...;
    wpo_weight, the batch's mean WPO weight);
    a combination sum_i w_i loss_i also logs every term's value and metrics under its name (dpo/loss,
    bco/rewards/margins, sft/nll_loss, ...), the top-level rewards/* being the first term's that has rewards.
    rpo_alpha > 0 adds rpo_alpha * NLL(chosen). BCO's delta is a RunningMean of the rewards, moved only by
    batches that train (gradients enabled), not by held-out evaluation."""

    def __init__(self, cfg, rt=None):
        self.names, self.weights = loss_terms(cfg["loss_type"], cfg.get("loss_weights", ""))
        self.settings = {k: cfg[k] for k in SETTINGS if k in cfg}
        self.rpo_alpha, self.rt = cfg.get("rpo_alpha", 0.0), rt
        self.bco_mean = RunningMean() if "bco" in self.names and cfg.get("bco_running_delta", True) else None

    def __call__(self, pc, pr, rc, rr, nc, nr, weights=None):
        beta = self.settings["beta"]
        delta = 0.0
        if self.bco_mean is not None:
            if torch.is_grad_enabled():  # training: this batch's rewards join the mean before it is used
                self.bco_mean.update(torch.cat(implicit_rewards(beta, pc, pr, rc, rr)), self.rt)
            delta = self.bco_mean.mean
        metrics = {"logps/chosen": pc.detach().mean(), "logps/rejected": pr.detach().mean()}
        total, rewards, per_term = 0.0, None, {}
        for name, weight in zip(self.names, self.weights):
            loss, chosen_rewards, rejected_rewards, extra = preference_loss(
                name, pc, pr, rc, rr, nc, nr, **self.settings, weights=weights, delta=delta)
            total = total + weight * loss
            term = dict(extra)
            if chosen_rewards is not None:
                term.update(reward_metrics(chosen_rewards, rejected_rewards))
                rewards = rewards or {k: v for k, v in term.items() if k.startswith("rewards/")}
            per_term[name] = {"loss": loss.detach(), **term}
        if len(self.names) == 1:
            metrics.update(per_term[self.names[0]])
            metrics.pop("loss")
        else:
            metrics.update({f"{n}/{k}": v for n, term in per_term.items() for k, v in term.items()})
            metrics.update(rewards or {})
        if weights is not None:  # WPO: the mean pair weight (1 = every pair as likely as the policy's own)
            metrics["wpo_weight"] = weights.mean()
        if self.rpo_alpha > 0:
            nll = sft_loss(pc, nc)
            total = total + self.rpo_alpha * nll
            metrics["nll_loss"] = nll.detach()
        return total, metrics

    def state_dict(self):
        """What a checkpoint needs to continue the objective exactly: BCO's running mean, when there is one."""
        return {} if self.bco_mean is None else {"bco_running_delta": vars(self.bco_mean).copy()}

    def load_state_dict(self, ckpt):
        if self.bco_mean is not None and "bco_running_delta" in ckpt:
            vars(self.bco_mean).update(ckpt["bco_running_delta"])


def reward_metrics(chosen_rewards, rejected_rewards):
    """TRL's reward metrics of a batch: means of the chosen and rejected rewards, of their margin, and the
    fraction of pairs whose chosen reward is the larger."""
    return {"rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean()}
