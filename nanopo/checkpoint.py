"""
Checkpoints: written atomically, read strictly, and everything a run needs to continue exactly (optimizer,
GradScaler, data position, every RNG of every rank). Also where a run's models come from: the policy (the SFT
checkpoint, the run being resumed, or fresh weights: sft_start, dpo_start) and, besides dpo.py's frozen deep
copy, the other references: one loaded from a checkpoint of its own (load_reference, online rounds), LoRA's
policy with its adapters switched off (AdaptersOff, from lora.py), and a reference that moves towards the
policy during training (ReferenceSync, TR-DPO), whose weights the checkpoints carry once it has moved.
"""

import contextlib
import glob
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist

import configurator
from data import Tokenizer
from configurator import UserError
from nanopo.lora import AdaptersOff, apply_lora, lora_settings, merge_lora  # noqa: F401 (AdaptersOff: dpo.py)
from model import GPT, GPTConfig
from nanopo.runtime import SINGLE_PROCESS_CPU, unwrap

CHECKPOINT_FORMAT = 1  # bump when the checkpoint layout changes


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
    optimizer state, data position, ...). A model with LoRA adapters is saved as it trains, base weights and
    adapters apart (so it resumes exactly), with 'lora': the adapters' rank, alpha and targets."""
    raw = unwrap(model)
    model_state = raw.state_dict() if model_state is None else model_state
    for name, p in model_state.items():
        if not torch.isfinite(p).all():
            raise UserError(f"refusing to save {path}: parameter '{name}' is not finite")
    lora = lora_settings(raw)
    ckpt = {"format_version": CHECKPOINT_FORMAT, "model": model_state, "model_args": asdict(raw.config),
            "config": config, "tokenizer": tokenizer, **({"lora": lora} if lora else {}), **extra}
    folder = os.path.dirname(path) or "."
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        os.makedirs(folder, exist_ok=True)
        for stale in glob.glob(glob.escape(path) + ".tmp.*"):  # left by a run killed mid-write
            os.remove(stale)
        with open(tmp, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        # A full disk, a lost permission, a quota: the previous ckpt.pt was never touched. Say why in
        # one line, and leave no partial file behind.
        cause = os_error_in(e)
        if cause is None:
            raise
        if os.path.exists(tmp):
            with contextlib.suppress(OSError):
                os.remove(tmp)
        raise UserError(f"could not save {path}: {cause}; the previous checkpoint there, if any, "
                        "is intact") from None


def os_error_in(e):
    """The operating system's reason behind a failed write, 'No space left on device (errno 28)', or
    None if there is none: torch.save reports a failed write as a RuntimeError of its own, with the
    OSError as its context."""
    if isinstance(e, RuntimeError):
        e = e.__context__
    if isinstance(e, OSError):
        return f"{e.strerror or e} (errno {e.errno})" if e.errno else str(e)
    return None


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
    """Build a GPT of the checkpoint's shape (with e.g. dropout overridden) and load its weights strictly. The
    LoRA adapters of a checkpoint that has them are merged into the base weights: a plain GPT comes back (for
    sample.py, scripts/export_hf.py, and dpo.py starting from a LoRA SFT run)."""
    args = dict(ckpt["model_args"], **overrides)
    try:
        model = GPT(GPTConfig(**args))
    except TypeError as e:
        raise UserError(f"{path}: model_args do not describe this GPT ({e})")
    if ckpt.get("lora"):
        apply_lora(model, ckpt["lora"]["rank"], ckpt["lora"]["alpha"], targets=ckpt["lora"]["targets"])
    load_state_strict(model, ckpt["model"], path)
    return merge_lora(model)


def keep_lora_settings(config, run):
    """A resumed run keeps its adapters' rank, alpha and targets (what its checkpoint's weights are shaped by), as
    it keeps the model's shape; a command line that sets them otherwise is an error."""
    lora = run[1].get("lora")
    keep = {"lora_rank": lora["rank"], "lora_alpha": lora["alpha"], "lora_targets": lora["targets"]} if lora else {}
    keep_checkpoint_settings(config, keep or {"lora_rank": 0}, run[0])


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


def resume(path, ckpt, model, optimizer, order, scaler, rt, max_iters, states=()):
    """Load a training checkpoint (`path` and its contents) into a freshly built run: weights, optimizer,
    GradScaler, data position and RNGs, and each of `states` (objects whose load_state_dict(ckpt) reads what
    their state_dict() put into it: BCO's running mean, a reference that moved). Returns (the iteration to
    continue from, the non-finite steps skipped so far). Call it last before the loop, so nothing set up after
    it draws from the restored RNGs."""
    for key in ("optimizer", "iter_num", "data_order", "rng"):
        if key not in ckpt:
            raise UserError(f"{path} cannot be resumed: it has no '{key}' (was it written by an older version?)")
    if ckpt["iter_num"] > max_iters:  # the run would overwrite the newer checkpoint with one labelled max_iters
        raise UserError(f"the checkpoint is at iter {ckpt['iter_num']}, past max_iters={max_iters}: pass "
                        f"--max_iters={ckpt['iter_num']} or more to continue it")
    if rt.fsdp:  # full tensors in the file; each rank keeps its shards
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)
        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(unwrap(model), ckpt["model"], options=options)
        set_optimizer_state_dict(unwrap(model), optimizer, ckpt["optimizer"], options=options)
    else:
        load_state_strict(unwrap(model), ckpt["model"], path)
        optimizer.load_state_dict(ckpt["optimizer"])
    order.load_state_dict(ckpt["data_order"])
    for state in states:
        state.load_state_dict(ckpt)
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    per_rank = ckpt.get("rng_per_rank")  # DDP: each rank continues its own stream (same world size only)
    own = rt.ddp and per_rank is not None and len(per_rank) == rt.world_size
    set_rng_state(per_rank[rt.rank] if own else ckpt["rng"])
    if rt.master:
        print(f"resuming {path} from iter {ckpt['iter_num']}")
    return ckpt["iter_num"], ckpt.get("nonfinite_skipped", 0)


def save_run(cfg, iter_num, model, optimizer, order, scaler, tokenizer, rt=SINGLE_PROCESS_CPU, **extra):
    """Rank 0 writes out_dir/ckpt.pt, which always holds the newest checkpoint; with keep_last > 1 the newest K
    are also kept as ckpt_<iter>.pt (hard links, so no second copy is written). `extra` (evaluation results,
    the non-finite count, ...) goes into the file too. Every rank calls this: under FSDP2 the full weights and
    optimizer state are gathered from all of them."""
    model_state, optim_state = full_state_dict(model, rt), optimizer.state_dict()
    rng_per_rank = None
    if rt.ddp:  # the ranks' RNG streams differ (dropout draws as many numbers as a rank's batch has elements)
        rng_per_rank = [None] * rt.world_size
        dist.all_gather_object(rng_per_rank, rng_state())
    if rt.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        optim_state = get_optimizer_state_dict(unwrap(model), optimizer,
                                               options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    problem = None
    if rt.master:
        try:
            write_run(cfg, iter_num, model, model_state, optim_state, order, scaler, tokenizer,
                      rng_per_rank, extra)
        except UserError as e:
            problem = str(e)
    if rt.ddp:
        # the other ranks learn that rank 0's write failed, and stop with it in one line
        failed = torch.tensor([float(problem is not None)], device=rt.device)
        dist.all_reduce(failed)
        if failed.item() > 0 and problem is None:
            problem = "rank 0 could not save the checkpoint (its line says why)"
    if problem:
        raise UserError(problem)


def write_run(cfg, iter_num, model, model_state, optim_state, order, scaler, tokenizer,
              rng_per_rank, extra):
    """Rank 0's part of save_run: ckpt.pt, and the numbered copies keep_last asks for."""
    out_dir = cfg["out_dir"]
    path = os.path.join(out_dir, "ckpt.pt")
    state = dict(iter_num=iter_num, optimizer=optim_state, data_order=order.state_dict(),
                 rng=rng_state(), rng_per_rank=rng_per_rank,
                 scaler=scaler.state_dict() if scaler.is_enabled() else None, **extra)
    save_checkpoint(path, model, cfg, tokenizer, model_state=model_state, **state)
    keep = cfg.get("keep_last", 1)
    if keep > 1:
        numbered = os.path.join(out_dir, f"ckpt_{iter_num:07d}.pt")
        if os.path.exists(numbered):
            os.remove(numbered)
        try:
            os.link(path, numbered)
        except OSError:  # a filesystem without hard links: a second copy
            try:
                shutil.copyfile(path, numbered)
            except OSError as e:
                if os.path.exists(numbered):
                    with contextlib.suppress(OSError):
                        os.remove(numbered)
                raise UserError(f"could not save {numbered}: {os_error_in(e)}; {path} is saved "
                                "and intact") from None
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
# Where a run starts: each script's init matrix behind one function

@dataclass
class Start:
    """Where a run starts: the model's weights and what comes with them."""
    policy: GPT
    tokenizer: str
    task: dict            # the embedded task's settings, AdditionTask(**task) (those the policy was trained on)
    sft_ckpt: str         # the SFT checkpoint the reference is a copy of; '' when there is none
    run_to_resume: tuple = None  # (path, contents) of the run being resumed, or None
    sft_accuracy: float = None  # the SFT checkpoint's held-out task_accuracy, for the summary line


TASK_KEYS = ("n_digits", "n_eval", "task_seed")


def task_settings(cfg):
    """The embedded task's settings in a run's config, as AdditionTask takes them."""
    return {"n_digits": cfg["n_digits"], "n_eval": cfg["n_eval"], "seed": cfg["task_seed"]}


def dpo_start(config, needs_reference):
    """dpo.py's init matrix, in one place. init_from='sft': the SFT checkpoint's weights (dropout off, so log-
    probs are deterministic and the policy equals its reference at step 0). 'resume': the run in out_dir, whose
    checkpoint names the SFT checkpoint its reference came from (loaded again; resume() then loads the
    trained weights). 'scratch': fresh weights of the shape in `config`, for losses without a reference. A
    resumed run from scratch keeps its own shape, tokenizer and task. Writes the SFT checkpoint's path back into
    `config` (the run's checkpoints name it, for the next resume)."""
    init_from, out_dir, sft_ckpt = config["init_from"], config["out_dir"], config["sft_ckpt"]
    if init_from not in ("sft", "resume", "scratch"):
        raise UserError(f"unknown init_from '{init_from}': expected 'sft', 'resume' or 'scratch'")
    run, from_scratch = None, init_from == "scratch"
    if init_from == "resume":
        run = load_run_checkpoint(out_dir)
        if "sft_ckpt" not in run[1]["config"]:
            raise UserError(f"{run[0]} was not written by dpo.py (its config names no sft_ckpt): point --out_dir "
                            "at a dpo.py run to resume it")
        keep_lora_settings(config, run)
        sft_ckpt = run[1]["config"]["sft_ckpt"]
        from_scratch = not sft_ckpt or run[1]["config"].get("init_from") == "scratch"
    if from_scratch and needs_reference:
        raise UserError(f"a run from init_from='scratch' has no reference model for '{config['loss_type']}': use "
                        "orpo, simpo, sft or --reference_free=True")
    config["sft_ckpt"] = "" if from_scratch else sft_ckpt
    if not from_scratch:
        if os.path.abspath(os.path.join(out_dir, "ckpt.pt")) == os.path.abspath(sft_ckpt):
            raise UserError(f"out_dir={out_dir} holds the SFT checkpoint this run starts from: it would be "
                            "overwritten; choose another --out_dir")
        ckpt = load_checkpoint(sft_ckpt)
        if run and run[1].get("tokenizer") != ckpt["tokenizer"]:
            raise UserError(f"{run[0]} was trained with tokenizer '{run[1].get('tokenizer')}', its SFT checkpoint "
                            f"with '{ckpt['tokenizer']}'")
        policy = model_from_checkpoint(ckpt, sft_ckpt, dropout=0.0)
        config.update({k: ckpt["config"][k] for k in TASK_KEYS})  # this run's checkpoints carry the task it trains on
        return Start(policy, ckpt["tokenizer"], task_settings(ckpt["config"]), sft_ckpt, run,
                     ckpt.get("task_accuracy"))
    if run:  # the model's shape, tokenizer and task are the run's own
        shape = {k: run[1]["config"].get(k) for k in ("n_layer", "n_head", "n_embd", "block_size") + TASK_KEYS}
        keep_checkpoint_settings(config, dict(shape, tokenizer=run[1]["tokenizer"]), run[0])
        policy = model_from_checkpoint(run[1], run[0], dropout=0.0)
    else:
        policy = GPT(GPTConfig(block_size=config["block_size"], vocab_size=Tokenizer(config["tokenizer"]).n_vocab,
                               n_layer=config["n_layer"], n_head=config["n_head"], n_embd=config["n_embd"],
                               dropout=0.0))
    return Start(policy, config["tokenizer"], task_settings(config), "", run, None)


def load_reference(path, start, device):
    """A frozen reference loaded from its own checkpoint (online rounds whose reference stays the SFT model while
    the policy starts from the previous round): the same tokenizer and shape as the policy, dropout off."""
    ckpt = load_checkpoint(path, tokenizer=start.tokenizer, missing_hint="--ref_ckpt names no checkpoint")
    if ckpt["model_args"] != dict(asdict(start.policy.config), dropout=ckpt["model_args"].get("dropout")):
        raise UserError(f"{path}: the reference's shape {ckpt['model_args']} differs from the policy's")
    reference = model_from_checkpoint(ckpt, path, dropout=0.0).to(device)
    return reference.eval().requires_grad_(False)


def sft_start(config):
    """sft.py's init matrix. init_from='scratch': fresh weights of the shape in `config`; 'gpt2' (or
    'gpt2-medium', ...): GPT-2's weights through transformers; 'resume': the run in out_dir, whose shape and
    tokenizer are written into `config` (a conflicting command line is an error, as in nanoGPT); resume() then
    loads the rest."""
    init_from, tokenizer, dropout = config["init_from"], config["tokenizer"], config["dropout"]
    if init_from == "resume":
        run = load_run_checkpoint(config["out_dir"])
        shape = {k: run[1]["model_args"].get(k) for k in ("n_layer", "n_head", "n_embd", "block_size", "bias")}
        keep_checkpoint_settings(config, dict(shape, tokenizer=run[1]["tokenizer"]), run[0])
        keep_lora_settings(config, run)  # (resume() loads the adapters, once sft.py has put them back)
        return Start(model_from_checkpoint(run[1], run[0], dropout=dropout), run[1]["tokenizer"], {}, "", run)
    if init_from == "scratch":
        shape = {k: config[k] for k in ("block_size", "n_layer", "n_head", "n_embd", "bias")}
        model = GPT(GPTConfig(vocab_size=Tokenizer(tokenizer).n_vocab, dropout=dropout, **shape))
        return Start(model, tokenizer, {}, "")
    if not init_from.startswith("gpt2"):
        raise UserError(f"unknown init_from '{init_from}': expected 'scratch', 'resume' or a GPT-2 name ('gpt2', ...)")
    if tokenizer != "gpt2":
        raise UserError(f"init_from='{init_from}' needs tokenizer='gpt2', not '{tokenizer}'")
    try:  # transformers is optional, and the weights come from the hub (or its local cache)
        model = GPT.from_hf_gpt2(init_from, block_size=config["block_size"], dropout=dropout)
    except (ImportError, OSError) as e:
        raise UserError(f"could not load GPT-2 weights '{init_from}' (pip install transformers; needs the hub or its "
                        f"cache): {type(e).__name__}: {str(e).strip().splitlines()[0][:160]}") from None
    return Start(model, tokenizer, {}, "")


# -----------------------------------------------------------------------------------------------------------
# A reference that moves towards the policy during training (TR-DPO, --ref_sync_steps / --ref_mixup_alpha)

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
