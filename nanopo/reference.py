"""
A reference that moves towards the policy during training (TR-DPO, --ref_sync_steps / --ref_mixup_alpha:
ReferenceSync). dpo.py's default, the frozen deep copy run live, does not move; --precompute_ref computes its
log-probs once instead (logprobs.logps_table).
"""

import torch

from nanopo.checkpoint import full_state_dict
from nanopo.runtime import unwrap


@torch.no_grad()
def mix_into(reference, policy, alpha):
    """reference <- alpha * policy + (1 - alpha) * reference, parameter by parameter, in place (TR-DPO's soft
    update). Under FSDP2 both models are sharded the same way (runtime.shard), so each rank mixes its own
    shards (resharded first): the same arithmetic on the same numbers as mixing the full tensors, with no
    communication. Under DDP every rank holds the same two models and mixes them identically."""
    for model in (reference, policy):  # FSDP2 leaves the root's parameters gathered after a forward: shard them
        for module in unwrap(model).modules():
            if hasattr(module, "reshard"):  # an FSDP2-sharded module
                module.reshard()
    own = dict(unwrap(policy).named_parameters())
    for name, ref in unwrap(reference).named_parameters():
        pol = own[name]
        ref_local, pol_local = (ref.to_local(), pol.to_local()) if hasattr(ref, "to_local") else (ref, pol)
        ref_local.mul_(1 - alpha).add_(pol_local.detach(), alpha=alpha)


class ReferenceSync:
    """TR-DPO ("Learn Your Reference Model for Real Good Alignment", Gorbatovski et al. 2024, arXiv:2404.09656;
    TRL's sync_ref_model): every `steps` optimizer steps the reference becomes

        reference <- alpha * policy + (1 - alpha) * reference         (alpha = 1: a hard copy of the policy)

    so the KL anchor follows the policy instead of holding it near the SFT model for the whole run: the margins
    are measured against a more recent model, and pairs the policy has already separated count again. steps = 0
    switches it off (every method is then a no-op). A reference that has moved is part of the run's state: its
    weights go into the checkpoint (gathered from the shards under FSDP), and a resumed run continues with them."""

    def __init__(self, reference, policy, steps, alpha, rt):
        self.reference, self.policy, self.steps, self.alpha, self.rt = reference, policy, steps, alpha, rt
        self.syncs = 0

    def after_step(self, it):
        """Call after the optimizer step of iteration `it` (0-based): mixes when it + 1 steps are a multiple of
        `steps`, as TRL mixes at every steps-th global step."""
        if self.steps and (it + 1) % self.steps == 0:
            mix_into(self.reference, self.policy, self.alpha)
            self.syncs += 1

    def state_dict(self):
        """{'reference': its full weights, 'reference_syncs': n} once it has moved, else {}. Every rank must call
        it (under FSDP gathering the shards is a collective)."""
        if not self.syncs:
            return {}
        return {"reference": full_state_dict(self.reference, self.rt), "reference_syncs": self.syncs}

    def load_state_dict(self, ckpt):
        """Put a checkpoint's moved reference back (a checkpoint from before the first sync has none: the reference
        is then still the SFT model it was built as)."""
        if "reference" not in ckpt:
            return
        self.syncs = ckpt["reference_syncs"]
        if self.rt.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
            set_model_state_dict(unwrap(self.reference), ckpt["reference"],
                                 options=StateDictOptions(full_state_dict=True))
        else:
            unwrap(self.reference).load_state_dict(ckpt["reference"], strict=True)
