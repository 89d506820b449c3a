"""
The machinery sft.py and dpo.py share, written once: device / DDP set-up, the LR schedule, the optimizer,
checkpoint save and load, metric logging, task evaluation and the training loop itself. Each script keeps what
makes it different (its data and its loss) and reads top to bottom like nanoGPT's train.py.
"""

import glob
import json
import math
import os
import random
import re
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist

import configurator
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
# Config checks: a value that makes no sense stops the run before any work, with one line naming it

_CONFIG_RULES = {  # key: (holds for a sensible value, what the line says is expected)
    "batch_size": (lambda v: v >= 1, ">= 1"),
    "gradient_accumulation_steps": (lambda v: v >= 1, ">= 1"),
    "max_iters": (lambda v: v >= 0, ">= 0"),
    "learning_rate": (lambda v: v > 0, "> 0"),
    "min_lr": (lambda v: v >= 0, ">= 0"),
    "warmup_iters": (lambda v: v >= 0, ">= 0"),
    "lr_decay_iters": (lambda v: v >= 0, ">= 0 (0 = max_iters)"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "beta1": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "beta2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "grad_clip": (lambda v: v >= 0, ">= 0 (0 = no clipping)"),
    "eval_interval": (lambda v: v >= 1, ">= 1"),
    "log_interval": (lambda v: v >= 1, ">= 1"),
    "checkpoint_interval": (lambda v: v >= 0, ">= 0 (0 = only at the end)"),
    "keep_last": (lambda v: v >= 1, ">= 1"),
    "max_nonfinite": (lambda v: v >= 1, ">= 1"),
    "block_size": (lambda v: v >= 2, ">= 2"),
    "n_layer": (lambda v: v >= 1, ">= 1"),
    "n_head": (lambda v: v >= 1, ">= 1"),
    "n_embd": (lambda v: v >= 1, ">= 1"),
    "dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "n_digits": (lambda v: v >= 1, ">= 1"),
    "n_eval": (lambda v: v >= 1, ">= 1"),
    "slip_prob": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "beta": (lambda v: v > 0, "> 0"),
    "label_smoothing": (lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
    "desirable_weight": (lambda v: v > 0, "> 0"),
    "undesirable_weight": (lambda v: v > 0, "> 0"),
    "rpo_alpha": (lambda v: v >= 0, ">= 0"),
    "n_pairs": (lambda v: v >= 1, ">= 1"),
    "n_samples": (lambda v: v >= 0, ">= 0"),
    "sample_temperature": (lambda v: v >= 0, ">= 0"),
    "dtype": (lambda v: v in ("auto", "float32", "bfloat16", "float16"), "'auto', 'float32', 'bfloat16' or 'float16'"),
}


def check_config(cfg):
    """Check the settings a script has (rules only for keys present) right after apply_overrides; a NaN fails
    every rule, since every comparison with it is False."""
    for key, (ok, expected) in _CONFIG_RULES.items():
        if key in cfg and cfg[key] is not None and not ok(cfg[key]):
            raise UserError(f"{key}={cfg[key]!r} makes no sense: expected {expected}")
    if cfg.get("n_head", 0) >= 1 and cfg.get("n_embd", 0) % cfg.get("n_head", 1) != 0:
        raise UserError(f"n_embd={cfg['n_embd']} is not divisible by n_head={cfg['n_head']}")
    if "compile" in cfg and cfg["compile"] not in (None, True, False):
        raise UserError(f"compile={cfg['compile']!r} makes no sense: expected True, False or None (on with CUDA)")
    world_size = int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun; checked before any process group exists
    gas, B = cfg.get("gradient_accumulation_steps", 1), cfg.get("batch_size", 1)
    if isinstance(gas, int) and isinstance(B, int) and gas >= 1 and B >= 1:
        micro_batches(B, gas, world_size)  # raises when the step cannot be split evenly over the ranks


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


# -----------------------------------------------------------------------------------------------------------
# Device, precision, DDP

@dataclass
class Runtime:
    """Where and how this process runs: device, autocast dtype, and its place in a DDP / FSDP job."""
    device: str
    device_type: str       # 'cuda' or 'cpu', for autocast
    dtype: str             # 'float32', 'bfloat16' or 'float16'
    ddp: bool
    rank: int
    local_rank: int
    world_size: int
    fsdp: bool = False     # models sharded with FSDP2: every rank must run every forward (see evaluate_task)

    @property
    def master(self):
        return self.rank == 0

    def autocast(self):
        if self.dtype == "float32":
            return nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=getattr(torch, self.dtype))


def setup_runtime(device="auto", dtype="auto", seed=1, fsdp=False):
    """Pick the device (torchrun's env vars mean DDP: gloo on CPU, nccl on CUDA) and seed every RNG.
    All ranks use the same seed, so they build identical models; they read different data slices."""
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
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return Runtime(device, device_type, dtype, ddp, rank, local_rank, world_size, fsdp)


def all_reduce_sum(t, rt):
    """Sum a tensor over ranks in place (a no-op in one process)."""
    if rt.ddp:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def cleanup(rt):
    """The last call of a script: under DDP / FSDP, leave the process group and end the process."""
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
        os._exit(0)


def shard(model):
    """FSDP2: each transformer block, then the whole model, keeps 1/world_size of its parameters per rank and
    all-gathers them just for its forward and backward. Modifies `model` in place (its parameters become
    DTensors), so build the optimizer after this."""
    from torch.distributed.fsdp import fully_shard
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)  # the embeddings, ln_f and the tied lm_head
    return model


def prepare_for_training(model, rt, compile_model):
    """FSDP2-shard or DDP-wrap the model being trained, and torch.compile it (optional); returns the module to
    call in training. The plain `model` stays usable for evaluation, generation and saving (they share
    parameters). Under DDP only this model is wrapped: a reference has no gradients to synchronise."""
    if rt.fsdp:
        shard(model)
        return torch.compile(model, dynamic=False) if compile_model else model
    train_model = torch.compile(model, dynamic=False) if compile_model else model
    if rt.ddp:
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[rt.local_rank] if rt.device_type == "cuda" else None)
    return train_model


def padded_length(T, block_size, compile_model, multiple=16):
    """With torch.compile, pad every batch up to a multiple of 16 tokens (at most block_size) so a handful of
    shapes are compiled once each instead of one graph per new batch length. Without it, no padding."""
    if not compile_model:
        return T
    return min(block_size, -(-T // multiple) * multiple)


def compiled_graphs():
    """How many graphs torch.compile has built in this process (a new batch shape would add one)."""
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


def grad_scaler(rt):
    """fp16 autocast needs loss scaling to keep small gradients from flushing to zero; bf16 and fp32 do not."""
    return torch.amp.GradScaler(rt.device_type, enabled=rt.dtype == "float16")


# -----------------------------------------------------------------------------------------------------------
# Peak FLOP/s, for MFU

GPU_PEAK_BF16 = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12), ("L4", 121e12),
                 ("RTX 4090", 165e12)]  # dense bf16 tensor-core peaks per GPU (vendor data sheets)


def measure_matmul_flops(dtype=torch.float32, sizes=(1024, 1536, 2048), repeats=8):
    """The best FLOP/s of square torch.mm over a few sizes (best of `repeats` timings each): the CPU's
    practical peak for the dtype, measured with the threads and allocator this run uses. Returns it twice:
    by wall time, and by CPU time per thread (which other processes on a busy machine do not inflate)."""
    best_wall, best_cpu = 0.0, 0.0
    g = torch.Generator().manual_seed(0)  # its own generator: a run's (possibly restored) RNG stream is untouched
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype, generator=g), torch.randn(n, n, dtype=dtype, generator=g)
        c = torch.mm(a, b)  # warm-up
        for _ in range(repeats):
            c0, t0 = time.process_time(), time.perf_counter()
            torch.mm(a, b, out=c)
            wall, cpu = time.perf_counter() - t0, (time.process_time() - c0) / torch.get_num_threads()
            best_wall, best_cpu = max(best_wall, 2 * n ** 3 / wall), max(best_cpu, 2 * n ** 3 / max(cpu, 1e-9))
    return best_wall, best_cpu


def peak_flops(rt, sizes=(1024,), repeats=4):
    """(peak FLOP/s or None, peak by CPU time or None, where it comes from): on CUDA the bf16 table above, on a
    CPU the float32 matmul rate measured now (a fraction of a second with the default sizes)."""
    if rt.device_type == "cuda":
        name = torch.cuda.get_device_name()
        for key, flops in GPU_PEAK_BF16:
            if key in name:
                note = f"{name}: dense bf16 peak from the table"
                if rt.dtype != "bfloat16":
                    note += f" (this run uses {rt.dtype}: MFU is against the bf16 peak)"
                return flops, None, note
        return None, None, f"{name}: not in the peak table, no MFU (add it to GPU_PEAK_BF16)"
    if rt.device_type == "cpu":
        return (*measure_matmul_flops(sizes=sizes, repeats=repeats),
                f"CPU: measured float32 torch.mm rate (best of {'..'.join(map(str, sizes))} squares)")
    return None, None, f"{rt.device_type}: no peak known, no MFU"


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
    decayed, as in nanoGPT. Fused kernels on CUDA and CPU."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # fused: one kernel for the whole update instead of a Python loop over tensors (~3x faster on a CPU);
    # FSDP2's sharded (DTensor) parameters take the default implementation
    sharded = any(type(p).__name__ == "DTensor" for p in params)
    extra = {"fused": True} if device_type in ("cuda", "cpu") and not sharded else {}
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **extra)


# -----------------------------------------------------------------------------------------------------------
# Checkpoints

def unwrap(model):
    """The plain GPT inside DDP(...) and/or torch.compile(...)."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def full_state_dict(model, rt):
    """The model's complete weights on every rank: FSDP2 gathers its shards (a collective every rank must
    join), otherwise the plain state_dict."""
    if not rt.fsdp:
        return unwrap(model).state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(unwrap(model), options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_checkpoint(path, model, config, tokenizer, model_state=None, **extra):
    """Write a checkpoint atomically: a temporary file in the same folder, flushed to disk, then os.replace, so
    an interrupted write never leaves a half-written ckpt.pt behind. Holds the model's weights and shape, the
    run's config, the tokenizer's name and the format version, plus whatever the caller adds (iter_num,
    optimizer state, data position, ...)."""
    raw = unwrap(model)
    model_state = raw.state_dict() if model_state is None else model_state
    for name, p in model_state.items():
        if not torch.isfinite(p).all():
            raise UserError(f"refusing to save {path}: parameter '{name}' is not finite")
    ckpt = {"format_version": CHECKPOINT_FORMAT, "model": model_state, "model_args": asdict(raw.config),
            "config": config, "tokenizer": tokenizer, **extra}
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    for stale in glob.glob(glob.escape(path) + ".tmp.*"):  # left by a run killed mid-write: never a checkpoint
        os.remove(stale)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path, tokenizer=None, missing_hint="run sft.py first, or pass --sft_ckpt=..."):
    """Load a checkpoint onto the CPU (weights_only: a checkpoint cannot run code). Checks the format and, when
    `tokenizer` is given, that the checkpoint was trained with it. missing_hint: what to do when there is none."""
    if not os.path.exists(path):
        raise UserError(f"checkpoint {path} does not exist ({missing_hint})")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # cut short, empty, or not a torch file at all (some errors have no message)
        detail = (str(e).strip().splitlines() or [""])[0][:120]
        raise UserError(f"checkpoint {path} could not be read: empty, cut short or not a checkpoint "
                        f"({type(e).__name__}: {detail})")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise UserError(f"checkpoint {path} is not a checkpoint of this code (no 'model'/'model_args')")
    if ckpt.get("format_version") != CHECKPOINT_FORMAT:
        raise UserError(f"checkpoint {path} has format {ckpt.get('format_version')}, expected {CHECKPOINT_FORMAT}")
    if tokenizer is not None and ckpt.get("tokenizer") != tokenizer:
        raise UserError(f"checkpoint {path} was trained with tokenizer '{ckpt.get('tokenizer')}', "
                        f"this run uses '{tokenizer}'")
    return ckpt


def load_run_checkpoint(out_dir):
    """(path, contents) of the checkpoint of the run in out_dir, which --init_from=resume continues."""
    path = os.path.join(out_dir, "ckpt.pt")
    return path, load_checkpoint(path, missing_hint="nothing to resume: --out_dir must be the folder of the run "
                                                    "to continue")


def keep_checkpoint_settings(config, values, path):
    """A resumed run keeps what its checkpoint was trained with (model shape, tokenizer, ...), as nanoGPT does:
    `values` {key: the checkpoint's value} go into `config`, unless the command line or a config file set one
    of them to something else, which is an error. Returns `values`."""
    for key, value in values.items():
        if key in configurator.overridden and configurator.overridden[key] != value:
            raise UserError(f"{path} has {key}={value!r}, but this run sets {key}="
                            f"{configurator.overridden[key]!r}: a resumed run keeps its checkpoint's")
        config[key] = value
    return values


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
    fresh file; a resumed run keeps the records from before its checkpoint (iter < start_iter) and drops any
    logged after it, so the file reads as one uninterrupted run. The schema is in the README."""

    def __init__(self, out_dir, rt, start_iter=0):
        self.rt = rt
        self.path = os.path.join(out_dir, "metrics.jsonl")
        if rt.master:
            os.makedirs(out_dir, exist_ok=True)
            kept = []
            if start_iter > 0 and os.path.exists(self.path):
                with open(self.path) as f:
                    for line in f:
                        try:
                            record = json.loads(line)
                        except json.JSONDecodeError:
                            continue  # a line cut short by a kill
                        if record.get("iter", 0) < start_iter:
                            kept.append(line if line.endswith("\n") else line + "\n")
            with open(self.path, "w") as f:
                f.writelines(kept)

    def log(self, record):
        if self.rt.master:
            # a skipped non-finite step logs null, not NaN: strict JSON readers reject NaN
            record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


@torch.no_grad()
def evaluate_task(model, task, tok, rt, batch_size=500):
    """Held-out exact-match accuracy (0-1) of greedy completions of task.eval_prompts, checked by
    task.is_correct. Under DDP each rank takes every world_size-th prompt and the counts are summed, so no
    rank waits on another's share. Under FSDP2 every forward is a collective, so every rank generates for every
    prompt instead (identical weights and inputs give identical outputs and the same number of steps)."""
    raw = unwrap(model)
    was_training = raw.training
    raw.eval()
    rank, world = (0, 1) if rt.fsdp else (rt.rank, rt.world_size)
    prompts = task.eval_prompts[rank::world]
    correct = 0
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        with rt.autocast():
            outs = raw.generate([tok.encode(p) for p in chunk], task.max_new_tokens, tok.eos_id, tok.pad_id)
        correct += sum(task.is_correct(p, tok.decode(o)) for p, o in zip(chunk, outs))
    counts = torch.tensor([correct, len(prompts)], dtype=torch.float64, device=rt.device)
    if not rt.fsdp:
        counts = all_reduce_sum(counts, rt)
    raw.train(was_training)
    return (counts[0] / counts[1]).item()


@torch.no_grad()
def evaluate_loss(model, compute_loss, make_batch, data, batch_size, rt, loss_weight=None):
    """Held-out loss and metrics: the script's own compute_loss over every row of `data` (dropout off), named
    eval_<name> (TRL's eval_loss, eval_rewards/accuracies, ...): batch means weighted by rows, or by
    loss_weight(indices, data) (see train_loop), so they do not depend on batch_size. Every rank computes the
    whole (small) held-out set, so there is no collective that a rank could miss."""
    raw = unwrap(model)
    was_training = raw.training
    raw.eval()
    totals, names = None, None
    starts = list(range(0, len(data), batch_size))
    if len(starts) > 1 and len(data) - starts[-1] == 1:
        starts.pop()  # no batch of one row: it joins the one before (KTO's KL estimate needs two rows)
    weight = loss_weight or (lambda indices, data: len(indices))
    for start, end in zip(starts, starts[1:] + [len(data)]):
        indices = list(range(start, end))
        with rt.autocast():
            loss, metrics = compute_loss(make_batch(indices, data))
        values = torch.stack([loss.float()] + [v.float() for v in metrics.values()]) * weight(indices, data)
        totals, names = (values if totals is None else totals + values), ["loss", *metrics]
    raw.train(was_training)
    total_weight = weight(list(range(len(data))), data)
    return {f"eval_{k}": v / total_weight for k, v in zip(names, totals.tolist())}


def peak_rss_mb():
    """This process's peak resident memory in MB (Linux reports ru_maxrss in KiB, macOS in bytes)."""
    import resource
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1 << 20) if sys.platform == "darwin" else rss / 1024


def summary(results):
    """One readable fragment of evaluation results for a script's last line."""
    if not results:
        return "no held-out evaluation (no checkable task; held-out rows come from --eval_dataset or --eval_split)"
    return "held-out " + ", ".join(f"{k} {v:.1%}" if k == "task_accuracy" else f"{k} {v:.4f}"
                                   for k, v in results.items())


# -----------------------------------------------------------------------------------------------------------
# Training state: what a checkpoint needs beyond the weights to continue a run exactly

def rng_state():
    """Every RNG a run draws from (torch, numpy, python, CUDA), as torch.load(weights_only=True) accepts it."""
    state = {"torch": torch.get_rng_state(), "numpy": _numpy_state(), "python": _python_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state():
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def _python_state():
    version, internal, gauss = random.getstate()
    return {"version": version, "internal": list(internal), "gauss": gauss}


def set_rng_state(state):
    """Restore what rng_state() saved."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resume_state(ckpt, model, optimizer, order, scaler=None, path="checkpoint", rt=None):
    """Load a training checkpoint's weights, optimizer, data position and RNG into a freshly built run;
    returns the iteration to continue from. Call it last, just before train_loop, so nothing set up after it
    draws from the restored RNGs."""
    for key in ("optimizer", "iter_num", "data_order", "rng"):
        if key not in ckpt:
            raise UserError(f"{path} cannot be resumed: it has no '{key}' (was it written by an older version?)")
    if rt is not None and rt.fsdp:  # full tensors in the file; each rank keeps its shards
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)
        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(unwrap(model), ckpt["model"], options=options)
        set_optimizer_state_dict(unwrap(model), optimizer, ckpt["optimizer"], options=options)
    else:
        load_state_strict(unwrap(model), ckpt["model"], path)
        optimizer.load_state_dict(ckpt["optimizer"])
    order.load_state_dict(ckpt["data_order"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    per_rank = ckpt.get("rng_per_rank")  # DDP: each rank continues its own stream (same world size only)
    own = rt is not None and rt.ddp and per_rank is not None and len(per_rank) == rt.world_size
    set_rng_state(per_rank[rt.rank] if own else ckpt["rng"])
    return ckpt["iter_num"]


def save_training_checkpoint(cfg, iter_num, model, optimizer, order, scaler, tokenizer, results, extra, rt=None):
    """Rank 0 writes out_dir/ckpt.pt, which always holds the newest checkpoint; with keep_last > 1 the newest K
    are also kept as ckpt_<iter>.pt (hard links, so no second copy is written). Every rank calls this: under
    FSDP2 the full weights and optimizer state are gathered from all of them."""
    rt = rt or Runtime("cpu", "cpu", "float32", False, 0, 0, 1)  # a single process
    model_state, optim_state = full_state_dict(model, rt), optimizer.state_dict()
    rng_per_rank = None
    if rt.ddp:  # the ranks' RNG streams differ (dropout draws as many numbers as a rank's batch has elements)
        rng_per_rank = [None] * rt.world_size
        dist.all_gather_object(rng_per_rank, rng_state())
    if rt.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        optim_state = get_optimizer_state_dict(unwrap(model), optimizer,
                                               options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not rt.master:
        return
    out_dir = cfg["out_dir"]
    path = os.path.join(out_dir, "ckpt.pt")
    state = dict(iter_num=iter_num, optimizer=optim_state, data_order=order.state_dict(),
                 rng=rng_state(), rng_per_rank=rng_per_rank,
                 scaler=scaler.state_dict() if scaler.is_enabled() else None, **results, **extra)
    save_checkpoint(path, model, cfg, tokenizer, model_state=model_state, **state)
    keep = cfg.get("keep_last", 1)
    if keep > 1:
        numbered = os.path.join(out_dir, f"ckpt_{iter_num:07d}.pt")
        if os.path.exists(numbered):
            os.remove(numbered)
        try:
            os.link(path, numbered)
        except OSError:  # a filesystem without hard links: a second copy
            shutil.copyfile(path, numbered)
        # by iteration, as numbers; ones past this iteration are another timeline's (an earlier, longer run in
        # this out_dir, or the future of a checkpoint resumed from), never this run's newest
        found = {}
        for f in os.listdir(out_dir):
            m = re.fullmatch(r"ckpt_(\d+)\.pt", f)
            if m:
                found[int(m.group(1))] = f
        stale = [i for i in found if i > iter_num] + sorted(i for i in found if i <= iter_num)[:-keep]
        for i in stale:
            os.remove(os.path.join(out_dir, found[i]))


# -----------------------------------------------------------------------------------------------------------
# The training loop

def train_loop(rt, model, optimizer, cfg, order, make_batch, compute_loss, evaluate, describe, tokenizer,
               start_iter=0, scaler=None, ckpt_extra=None, nonfinite_skipped=0, loss_weight=None):
    """Run optimizer steps start_iter .. cfg['max_iters']-1, then write the final checkpoint.
    Each step takes batch_size * gradient_accumulation_steps row indices from `order` (a data.BatchOrder, the
    same on every rank); rank r runs its own contiguous share of them in equal micro-batches (micro_batches), so
    the global batch is the same whatever the world size.
    make_batch(indices) -> batch (whatever compute_loss takes, with an int 'n_tokens' and optionally 'flops',
    the step's model FLOPs, for the MFU on stdout);
    compute_loss(batch) -> (loss, {metric name: scalar tensor}); evaluate() -> {name: float};
    describe(record) -> the script's part of the stdout line.
    loss_weight(indices) -> how many units compute_loss's loss is a mean over for those rows (SFT: target
    tokens), when that varies from row to row: each micro-batch then counts by its share of the step's units, so
    the step's loss is the mean over all of them however the step is split. None: rows (DPO's per-pair means).
    Evaluates at iter 0, every eval_interval and after the last step; checkpoints every checkpoint_interval
    iters (and at every eval with always_save_checkpoint) and at the end. Logged metrics are means over every
    micro-batch of the step on every rank, so they do not depend on how the step is split. A step whose loss
    or gradient norm is not finite is skipped on every rank (the decision is taken on all-reduced values),
    counted, and max_nonfinite of them in a row stop the run. Returns the last evaluation's results."""
    gas, B, max_iters = cfg["gradient_accumulation_steps"], cfg["batch_size"], cfg["max_iters"]
    if start_iter > max_iters:  # would overwrite the newer checkpoint with one labelled max_iters
        raise UserError(f"the checkpoint is at iter {start_iter}, past max_iters={max_iters}: pass "
                        f"--max_iters={start_iter} or more to continue it")
    local_steps, micro = micro_batches(B, gas, rt.world_size)
    lr_decay_iters = cfg.get("lr_decay_iters") or max_iters
    scaler = scaler or torch.amp.GradScaler(enabled=False)
    logger = MetricLogger(cfg["out_dir"], rt, start_iter)
    peak = peak_flops(rt)[0] if rt.master else None  # for the MFU on stdout, as nanoGPT prints it
    results, t0, tokens, flops, iters_timed, nonfinite_run = {}, time.time(), 0, 0.0, 0, 0
    nonfinite_total = nonfinite_skipped  # carried over from the checkpoint a resumed run starts from

    def checkpoint(iter_num):
        save_training_checkpoint(cfg, iter_num, model, optimizer, order, scaler, tokenizer, results,
                                 dict(ckpt_extra or {}, nonfinite_skipped=nonfinite_total), rt)

    for iter_num in range(start_iter, max_iters + 1):
        is_eval = iter_num % cfg["eval_interval"] == 0 or iter_num == max_iters
        if is_eval:
            results = evaluate()
            if results:  # (nothing to evaluate without a task or held-out rows)
                logger.log({"iter": iter_num, **results})
                if rt.master:
                    print(f"eval iter {iter_num}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
        if iter_num == max_iters:
            break
        interval = cfg.get("checkpoint_interval", 0)
        if iter_num > start_iter and ((interval and iter_num % interval == 0)
                                      or (is_eval and cfg.get("always_save_checkpoint"))):
            checkpoint(iter_num)
        if is_eval:
            t0, tokens, flops, iters_timed = time.time(), 0, 0.0, 0  # keep eval and checkpoint time out of ms/iter
        lr = get_lr(iter_num, cfg["learning_rate"], cfg["min_lr"], cfg["warmup_iters"], lr_decay_iters,
                    cfg["decay_lr"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_indices = order.take(B * gas)
        mine = step_indices[rt.rank * local_steps * micro:(rt.rank + 1) * local_steps * micro]  # this rank's slice
        step_units = max(loss_weight(step_indices), 1e-9) if loss_weight else None  # every rank knows them all
        sums = None
        for micro_step in range(local_steps):
            indices = mine[micro_step * micro:(micro_step + 1) * micro]
            batch = make_batch(indices)
            # this micro-batch's share of the step's units, times the number of micro-batches on all ranks (the
            # mean over micro-batches divides by it again): 1 when every micro-batch has as many units
            scale = loss_weight(indices) / step_units * local_steps * rt.world_size if loss_weight else 1.0
            if rt.fsdp:  # reduce-scatter gradients only on the last micro-step
                unwrap(model).set_requires_gradient_sync(micro_step == local_steps - 1)
            elif rt.ddp:  # all-reduce gradients only on the last micro-step
                model.require_backward_grad_sync = micro_step == local_steps - 1
            with rt.autocast():
                loss, metrics = compute_loss(batch)
            scaler.scale(loss * scale / local_steps).backward()
            values = torch.stack([loss.detach().float()] + [v.float() for v in metrics.values()]) * scale
            sums = values if sums is None else sums + values
            tokens += batch["n_tokens"]
            flops += batch.get("flops", 0.0)
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"] or float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: the norm over every rank's shards, as a DTensor
            grad_norm = grad_norm.full_tensor()
        # one decision for every rank: losses are all-reduced here, gradients already were by DDP
        loss_sum = all_reduce_sum(sums[:1].clone(), rt)
        finite = bool(torch.isfinite(loss_sum).all() and (scaler.is_enabled() or torch.isfinite(grad_norm)))
        if finite:
            scaler.step(optimizer)  # with fp16, GradScaler itself skips steps whose gradients overflowed
            nonfinite_run = 0
        else:
            nonfinite_run += 1
            nonfinite_total += 1
            if rt.master:
                print(f"iter {iter_num}: non-finite loss or gradient norm, update skipped ({nonfinite_total} so far)")
            if nonfinite_run >= cfg.get("max_nonfinite", 5):
                raise UserError(f"{nonfinite_run} non-finite steps in a row at iter {iter_num}: stopping "
                                "(lower learning_rate, or check the data); the last checkpoint is intact")
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        iters_timed += 1
        if cfg.get("compile") and iter_num == start_iter:  # the first step pays for compilation: say so once
            graphs_after_warmup = compiled_graphs()
            if rt.master:
                print(f"torch.compile: first step took {time.time() - t0:.1f} s ({graphs_after_warmup} graphs)")
        if iter_num % cfg["log_interval"] == 0 or iter_num == max_iters - 1:
            # metric means over every micro-batch on every rank, and the step's tokens over all ranks
            totals = all_reduce_sum(torch.cat([sums / (local_steps * rt.world_size),
                                               torch.tensor([float(tokens), flops], device=sums.device)]), rt)
            vals, tokens, flops = totals[:-2].tolist(), totals[-2].item(), totals[-1].item()
            record = {"iter": iter_num, "loss": vals[0], **dict(zip(metrics.keys(), vals[1:])),
                      "grad_norm": grad_norm.item(), "lr": lr}
            if nonfinite_total:
                record["nonfinite_skipped"] = nonfinite_total
            logger.log(record)
            dt = time.time() - t0
            if rt.master:
                print(f"iter {iter_num}: loss {vals[0]:.4f}{describe(record)}, lr {lr:.2e}, "
                      f"{dt * 1000 / iters_timed:.1f} ms/iter, {tokens / max(dt, 1e-9):,.0f} tok/s"
                      + (f", mfu {flops / max(dt, 1e-9) / rt.world_size / peak:.1%}" if peak and flops else ""))
            t0, tokens, flops, iters_timed = time.time(), 0, 0.0, 0
    checkpoint(max_iters)
    if cfg.get("compile") and rt.master and max_iters > start_iter:
        print(f"torch.compile: {compiled_graphs() - graphs_after_warmup} recompiles after the first step")
    if rt.master and nonfinite_total:
        print(f"{nonfinite_total} update(s) skipped for non-finite values")
    return results
