"""
Preference optimisation: load the SFT checkpoint into the policy, deep-copy it into a frozen reference, build
preference pairs (on the embedded task: the verified answer above the SFT model's own mistakes) and train the
policy with the loss chosen by --loss_type.

$ python dpo.py                                   # DPO on the embedded task, from out/sft/ckpt.pt, into out/dpo
$ python dpo.py --loss_type=ipo                   # another loss; each writes a folder of its own (out/ipo)
$ python dpo.py config/simpo.py                   # a loss with its own recipe (see config/)
$ python dpo.py --loss_type=sft                   # baseline: continued SFT on the chosen answers (out/sft_chosen)
$ python dpo.py config/lora.py                    # LoRA: only adapters train; the reference is the policy without them
$ python dpo.py --loss_type=dpo+bco+sft --loss_weights=0.8,0.2,1.0   # a weighted combination (MPO)
$ torchrun --standalone --nproc_per_node=2 dpo.py # DDP; the global batch stays the same

The path, top to bottom: settings; 1. the policy and its frozen copy, the reference; 2. the pairs; 3. where the
reference log-probs come from; 4. the loss of a micro-batch; 5. the training loop; the summary line.
"""

import os

# Before torch loads OpenMP: a thread that finishes its share of an op early spins briefly, then sleeps. OpenMP's
# long default spin is slower on an idle CPU and 2.7x slower beside a busy process (README "CPU threads").
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")

import copy  # noqa: E402  (the imports below load torch)
import time  # noqa: E402
from functools import partial  # noqa: E402

import torch

from nanopo import checkpoint
from nanopo import kto
from nanopo import runtime
from configurator import apply_overrides, check_config
from data import BatchOrder, Tokenizer, encode_pair_rows
from configurator import install_error_handler
from nanopo.evaluation import complete, evaluate_loss, evaluate_task
from nanopo.formats import cached_encode, dataset_kind, load_splits, write_jsonl
from nanopo.logger import Logger, model_flops_per_token, peak_rss_mb, summary
from logprobs import (concatenated_logps, concatenated_tokens, logprob_path, logps_table, prefix_shared_logps,
                      prefix_shared_tokens)
from nanopo.lora import AdaptersOff
from nanopo.objectives import Objective, check_loss_options, needs_reference
from nanopo.runtime import NonFiniteGuard, clip_grad_norm, configure_optimizer, get_lr, set_lr
from nanopo.reference import ReferenceSync
from nanopo.tasks import AdditionTask, AnswerTask, judged_pairs

install_error_handler()  # bad input ends the run with one line, not a traceback
# -----------------------------------------------------------------------------------------------------------
# default config: DPO on the embedded task, well under a minute on a 2-core CPU
out_dir = ""              # '' = out/<loss_type> (out/sft_chosen for sft): a run never overwrites another loss's
init_from = "sft"         # 'sft' (sft_ckpt), 'resume' (out_dir/ckpt.pt), or 'scratch' (reference-free losses only)
sft_ckpt = "out/sft/ckpt.pt"
seed = 1
device = "auto"
dtype = "auto"
compile = None            # torch.compile: None = on with CUDA, off on a CPU; True / False to choose
fsdp = False              # torchrun only: shard parameters, gradients and optimizer state with FSDP2
threads = 0               # CPU threads (torch.set_num_threads); 0 = torch's default, one per core
eval_interval = 50
log_interval = 10
checkpoint_interval = 0
always_save_checkpoint = False
keep_last = 1
# the objective
loss_type = "dpo"         # dpo | ipo | simpo | orpo | kto | sft | nca | ... (losses.py's table); dpo+bco+sft: a sum
loss_weights = ""         # a combination's weights, e.g. '0.8,0.2,1.0'; '' = all 1
beta = 1.0                # KL strength (larger = closer to the reference; TRL's 0.1 is weaker, README "Results")
label_smoothing = 0.0     # dpo, robust, exo, aot: the assumed label-flip rate (dpo: > 0 is conservative DPO)
simpo_gamma = 0.5         # simpo: target reward margin
discopop_tau = 0.05       # discopop: width of the switch between its logistic and exponential parts
bco_running_delta = True  # bco: reward shift = running mean of the rewards (the paper); False: 0 (TRL's bco_pair)
f_divergence_type = "reverse_kl"  # dpo/ipo/hinge/robust/exo: the divergence the reward comes from: reverse_kl
f_alpha_divergence_coef = 0.5     # (DPO), forward_kl, js, or alpha with this coefficient (TRL's default: 1.0)
use_weighting = False     # WPO: weight each pair by the policy's (per-token) probability of it
ld_alpha = 1.0            # LD-DPO: < 1 discounts the tokens of the longer response past the shorter one's length
ref_sync_steps = 0        # TR-DPO: N > 0 = every N steps the reference becomes
ref_mixup_alpha = 0.6     # ref_mixup_alpha * policy + (1 - ref_mixup_alpha) * reference (TRL's default 0.6)
desirable_weight = 1.0    # kto: weights of desirable / undesirable examples
undesirable_weight = 1.0
reference_free = False    # dpo/ipo/hinge/...: a uniform reference (reference log-probs 0), no reference model
rpo_alpha = 0.0           # > 0: add rpo_alpha * NLL of the chosen response to a pairwise loss (RPO)
precompute_ref = False    # one no-grad pass computes the reference log-probs, then the reference is freed
prefix_sharing = False    # one row [prompt | chosen | rejected] per pair: the shared prompt is computed once
attention = "auto"        # prefix-shared rows: 'flex' (FlexAttention), 'sdpa' (boolean mask), 'auto' = flex on CUDA
logprobs = "auto"         # 'chunked': the LM head at response positions only; 'plain'; 'auto': chunked if vocab >= 4096
logprob_chunk = 1024      # chunked: logit rows at a time (memory ~ chunk x V x 4 B); 0: all, kept (faster)
# data: the embedded task (default), or a dataset (README: "Your own data")
dataset = ""              # '' = the embedded task; else a hub name or a .jsonl/.json/.parquet (pairs, kto rows, gsm8k)
dataset_format = ""       # '' = detect from the columns
dataset_split = "train"   # ultrafeedback_binarized: 'train_prefs'
eval_dataset = ""         # held-out rows from a file of their own (a local file has one split)...
eval_split = ""           # ...else from this split of `dataset` ('test_prefs', 'test'); '' = none
skip_bad_rows = False     # count and skip malformed rows instead of stopping at the first
# pairs built on the embedded task or a dataset of solutions (task settings come from the SFT checkpoint)
pairs = "verified"        # the correct answer over the model's own mistake; 'judged': two samples ranked by a judge
judge_temperature = 1.0   # judged: the judge's noise, P(y1 > y2) = sigmoid((r1 - r2) / judge_temperature)
judge_reward = "log_error"  # judged: the judge's grade, 'log_error' (-log(1 + |error|)) or 'digits' (wrong places)
n_pairs = 2000            # training prompts that get a pair
n_samples = 2             # samples per prompt (temperature below): verified, looked at when the greedy answer is
sample_temperature = 1.0  # right; judged, two distinct ones make the pair
ref_ckpt = ""             # '' = the reference is a copy of the starting policy; else this checkpoint (online rounds)
# model and task, used only with init_from='scratch' (otherwise they come from the SFT checkpoint)
tokenizer = "byte"
n_digits = 2
n_eval = 1000
task_seed = 1234
n_layer = 4
n_head = 4
n_embd = 128
block_size = 32
# optimisation
batch_size = 64           # pairs per micro-batch (kto: examples)
gradient_accumulation_steps = 1
max_iters = 100
learning_rate = 5e-5
min_lr = 5e-5
warmup_iters = 0
lr_decay_iters = 0
decay_lr = False          # DPO's usual recipe: a small constant learning rate
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0
max_nonfinite = 5
# bigger models on the same hardware (README "LoRA and activation checkpointing")
lora_rank = 0             # > 0: train LoRA adapters (lora.py) only; the reference is the policy with them switched off
lora_alpha = 16.0         # the adapters' update is scaled by lora_alpha / lora_rank
lora_dropout = 0.0        # dropout on the adapters' input
lora_targets = "attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj"  # all four projections of every block (README says why)
grad_checkpoint = False   # True: recompute blocks in backward (~1/3 more time); 'selective': LayerNorm/GELU only
# -----------------------------------------------------------------------------------------------------------
config = apply_overrides(globals())
check_config(config)       # nonsense values (batch_size=0, ...) stop here, in one line
check_loss_options(config)  # so does an option the loss does not use (losses.LOSS_OPTIONS)
out_dir = config["out_dir"] = out_dir or ("out/sft_chosen" if loss_type == "sft" else f"out/{loss_type}")  # by loss
# -----------------------------------------------------------------------------------------------------------
t_start = time.time()
rt = runtime.setup(device, dtype, seed, fsdp, threads)
runtime.micro_batches(batch_size, gradient_accumulation_steps, rt.world_size)  # an uneven split stops here
compile = config["compile"] = rt.device_type == "cuda" if compile is None else compile  # recorded with the run
use_flex = runtime.use_flex_attention(attention, prefix_sharing, rt)

# 1. the policy: the SFT model (or the run being resumed, or fresh weights), and the reference: a frozen copy (LoRA:
# the policy itself with its adapters switched off)
use_reference = needs_reference(loss_type, reference_free)  # simpo, orpo and sft never use one
start = checkpoint.dpo_start(config, use_reference)  # loads sft_ckpt strictly, with dropout 0: log-probs are exact
policy = runtime.prepare_model(start.policy.to(rt.device), config, rt)  # --lora_rank, --grad_checkpoint
tok, block_size = Tokenizer(start.tokenizer), policy.config.block_size  # the checkpoint's
reference = None
if use_reference and config["lora_rank"]:  # LoRA: the same model with its adapters off, no copy (lora.py)
    reference = AdaptersOff(policy)
elif use_reference and ref_ckpt:  # online rounds: the reference stays the SFT model while the policy moves on
    reference = checkpoint.reference_from(ref_ckpt, start, rt.device)
elif use_reference:
    reference = copy.deepcopy(policy)  # its own weights, which never change:
    reference.eval()                   # eval mode,
    reference.requires_grad_(False)    # no gradients, and no optimizer is ever given them


# 2. the pairs, as text. On the embedded task (or a dataset of checkable solutions such as GSM8K): the verified
# answer (chosen) over the SFT model's own mistake (rejected), sampled now from the policy, which is still the
# SFT model. From a preference dataset: its pairs as published (KTO: unpaired rows, or pairs as one of each).
eval_rows = []
if dataset and dataset_kind(dataset, dataset_split, dataset_format or None) != "sft":  # a preference dataset
    task = None  # no verifier: evaluation reports held-out preference metrics instead
    rows, eval_rows, report = load_splits(dataset, "kto" if loss_type == "kto" else "pairs", dataset_format,
                                          dataset_split, eval_dataset, eval_split, skip_bad_rows)
else:  # a task with a verifier: solutions whose final number can be checked (GSM8K), or the embedded task
    task = AdditionTask(**start.task, reward=judge_reward) if not dataset else AnswerTask(*load_splits(
        dataset, "sft", dataset_format, dataset_split, eval_dataset, eval_split, skip_bad_rows)[:2], n_eval)
    generate = partial(complete, policy, tok=tok, rt=rt, max_new_tokens=task.max_new_tokens,
                       label="building pairs, temperature {temperature}",
                       generator=torch.Generator(device=rt.device).manual_seed(seed))  # (prompts, temperature=)
    # (from scratch there is no model to sample mistakes from: the task makes the rejected answers itself)
    rows, sources = task.build_pairs(generate if start.sft_ckpt else None, n_pairs, n_samples, sample_temperature,
                                     seed) if pairs == "verified" else judged_pairs(
        task, generate, n_pairs, n_samples, sample_temperature, judge_temperature, seed, loss_type == "kto")
    report = f"{pairs} pairs: " + ", ".join(f"{n} {k}" for k, n in sources.items() if n)
    runtime.check_same_on_all_ranks(rows, rt)  # every rank sampled from the same weights with the same seed

# ... as token ids: pairs (prompt, chosen, rejected), or KTO's examples (prompt, completion, desirable)
encode = kto.encode if loss_type == "kto" else partial(cached_encode, encode_pair_rows)  # (datasets: cached)
train_data, skipped = encode(rows, tok, block_size, dataset or f"{pairs} pairs", use_cache=task is None,
                             allow_empty=pairs == "judged")  # (a model's own empty answer is an answer)
eval_data, eval_skipped = encode(eval_rows[:n_eval], tok, block_size, eval_dataset or dataset,
                                 use_cache=bool(eval_rows))
if rt.master:
    write_jsonl(os.path.join(out_dir, "pairs.jsonl"), rows)  # to read what the model is taught
    print(f"{report}; {len(train_data)} training rows, skipped: {skipped}"
          + (f"; {len(eval_data)} held-out rows, skipped: {eval_skipped}" if eval_rows else ""))

# 3. how a model's log-probs of a batch of pairs are computed (both models), and where the reference's come from:
# the frozen model run live under no_grad (the default); a table computed once, after which the model is freed
# (--precompute_ref); or nowhere, a uniform reference with log-probs 0 (--reference_free, simpo, orpo, sft)
layout = dict(pad_id=tok.pad_id, block_size=block_size, device=rt.device, chunk=logprob_chunk,
              logprobs=logprob_path(logprobs, policy.config.vocab_size),  # 'auto': chunked for a large vocabulary
              multiple=16 if compile else 1)  # rows -> padded batches (with compile: lengths x16, fewer graphs)
if prefix_sharing:  # one packed row [prompt | chosen | rejected] per pair: the prompt runs once
    pair_logps, count_tokens = partial(prefix_shared_logps, **layout, flex=use_flex), prefix_shared_tokens
else:  # the concatenated forward (logprobs.concatenated_logps): chosen and rejected rows in one batch of 2B
    pair_logps, count_tokens = partial(concatenated_logps, **layout), concatenated_tokens
pair_logps = partial(pair_logps, ld_alpha=ld_alpha)  # LD-DPO (ld_alpha < 1) discounts both models' long tails

train_table = eval_table = None
if precompute_ref:  # (check_loss_options made sure the loss has a reference) one pass, under no_grad, batch by batch
    train_table = logps_table(pair_logps, reference, train_data, batch_size, rt.autocast)  # (N, 2): chosen, rejected
    eval_table = logps_table(pair_logps, reference, eval_data, batch_size, rt.autocast)
    reference = None  # freed: training now holds one model
    if rt.master:
        print(f"precomputed reference log-probs for {len(train_data)} + {len(eval_data)} pairs; reference freed")


def reference_logps(reference_model, pairs, table_rows=None):
    """The reference's summed log-probs of the pairs' chosen and rejected responses, (B,) each."""
    if table_rows is not None:  # precomputed: this batch's rows of the table
        return table_rows[:, 0].to(rt.device), table_rows[:, 1].to(rt.device)
    if reference_model is None:  # a uniform reference
        return torch.zeros(len(pairs), device=rt.device), torch.zeros(len(pairs), device=rt.device)
    with torch.no_grad():  # the frozen model, live
        return pair_logps(reference_model, pairs)[:2]


# 4. the loss of a micro-batch: the policy's log-probs (with gradients), the reference's, then --loss_type
objective = Objective(config, rt)  # --loss_type and its settings (objectives.py); keeps BCO's running mean


def compute_loss(policy_model, reference_model, pairs, table_rows=None):
    """(loss, metrics) of a micro-batch of pairs (KTO: examples). Training passes the wrapped models (DDP,
    compile), evaluation the plain ones (no graphs compiled for its shapes)."""
    if loss_type == "kto":  # unpaired examples, with a KL reference point from mismatched rows: kto.py
        return kto.batch_loss(policy_model, reference_model, pairs, layout, rt, beta, desirable_weight,
                              undesirable_weight)
    rc, rr = reference_logps(reference_model, pairs, table_rows)  # first: its temporaries go before the policy's
    # summed log-probs and token counts of chosen, rejected: (B,) each; with --use_weighting, WPO's pair weights
    pc, pr, nc, nr, *wpo = pair_logps(policy_model, pairs, wpo=use_weighting)
    # --loss_type picks the loss: dpo -> losses.dpo_loss(pc, pr, rc, rr, beta, label_smoothing), ...
    return objective(pc, pr, rc, rr, nc, nr, *wpo)


if loss_type == "kto":
    count_tokens = kto.tokens
    kto.check(train_data, eval_data, desirable_weight, undesirable_weight, rt.master)

# 5. training: the policy gets gradients and optimizer steps, the reference never does
wrapped_policy = runtime.wrap_policy(policy, rt, compile)  # DDP / FSDP2 / compile; `policy` stays the plain module
wrapped_reference = runtime.wrap_reference(reference, rt, compile)  # FSDP2 / compile, never DDP (no gradients)
optimizer = configure_optimizer(policy, weight_decay, learning_rate, (beta1, beta2), rt.device_type)
scaler = runtime.grad_scaler(rt)  # fp16 only: scales the loss so small gradients survive; else a no-op
order = BatchOrder(len(train_data), seed)
guard = NonFiniteGuard(max_nonfinite)
sync = ReferenceSync(reference, policy, ref_sync_steps, ref_mixup_alpha, rt)  # TR-DPO; a no-op when steps = 0
start_iter = 0
if start.run:  # --init_from=resume: continue exactly where the run's checkpoint left off (weights, optimizer, data)
    start_iter, guard.total = checkpoint.resume(*start.run, policy, optimizer, order, scaler, rt, max_iters,
                                                states=(objective, sync))
# for MFU: forward-only passes per trained token, besides the policy's forward + backward (the live reference;
# KTO's mismatched rows through the policy, and through the reference)
forward_only = (reference is not None) + (loss_type == "kto") * (1 + (reference is not None))
logger = Logger(out_dir, rt, start_iter, max_iters, log_interval,
                model_flops_per_token(policy, train_data, forward_only, layout["logprobs"]), compile)
if rt.master:
    print(f"loss_type {loss_type}: {1 + isinstance(reference, torch.nn.Module)} model(s) in memory")


def evaluate():
    """Held-out task_accuracy (a task with a verifier) and/or eval_loss, eval_rewards/... (held-out rows)."""
    results = evaluate_task(policy, task, tok, rt, reward=pairs == "judged") if task is not None else {}
    if eval_data:  # the training loss and metrics over the held-out rows, named eval_*
        results.update(evaluate_loss(policy, lambda idx: compute_loss(policy, reference, [eval_data[i] for i in idx],
                       None if eval_table is None else eval_table[idx]), len(eval_data), batch_size, rt))
    return results


def save(it, results):
    checkpoint.save_run(config, it, policy, optimizer, order, scaler, tok.name, rt, sft_ckpt=start.sft_ckpt,
                        nonfinite_skipped=guard.total, **objective.state_dict(), **sync.state_dict(), **results)


results = {}
for it in range(start_iter, max_iters + 1):
    if it % eval_interval == 0 or it == max_iters:
        results = evaluate()
        logger.eval(it, results)
    if it == max_iters:
        break
    if it > start_iter and (checkpoint_interval and it % checkpoint_interval == 0
                            or always_save_checkpoint and it % eval_interval == 0):
        save(it, results)
    t0 = time.time()
    lr = get_lr(it, learning_rate, min_lr, warmup_iters, lr_decay_iters or max_iters, decay_lr)
    set_lr(optimizer, lr)
    step_rows = order.take(batch_size * gradient_accumulation_steps)  # row indices, the same on every rank
    micro_batches = runtime.my_micro_batches(step_rows, batch_size, gradient_accumulation_steps, rt)  # this rank's
    step_loss = 0.0
    for k, indices in enumerate(micro_batches):
        batch = [train_data[i] for i in indices]
        share = len(indices) / len(step_rows)  # of the step's rows, on all ranks: the loss is a mean over them
        runtime.sync_gradients(wrapped_policy, rt, k == len(micro_batches) - 1)  # only after the last micro-batch
        with rt.autocast():
            loss, metrics = compute_loss(wrapped_policy, wrapped_reference, batch,
                                         None if train_table is None else train_table[indices])
        # the backward pass; DDP and FSDP average gradients over the ranks, where the shares already sum to 1
        scaler.scale(loss * share * rt.world_size).backward()
        step_loss += loss.detach() * share
        logger.add(loss, metrics, share, count_tokens(batch))
    scaler.unscale_(optimizer)
    grad_norm = clip_grad_norm(wrapped_policy, grad_clip)
    if guard.all_finite(step_loss, grad_norm, scaler, rt, it):  # the same decision on every rank
        scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    sync.after_step(it)  # TR-DPO: every ref_sync_steps steps the reference moves towards the policy
    logger.step(it, lr, grad_norm, time.time() - t0, guard.total)
save(max_iters, results)
logger.finish(guard.total)
if rt.master:
    print(f"{loss_type.upper()} done: {summary(results, start.sft_accuracy)} in {time.time() - t_start:.0f} s, "
          f"peak RSS {peak_rss_mb():.0f} MB -> {os.path.join(out_dir, 'ckpt.pt')}")
runtime.cleanup(rt)
