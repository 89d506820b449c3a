"""
Optimisation verbs the training loops call: the learning-rate schedule, AdamW, gradient clipping, and the
all-rank check that skips a step whose loss or gradient is not finite.
"""

import math

import torch

from nanopo.errors import UserError
from nanopo.runtime import all_reduce_sum


def get_lr(it, learning_rate, min_lr, warmup_iters, lr_decay_iters, decay_lr=True):
    """Linear warmup over warmup_iters, then cosine decay to min_lr at lr_decay_iters (constant when decay_lr
    is False, after the warmup)."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if not decay_lr:
        return learning_rate
    if it > lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # 1 -> 0
    return min_lr + coeff * (learning_rate - min_lr)


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


def configure_optimizer(model, weight_decay, learning_rate, betas, device_type):
    """AdamW with weight decay on the matrices (every >= 2-D parameter) only; biases and LayerNorms are not
    decayed, as in nanoGPT. Fused kernels on CUDA and CPU. Only parameters that require gradients are given to
    it, so a frozen parameter gets no optimizer state."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # fused: one kernel for the whole update instead of a Python loop over tensors (~3x faster on a CPU);
    # FSDP2's sharded (DTensor) parameters take the default implementation
    sharded = any(type(p).__name__ == "DTensor" for p in params)
    extra = {"fused": True} if device_type in ("cuda", "cpu") and not sharded else {}
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **extra)


def clip_grad_norm(model, grad_clip):
    """Clip the gradients to a total norm of grad_clip (0 = no clipping); returns the norm before clipping, a
    scalar tensor (under FSDP2: over every rank's shards)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


class NonFiniteGuard:
    """Decides, the same way on every rank, whether a step may update the weights: not when the step's loss
    (all-reduced) or gradient norm (already all-reduced by DDP / FSDP) is NaN or infinite. Skipped steps are
    counted (`total`, carried over a resume through the checkpoint), and max_in_a_row of them in a row stop the
    run with one line: the weights and the last checkpoint stay as they were."""

    def __init__(self, max_in_a_row=5, total=0):
        self.max_in_a_row, self.total, self.in_a_row = max_in_a_row, total, 0

    def all_finite(self, step_loss, grad_norm, scaler, rt, it):
        """Whether this step may update the weights, the same answer on every rank (its loss is reduced first);
        counts a skip, and stops the run after max_in_a_row non-finite steps in a row."""
        loss = all_reduce_sum(step_loss.detach().float().reshape(1).clone(), rt)
        # with fp16, GradScaler finds overflowing gradients itself and skips those steps in scaler.step
        finite = bool(torch.isfinite(loss).all() and (scaler.is_enabled() or torch.isfinite(grad_norm)))
        if finite:
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.total += 1
        if rt.master:
            print(f"iter {it}: non-finite loss or gradient norm, update skipped ({self.total} so far)")
        if self.in_a_row >= self.max_in_a_row:
            raise UserError(f"{self.in_a_row} non-finite steps in a row at iter {it}: stopping (lower "
                            "learning_rate, or check the data); the last checkpoint is intact")
        return False
