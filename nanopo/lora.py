"""
LoRA, written out: low-rank adapters on a GPT's projections (Hu et al. 2021), the switch that turns them off (so
DPO's reference is the policy itself without them), and merging them into the base weights.

    apply_lora      freeze a GPT and put a LoRALinear on the chosen Linear layers of every block
    adapters_off    a context manager: inside it the model computes its base weights alone
    AdaptersOff     the model with its adapters off, as a callable: dpo.py's reference under --lora_rank
    merge_lora      W <- W + (alpha / r) B A, and plain nn.Linear layers again (sample.py,
                    scripts/export_hf.py, DPO)
    lora_settings   what a checkpoint records to rebuild the adapters
"""

import math
from contextlib import contextmanager

import torch
import torch.nn as nn
from torch.nn import functional as F

from configurator import UserError

LORA_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # the Linear layers of a block


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update (LoRA: Hu et al. 2021, arXiv:2106.09685):

        y = W x + b + (alpha / r) B A x,     A: (r, in), B: (out, r), r << min(in, out)

    W and b are the wrapped layer's own parameters, under their own names (a checkpoint's `c_attn.weight` stays
    `c_attn.weight`), frozen. A starts random, as nn.Linear initialises a weight, and B at zero, so BA = 0 and
    step 0 computes exactly the base model. Training then learns BA, r * (in + out) numbers instead of in * out.
    alpha / r scales the update, so alpha holds its size steady when r changes. Dropout (lora_dropout) acts on
    the adapter's input only. `enabled = False` switches the adapter off: y = W x + b, bit for bit the layer
    without it (adapters_off does this for a whole model)."""

    def __init__(self, base, rank, alpha, dropout=0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameter objects: no copy of the base weights
        self.register_parameter("bias", base.bias)  # (None for bias=False)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.lora_A = nn.Parameter(base.weight.new_empty(rank, self.in_features))
        self.lora_B = nn.Parameter(base.weight.new_zeros(self.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own initialisation of a weight
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.lora_dropout = nn.Dropout(dropout)
        self.enabled = True

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return y
        # x A^T is (..., r): the update never forms the (out, in) matrix BA
        return y + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scaling

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}"


def lora_targets(spec):
    """'attn.c_attn,mlp.c_fc' (or a tuple of names) -> a tuple of LORA_TARGETS; an unknown name is an error."""
    names = tuple(n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip())
    unknown = [n for n in names if n not in LORA_TARGETS]
    if unknown or not names:
        raise UserError(f"lora_targets={spec!r}: expected a comma-separated subset of {','.join(LORA_TARGETS)}")
    return names


def apply_lora(model, rank, alpha, dropout=0.0, targets=LORA_TARGETS):
    """Freeze every parameter of `model` (a GPT) and wrap the `targets` Linear layers of every block in a
    LoRALinear: afterwards only the adapters require gradients (so the optimizer gets only them). In place;
    returns the model."""
    model.requires_grad_(False)
    for block in model.transformer.h:
        for name in lora_targets(targets):
            parent, attr = block.get_submodule(name.split(".")[0]), name.split(".")[1]
            # (in the model's mode: a new module would otherwise start in training mode, its dropout on)
            setattr(parent, attr, LoRALinear(getattr(parent, attr), rank, alpha, dropout).train(model.training))
    return model


def lora_layers(model):
    """The model's LoRALinear layers (none without LoRA)."""
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def lora_settings(model):
    """{'rank', 'alpha', 'targets'} of the model's adapters (what a checkpoint needs to rebuild them), or None."""
    layers = lora_layers(model)
    if not layers:
        return None
    targets = [n.split(".", 3)[3] for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    return {"rank": layers[0].rank, "alpha": layers[0].alpha, "targets": ",".join(dict.fromkeys(targets))}


@contextmanager
def adapters_off(model):
    """Inside it, `model` (or any module holding it: DDP, torch.compile) computes its base weights alone."""
    layers = lora_layers(model)
    before = [m.enabled for m in layers]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m, on in zip(layers, before):
            m.enabled = on


class AdaptersOff:
    """A model with its LoRA adapters switched off, as a callable that stands wherever a model is called: with
    LoRA, DPO's reference is the policy itself without its adapters, the base model the adapters started from.
    One set of base weights in memory, and nothing to freeze: the base weights get no gradients anyway. It is
    not an nn.Module: it owns no parameters of its own."""

    def __init__(self, model):
        self.model = model

    def __call__(self, *args, **kwargs):
        with adapters_off(self.model):
            return self.model(*args, **kwargs)


@torch.no_grad()
def merge_lora(model):
    """Fold each adapter into its base weight, W <- W + (alpha / r) B A, and put the plain nn.Linear back: a
    GPT with the standard parameter names again (for sample.py, scripts/export_hf.py, or as the next
    stage's base), every parameter trainable as in a freshly loaded model. In place; returns the
    model."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            m.weight += (m.lora_B @ m.lora_A) * m.scaling
            plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            plain.weight, plain.bias = m.weight, m.bias
            parent, attr = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), attr, plain)
    return model.requires_grad_(True)
