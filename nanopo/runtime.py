"""
Set-up: where a run executes (device, dtype, its place in a DDP / FSDP job), the CPU threads, seeding, how a
step's rows split over ranks and micro-batches, and wrapping the model for training (DDP, FSDP2,
torch.compile), and the optimisation verbs (learning-rate schedule, AdamW, clipping, the finite check). sft.py and
dpo.py call these verbs; none of them runs a loop.
"""

import hashlib
import json
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from configurator import UserError
from nanopo.lora import AdaptersOff, apply_lora, lora_targets
from model import FLEX_AVAILABLE, set_grad_checkpoint


@dataclass
class Runtime:
    """Where and how this process runs: device, autocast dtype, and its place in a DDP / FSDP job."""
    device: str
    device_type: str       # 'cuda' or 'cpu', for autocast
    dtype: str             # 'float32', 'bfloat16' or 'float16'
    ddp: bool              # launched by torchrun: several processes (with DDP, or with FSDP2 when fsdp is set)
    rank: int
    local_rank: int
    world_size: int
    fsdp: bool = False     # models sharded with FSDP2: every rank must run every forward

    @property
    def master(self):
        return self.rank == 0

    def autocast(self):
        if self.dtype == "float32":
            return nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=getattr(torch, self.dtype))


SINGLE_PROCESS_CPU = Runtime("cpu", "cpu", "float32", False, 0, 0, 1)


def setup(device="auto", dtype="auto", seed=1, fsdp=False, threads=0):
    """Pick the device (torchrun's env vars mean DDP: gloo on CPU, nccl on CUDA), the CPU threads, and seed
    every RNG. All ranks use the same seed, so they build identical models; they read different rows."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device '{device}': expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{device}' asked for, but this machine has no CUDA GPU (torch sees none): "
                        "use --device=cpu or --device=auto")
    if device.startswith("mps") and not torch.backends.mps.is_available():
        raise UserError(f"device '{device}' asked for, but torch sees no Apple GPU (MPS) here: use --device=cpu")
    if device.startswith("cuda:") and int(device.split(":")[1]) >= torch.cuda.device_count():
        raise UserError(f"device '{device}' does not exist: torch sees {torch.cuda.device_count()} CUDA GPU(s)")
    rank, local_rank, world_size = 0, 0, 1
    if fsdp and not ddp:
        raise UserError("fsdp=True shards the model over several processes: launch with torchrun")
    if ddp:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        if device.startswith("cuda"):
            if local_rank >= torch.cuda.device_count():
                raise UserError(f"torchrun started a process for GPU {local_rank} of this node, but torch sees "
                                f"{torch.cuda.device_count()}: --nproc_per_node at most the number of GPUs")
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if threads:
        torch.set_num_threads(threads)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return Runtime(device, device_type, dtype, ddp, rank, local_rank, world_size, fsdp)


def all_reduce_sum(t, rt):
    """Sum a tensor over ranks in place (a no-op in one process)."""
    if rt.ddp:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def check_same_on_all_ranks(rows, rt):
    """Under DDP every rank builds its own copy of the training rows (the same seed, the same weights): make sure
    they are the same rows everywhere, or stop with one line. A no-op in one process."""
    if not rt.ddp:
        return
    digest = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()
    digests = [None] * rt.world_size
    dist.all_gather_object(digests, digest)
    if len(set(digests)) > 1:
        raise UserError("the ranks built different training rows (sampling is not reproducible across processes "
                        "here): run in one process")


def cleanup(rt, exit_code=0):
    """The last call of a script: under DDP / FSDP, leave the process group and end the process (with
    `exit_code`; in one process the script's own end, or sys.exit, sets it)."""
    if rt.ddp:
        # wait for rank 0's last checkpoint write: a rank that tears gloo down while another still uses it can
        # abort at exit ("terminate called without an active exception")
        dist.barrier()
        dist.destroy_process_group()
        # Then leave at once, skipping the interpreter's teardown: on a loaded machine a process could still
        # abort the same way *after* destroy_process_group, while Python freed the (FSDP-sharded) models at
        # exit -- 4 of 40 two-process FSDP runs did, 0 of 40 with this exit. Everything is written and closed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)


class RunningMean:
    """The mean of every value seen so far, over all ranks: BCO's reward shift delta (Jung et al. 2024 keep
    it as a running average of the rewards; dpo.py's compute_loss updates it). Under DDP / FSDP the ranks'
    sums and counts are added first, so every rank holds the same mean. Kept in Python floats (float64) and
    saved in checkpoints under `name`, so a resumed run continues it."""

    def __init__(self, name):
        self.name = name
        self.total = 0.0
        self.count = 0

    def update(self, values, rt=None):
        """Add a batch of values (summed over all ranks) to the running mean."""
        count = torch.tensor(float(values.numel()), dtype=torch.float64, device=values.device)
        totals = torch.stack([values.detach().double().sum(), count])
        if rt is not None:
            totals = all_reduce_sum(totals, rt)
        self.total += totals[0].item()
        self.count += int(totals[1].item())

    @property
    def mean(self):
        if self.count == 0:
            return 0.0
        return self.total / self.count

    def state_dict(self):
        """{name: its sums} for a checkpoint, or {} while nothing has been seen."""
        if self.count == 0:
            return {}
        return {self.name: {"total": self.total, "count": self.count}}

    def load_state_dict(self, ckpt):
        """Continue from a checkpoint's sums, when it has them."""
        if self.name in ckpt:
            self.total = ckpt[self.name]["total"]
            self.count = ckpt[self.name]["count"]


# -----------------------------------------------------------------------------------------------------------
# A step's rows over ranks and micro-batches

def micro_batches(batch_size, gas, world_size):
    """How a step of batch_size x gas rows splits over the ranks: (micro-steps per rank, rows per micro-step).
    gas counts micro-batches over all ranks, so the global batch is the same at any world size: with gas a
    multiple of the world size each rank runs gas / world_size micro-batches of batch_size rows; otherwise each
    of the gas micro-batches is shared out, batch_size / world_size rows per rank."""
    if gas % world_size == 0:
        return gas // world_size, batch_size
    if batch_size % world_size == 0:
        return gas, batch_size // world_size
    raise UserError(f"batch_size={batch_size} x gradient_accumulation_steps={gas} cannot be split evenly over "
                    f"{world_size} processes: make one of them a multiple of {world_size}")


def my_micro_batches(step_indices, batch_size, gas, rt):
    """This rank's contiguous share of a step's row indices (the same list on every rank), as its micro-batches:
    a list of index lists, equally long."""
    local_steps, micro = micro_batches(batch_size, gas, rt.world_size)
    mine = step_indices[rt.rank * local_steps * micro:(rt.rank + 1) * local_steps * micro]
    return [mine[k * micro:(k + 1) * micro] for k in range(local_steps)]


def sync_gradients(model, rt, sync):
    """Whether the next backward synchronises gradients over ranks: only a step's last micro-batch needs to
    (DDP all-reduces, FSDP2 reduce-scatters); the earlier ones accumulate locally. A no-op in one process."""
    if rt.fsdp:
        unwrap(model).set_requires_gradient_sync(sync)
    elif rt.ddp:
        model.require_backward_grad_sync = sync


# -----------------------------------------------------------------------------------------------------------
# Wrapping: DDP, FSDP2, torch.compile

def unwrap(model):
    """The plain GPT inside DDP(...) and/or torch.compile(...)."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def shard(model):
    """FSDP2: each transformer block, then the whole model, keeps 1/world_size of its parameters per rank and
    all-gathers them just for its forward and backward. Modifies `model` in place (its parameters become
    DTensors), so build the optimizer after this."""
    from torch.distributed.fsdp import fully_shard
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)  # the embeddings, ln_f and the tied lm_head
    return model


def prepare_model(model, cfg, rt):
    """What the run trains, set before any wrapping: with cfg['lora_rank'] > 0 only LoRA adapters (lora.py) on
    cfg['lora_targets'] of every block, the rest frozen; with cfg['grad_checkpoint'] activation checkpointing
    per block (model.Block). Prints what trains. In place; returns the model."""
    if cfg["lora_rank"]:
        apply_lora(model, cfg["lora_rank"], cfg["lora_alpha"], cfg["lora_dropout"], lora_targets(cfg["lora_targets"]))
    set_grad_checkpoint(model, cfg["grad_checkpoint"])
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if rt.master and (cfg["lora_rank"] or cfg["grad_checkpoint"]):
        lora = f"LoRA rank {cfg['lora_rank']} on {cfg['lora_targets']}, " if cfg["lora_rank"] else ""
        print(f"{lora}{trained:,} of {sum(p.numel() for p in model.parameters()):,} parameters trained"
              + (f"; activation checkpointing per block{' (selective)' * (cfg['grad_checkpoint'] == 'selective')}"
                 if cfg["grad_checkpoint"] else ""))
    return model


def wrap_policy(model, rt, compile_model):
    """FSDP2-shard or DDP-wrap the model being trained, and torch.compile it (optional); returns the wrapper to
    call in training. The plain `model` stays usable for evaluation, generation and saving (they share
    parameters)."""
    if rt.fsdp:
        shard(model)
        return torch.compile(model, dynamic=False) if compile_model else model
    wrapper = torch.compile(model, dynamic=False) if compile_model else model
    if rt.ddp:
        wrapper = torch.nn.parallel.DistributedDataParallel(
            wrapper, device_ids=[rt.local_rank] if rt.device_type == "cuda" else None)
    return wrapper


def wrap_reference(model, rt, compile_model):
    """The frozen reference for training: never DDP-wrapped (it has no gradients to synchronise), sharded under
    FSDP2 (the point of FSDP is two models that do not fit one GPU), compiled on its own (it only ever runs
    forward under no_grad). None stays None (no reference). LoRA's reference (lora.AdaptersOff) is the plain
    policy, never its DDP wrapper, and compiled on its own too (one graph with the adapters off)."""
    if model is None:
        return None
    if isinstance(model, AdaptersOff):  # LoRA: the policy itself (sharded already), with its adapters off
        return AdaptersOff(torch.compile(model.model, dynamic=False)) if compile_model else model
    if rt.fsdp:
        shard(model)
    return torch.compile(model, dynamic=False) if compile_model else model


def compiled_graphs():
    """How many graphs torch.compile has built in this process (a new batch shape would add one)."""
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


def grad_scaler(rt):
    """fp16 autocast needs loss scaling to keep small gradients from flushing to zero; bf16 and fp32 do not."""
    return torch.amp.GradScaler(rt.device_type, enabled=rt.dtype == "float16")


def use_flex_attention(attention, masked_rows, rt, dropout=0.0):
    """Whether prefix-shared or packed rows (masked_rows: the run has some) use FlexAttention (a fused kernel
    that skips masked blocks: CUDA only, as torch 2.13 has no FlexAttention backward on a CPU) or SDPA (with a
    boolean mask for prefix-shared rows; for packed ones model.Segments, segments of similar length at a time).
    attention: 'auto' (flex on CUDA), 'flex' or 'sdpa'. FlexAttention has no attention dropout, so with
    dropout > 0 'auto' keeps SDPA and 'flex' is an error."""
    if attention not in ("auto", "flex", "sdpa"):
        raise UserError(f"unknown attention '{attention}': expected 'auto', 'flex' or 'sdpa'")
    if attention == "flex" and (not FLEX_AVAILABLE or rt.device_type != "cuda"):
        raise UserError("attention='flex' needs a CUDA GPU and torch >= 2.5 (FlexAttention has no backward on a CPU)")
    if attention == "flex" and dropout > 0:
        raise UserError(f"attention='flex' with dropout={dropout}: FlexAttention has no attention dropout; use "
                        "--attention=sdpa or --dropout=0")
    return (masked_rows and FLEX_AVAILABLE and rt.device_type == "cuda" and attention in ("auto", "flex")
            and dropout == 0)


# -----------------------------------------------------------------------------------------------------------
# Optimisation: the learning-rate schedule, AdamW, gradient clipping, the all-rank finite check

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


# -----------------------------------------------------------------------------------------------------------
# Stopping on a signal: SIGTERM (a scheduler's or a spot machine's notice) or Ctrl-C

# The exit code of a run that saved a checkpoint and stopped on a signal: EX_TEMPFAIL from sysexits.h,
# "a temporary failure, run again", so a job script can tell it from success (0), bad input (1) and a
# crash, and requeue the job with --init_from=resume. (Under torchrun, torchrun's own code is 1.)
STOPPED_EXIT_CODE = 75
# Under torchrun, torchrun passes the Ctrl-C its workers already got from the terminal on to them: a
# second SIGINT this soon after the first is that copy, not a second press.
SAME_PRESS_SECONDS = 1.0


class StopOnSignal:
    """SIGTERM, or a first Ctrl-C (SIGINT), asks the run to stop at the next step boundary rather than
    die mid-step: the loop asks stop_requested() after each step, saves a checkpoint there and calls
    exit(). A second Ctrl-C stops at once (KeyboardInterrupt). Every rank asks, and they agree: a
    signal that reached any rank stops all of them after the same step. Clusters send SIGKILL a grace
    period after SIGTERM (torchrun: 30 s), so what follows the signal must fit in it: the rest of the
    step (with an evaluation, if one is due), the save and closing the trackers."""

    def __init__(self, rt):
        self.received = None   # the first signal's name, 'SIGTERM' or 'SIGINT'
        self.first_at = 0.0    # and when it came (time.monotonic)
        self.same_press = SAME_PRESS_SECONDS if rt.ddp else 0.0
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        now = time.monotonic()
        if self.received is None:
            self.received, self.first_at = signal.Signals(signum).name, now
        elif signum == signal.SIGINT and now - self.first_at > self.same_press:
            raise KeyboardInterrupt("a second Ctrl-C: stopped at once; checkpoints written "
                                    "earlier, if any, are kept")

    def stop_requested(self, rt):
        """Whether any rank got a signal (a collective under DDP: every rank must call it)."""
        flag = torch.tensor([float(self.received is not None)], device=rt.device)
        return all_reduce_sum(flag, rt).item() > 0

    def exit(self, rt, it, max_iters, path):
        """After the checkpoint of iteration `it` is saved at `path`: one line, then exit with
        STOPPED_EXIT_CODE on every rank."""
        if rt.master:
            # a rank that got no signal itself learnt of it from another
            name = self.received or "a signal to another rank"
            print(f"stopped by {name} at iter {it}/{max_iters}: saved {path}; run the same command "
                  "with --init_from=resume to continue", flush=True)
        if rt.ddp:
            cleanup(rt, STOPPED_EXIT_CODE)
        sys.exit(STOPPED_EXIT_CODE)
