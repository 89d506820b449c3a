"""
The machinery sft.py and dpo.py share, written once: device / DDP set-up, the LR schedule, the optimizer,
checkpoint save and load, metric logging, task evaluation and the training loop itself. Each script keeps what
makes it different (its data and its loss) and reads top to bottom like nanoGPT's train.py.
"""

import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist

from data import Tokenizer, UserError
from model import GPT, GPTConfig

CHECKPOINT_FORMAT = 1  # bump when the checkpoint layout changes


def _report_user_errors(exc_type, exc, tb):
    """Bad input ends the run with one line naming the problem; a bug in the code still shows its traceback."""
    if issubclass(exc_type, UserError):
        print(f"error: {exc}", file=sys.stderr)
    else:
        sys.__excepthook__(exc_type, exc, tb)


sys.excepthook = _report_user_errors


# -----------------------------------------------------------------------------------------------------------
# Device, precision, DDP

@dataclass
class Runtime:
    device: str
    device_type: str       # 'cuda' or 'cpu', for autocast
    dtype: str             # 'float32', 'bfloat16' or 'float16'
    ddp: bool
    rank: int
    local_rank: int
    world_size: int

    @property
    def master(self):
        return self.rank == 0

    def autocast(self):
        if self.dtype == "float32":
            return nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=getattr(torch, self.dtype))


def setup_runtime(device="auto", dtype="auto", seed=1):
    """Pick the device (torchrun's env vars mean DDP: gloo on CPU, nccl on CUDA) and seed every RNG.
    All ranks use the same seed, so they build identical models; they read different data slices."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    rank, local_rank, world_size = 0, 0, 1
    if ddp:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return Runtime(device, device_type, dtype, ddp, rank, local_rank, world_size)


def all_reduce_sum(t, rt):
    if rt.ddp:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def cleanup(rt):
    if rt.ddp:
        dist.destroy_process_group()


# -----------------------------------------------------------------------------------------------------------
# Optimisation

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


def configure_optimizer(model, weight_decay, learning_rate, betas, device_type):
    """AdamW with weight decay on the matrices (every >= 2-D parameter) only; biases and LayerNorms are not
    decayed, as in nanoGPT. Fused kernels on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    extra = {"fused": True} if device_type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **extra)


# -----------------------------------------------------------------------------------------------------------
# Checkpoints

def unwrap(model):
    """The plain GPT inside DDP(...) and/or torch.compile(...)."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def save_checkpoint(path, model, config, tokenizer, **extra):
    """Write a checkpoint atomically: a temporary file in the same folder, flushed to disk, then os.replace, so
    an interrupted write never leaves a half-written ckpt.pt behind. Holds the model's weights and shape, the
    run's config, the tokenizer's name and the format version, plus whatever the caller adds (iter_num,
    optimizer state, data position, ...)."""
    raw = unwrap(model)
    for name, p in raw.state_dict().items():
        if not torch.isfinite(p).all():
            raise UserError(f"refusing to save {path}: parameter '{name}' is not finite")
    ckpt = {"format_version": CHECKPOINT_FORMAT, "model": raw.state_dict(), "model_args": asdict(raw.config),
            "config": config, "tokenizer": tokenizer, **extra}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path, tokenizer=None):
    """Load a checkpoint onto the CPU (weights_only: a checkpoint cannot run code). Checks the format and, when
    `tokenizer` is given, that the checkpoint was trained with it."""
    if not os.path.exists(path):
        raise UserError(f"checkpoint {path} does not exist (run sft.py first, or pass --sft_ckpt=...)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"checkpoint {path} could not be read ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise UserError(f"checkpoint {path} is not a checkpoint of this code (no 'model'/'model_args')")
    if ckpt.get("format_version") != CHECKPOINT_FORMAT:
        raise UserError(f"checkpoint {path} has format {ckpt.get('format_version')}, expected {CHECKPOINT_FORMAT}")
    if tokenizer is not None and ckpt.get("tokenizer") != tokenizer:
        raise UserError(f"checkpoint {path} was trained with tokenizer '{ckpt.get('tokenizer')}', "
                        f"this run uses '{tokenizer}'")
    return ckpt


def load_state_strict(model, state_dict, path="checkpoint"):
    """Load weights strictly: every key must match. Prefixes left by torch.compile ('_orig_mod.') and DDP
    ('module.') are stripped first, so checkpoints of wrapped models load into a plain GPT."""
    clean = {}
    for k, v in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        clean[k] = v
    own = model.state_dict()
    missing = sorted(set(own) - set(clean))
    unexpected = sorted(set(clean) - set(own))
    if missing or unexpected:
        raise UserError(f"{path} does not fit the model: missing keys {missing[:3]}, unexpected keys {unexpected[:3]}")
    for k, v in clean.items():
        if v.shape != own[k].shape:
            raise UserError(f"{path}: '{k}' has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}")
    model.load_state_dict(clean, strict=True)


def model_from_checkpoint(ckpt, path="checkpoint", **overrides):
    """Build a GPT of the checkpoint's shape (with e.g. dropout overridden) and load its weights strictly."""
    args = dict(ckpt["model_args"], **overrides)
    try:
        model = GPT(GPTConfig(**args))
    except TypeError as e:
        raise UserError(f"{path}: model_args do not describe this GPT ({e})")
    load_state_strict(model, ckpt["model"], path)
    return model


# -----------------------------------------------------------------------------------------------------------
# Logging and evaluation

class MetricLogger:
    """Appends one JSON object per logged step to out_dir/metrics.jsonl (rank 0 only). A fresh run starts a
    fresh file; the schema is in the README."""

    def __init__(self, out_dir, rt, append=False):
        self.rt = rt
        self.path = os.path.join(out_dir, "metrics.jsonl")
        if rt.master:
            os.makedirs(out_dir, exist_ok=True)
            if not append:
                open(self.path, "w").close()

    def log(self, record):
        if self.rt.master:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


@torch.no_grad()
def evaluate_task(model, task, tok, rt, max_new_tokens=8, batch_size=500):
    """Held-out exact-match accuracy (0-1) of greedy completions. Under DDP each rank takes every
    world_size-th problem and the counts are summed, so no rank waits on another's share."""
    raw = unwrap(model)
    was_training = raw.training
    raw.eval()
    problems = task.eval_problems[rt.rank::rt.world_size]
    correct = 0
    for i in range(0, len(problems), batch_size):
        chunk = problems[i:i + batch_size]
        prompts = [task.prompt(a, b) for a, b in chunk]
        with rt.autocast():
            outs = raw.generate([tok.encode(p) for p in prompts], max_new_tokens, tok.eos_id, tok.pad_id)
        correct += sum(task.is_correct(p, tok.decode(o)) for p, o in zip(prompts, outs))
    counts = all_reduce_sum(torch.tensor([correct, len(problems)], dtype=torch.float64, device=rt.device), rt)
    raw.train(was_training)
    return (counts[0] / counts[1]).item()


# -----------------------------------------------------------------------------------------------------------
# The training loop

def train_loop(rt, model, optimizer, cfg, order, make_batch, compute_loss, evaluate, save, logger, describe):
    """Run cfg['max_iters'] optimizer steps.
    Each step takes batch_size * gradient_accumulation_steps row indices from `order` (a data.BatchOrder, the
    same on every rank) and cuts them into micro-batches of batch_size; rank r runs its own contiguous share, so
    the global batch is the same whatever the world size.
    make_batch(indices) -> batch (whatever compute_loss takes, with an int 'n_tokens');
    compute_loss(batch) -> (loss, {metric name: scalar tensor}); evaluate() -> {name: float};
    save(iter_num, results) writes a checkpoint with the last evaluation's results; describe(metrics) -> the script's part of the stdout line.
    Evaluates at iter 0, every eval_interval and after the last step. Logged metrics are means over every
    micro-batch of the step on every rank, so they do not depend on how the step is split.
    Returns the last evaluation's results."""
    gas = cfg["gradient_accumulation_steps"]
    if gas % rt.world_size != 0:
        raise UserError(f"gradient_accumulation_steps={gas} is not divisible by the world size {rt.world_size}")
    local_steps = gas // rt.world_size
    max_iters = cfg["max_iters"]
    lr_decay_iters = cfg.get("lr_decay_iters") or max_iters
    B = cfg["batch_size"]
    results, t0, tokens, iters_timed, nonfinite_run = {}, time.time(), 0, 0, 0
    for iter_num in range(max_iters + 1):
        if iter_num % cfg["eval_interval"] == 0 or iter_num == max_iters:
            results = evaluate()
            logger.log({"iter": iter_num, **results})
            if rt.master:
                print(f"eval iter {iter_num}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
            t0, tokens, iters_timed = time.time(), 0, 0  # keep eval time out of ms/iter
        if iter_num == max_iters:
            break
        lr = get_lr(iter_num, cfg["learning_rate"], cfg["min_lr"], cfg["warmup_iters"], lr_decay_iters,
                    cfg["decay_lr"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_indices = order.take(B * gas)
        sums = None
        for micro_step in range(local_steps):
            j = rt.rank * local_steps + micro_step
            batch = make_batch(step_indices[j * B:(j + 1) * B])
            if rt.ddp:  # sync gradients only on the last micro-step
                model.require_backward_grad_sync = micro_step == local_steps - 1
            with rt.autocast():
                loss, metrics = compute_loss(batch)
            (loss / local_steps).backward()
            values = torch.stack([loss.detach().float()] + [v.float() for v in metrics.values()])
            sums = values if sums is None else sums + values
            tokens += batch["n_tokens"]
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"] or float("inf"))
        if torch.isfinite(grad_norm):  # identical on every rank: the gradients were all-reduced
            optimizer.step()
            nonfinite_run = 0
        else:
            nonfinite_run += 1
            if rt.master:
                print(f"iter {iter_num}: non-finite loss or gradient, update skipped")
            if nonfinite_run >= cfg.get("max_nonfinite", 5):
                raise UserError(f"{nonfinite_run} non-finite steps in a row at iter {iter_num}: stopping "
                                "(lower learning_rate, or check the data)")
        optimizer.zero_grad(set_to_none=True)
        iters_timed += 1
        if iter_num % cfg["log_interval"] == 0 or iter_num == max_iters - 1:
            sums = all_reduce_sum(sums, rt) / (local_steps * rt.world_size)
            vals = sums.tolist()
            record = {"iter": iter_num, "loss": vals[0], **dict(zip(metrics.keys(), vals[1:])),
                      "grad_norm": grad_norm.item(), "lr": lr}
            logger.log(record)
            dt = time.time() - t0
            tok_s = tokens * rt.world_size / max(dt, 1e-9)
            if rt.master:
                print(f"iter {iter_num}: loss {vals[0]:.4f}{describe(record)}, lr {lr:.2e}, "
                      f"{dt * 1000 / iters_timed:.1f} ms/iter, {tok_s:,.0f} tok/s")
            t0, tokens, iters_timed = time.time(), 0, 0
    save(max_iters, results)
    return results
