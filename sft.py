"""
Supervised fine-tuning: train a GPT on prompt -> response demonstrations, the loss on response
tokens and EOS only, and save the checkpoint dpo.py starts from.

On the embedded task (default), from scratch, on a CPU:
$ python sft.py
Smaller or different runs override any setting below:
$ python sft.py --max_iters=200 --out_dir=out/sft_short
$ python sft.py config/tiny_sft.py
Rows of very different lengths (a dataset) run faster laid end to end, without padding (data.pack):
$ python sft.py --dataset=my_data.jsonl --packing=True
With DDP on 2 processes (gloo on CPU, nccl on GPUs); the global batch stays the same:
$ torchrun --standalone --nproc_per_node=2 sft.py
"""

import os

# Before torch loads OpenMP: a thread that finishes its share of an op early should spin briefly,
# then sleep. OpenMP's long default spin is slower on an idle CPU, and 2.7x slower beside a busy
# process (docs/scale_and_speed.md, "CPU threads").
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")

import time  # noqa: E402  (the imports below load torch)

from configurator import apply_overrides, check_config, install_error_handler
from data import BatchOrder, Tokenizer, check_pack_tokens, check_rows_fit, encode_sft_rows
from logprobs import Packing, completion_logps, logprob_path
from losses import sft_loss
from nanopo import checkpoint, runtime
from nanopo.formats import cached_encode, load_splits
from nanopo.logger import (Logger, Trackers, check_report_to, model_flops_per_token, peak_rss_mb,
                           summary)
from nanopo.tasks import AdditionTask, AnswerTask, evaluate_loss, evaluate_task, gsm8k_answer

# bad input ends the run with one line, not a traceback
install_error_handler()
# --------------------------------------------------------------------------------------------------
# default config: the embedded task's recipe, about 1.5 minutes on a 2-core CPU
out_dir = "out/sft"
seed = 1
device = "auto"           # 'auto' = cuda if available, else cpu; or 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = "auto"            # 'auto' = bfloat16 on CUDA when supported, else float32; or name one
compile = None            # torch.compile: None = on with CUDA, off on a CPU; or True / False
logprobs = "auto"         # 'chunked': LM head at response positions only; 'plain'; 'auto': by vocab
logprob_chunk = 1024      # chunked: logit rows at a time (memory ~ chunk x V x 4 B); 0: all, kept
packing = False           # several rows end to end, no padding between them (data.pack)
pack_tokens = 0           # packing: tokens a packed row may hold; 0 = one row per micro-batch
attention = "auto"        # packed rows: 'flex' (FlexAttention), 'sdpa'; 'auto': flex on CUDA
fsdp = False              # torchrun only: shard parameters, gradients, optimizer state (FSDP2)
threads = 0               # CPU threads (torch.set_num_threads); 0 = torch's default, one per core
eval_interval = 200
log_interval = 50
init_from = "scratch"     # 'scratch', 'resume' (out_dir/ckpt.pt), 'gpt2', 'gpt2-medium', ...
checkpoint_interval = 0   # also checkpoint every N iters (0: only at the end)
always_save_checkpoint = False  # also checkpoint at every evaluation
keep_last = 1             # > 1: keep the newest K checkpoints as ckpt_<iter>.pt besides ckpt.pt
# experiment trackers (nanopo/trackers.py): they get what metrics.jsonl gets
report_to = "none"        # 'wandb', 'tensorboard' or 'trackio', comma-separated for several
run_name = ""             # the run's name in the trackers; '' = out_dir
project = "nanopo"        # the wandb / trackio project
# data: the embedded task, or a dataset (README: "Your own data")
dataset = ""              # '' = the embedded task; else a hub name or a .jsonl/.json/.parquet file
dataset_format = ""       # '' = detect from the columns; or prompt_completion, messages, gsm8k, ...
dataset_split = "train"
eval_dataset = ""         # held-out rows from a file of their own (a local file has one split)...
eval_split = ""           # ...else from this split of `dataset` ('test': GSM8K, HH); '' = none
skip_bad_rows = False     # count and skip malformed rows instead of stopping at the first
tokenizer = "byte"        # 'byte' (offline, 258 tokens) or 'gpt2' (tiktoken r50k_base)
n_digits = 2              # a+b with n-digit a and b
n_eval = 1000             # held-out problems, disjoint from training
task_seed = 1234          # fixes the train/held-out split, whatever --seed is
slip_prob = 0.6           # fraction of demonstrations given the 'forgot every carry' answer
slip = "every"            # 'every': a slip forgets every carry; 'each': each carry slips alone
# model (nanoGPT's names)
n_layer = 4
n_head = 4
n_embd = 128
block_size = 32
dropout = 0.0
bias = True
# optimisation
batch_size = 128          # rows per micro-batch
gradient_accumulation_steps = 1  # micro-batches per step, over all ranks
max_iters = 1500         # fewer leave some seeds stuck on a plateau before they learn to add
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 50
lr_decay_iters = 0        # 0 = max_iters
decay_lr = True
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.99              # few tokens per step (nanoGPT's shakespeare-char uses 0.99 too)
grad_clip = 1.0
max_nonfinite = 5         # stop after this many non-finite steps in a row
# bigger models on the same hardware (docs/lora_and_checkpointing.md)
lora_rank = 0             # > 0: train rank-r LoRA adapters on lora_targets, the rest frozen
lora_alpha = 16.0         # the adapters' update is scaled by lora_alpha / lora_rank
lora_dropout = 0.0        # dropout on the adapters' input
lora_targets = "attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj"  # all four projections of every block
grad_checkpoint = False   # True: recompute blocks in backward; 'selective': LayerNorm/GELU only
# --------------------------------------------------------------------------------------------------
config = apply_overrides(globals())
# nonsense values (batch_size=0, ...) stop here, in one line
check_config(config)
# a tracker that is not installed stops the run now, not after the data is read
check_report_to(report_to)
# --------------------------------------------------------------------------------------------------
t_start = time.time()
# where this process runs: its device and dtype, and its rank in a DDP job
process = runtime.setup(device, dtype, seed, fsdp, threads)
# a step's rows that cannot be split evenly over the ranks stop here
runtime.micro_batches(batch_size, gradient_accumulation_steps, process.world_size)
if compile is None:
    compile = process.device_type == "cuda"
    config["compile"] = compile
# the model: fresh weights, GPT-2's, or the run in out_dir (resume); with LoRA if asked
start = checkpoint.sft_start(config)
model = runtime.prepare_model(start.policy.to(process.device), config, process)
# a resumed run keeps its checkpoint's tokenizer and block_size (sft_start wrote them into config)
tok = Tokenizer(config["tokenizer"])
block_size = config["block_size"]
check_pack_tokens(pack_tokens, block_size)

# the demonstrations: the embedded task's imperfect ones, or a dataset's
eval_rows = []
if dataset:
    rows, eval_rows, report = load_splits(dataset, "sft", dataset_format, dataset_split,
                                          eval_dataset, eval_split, skip_bad_rows)
    # solutions with a checkable final answer (GSM8K) also give a held-out task_accuracy
    task = None
    checkable = [gsm8k_answer(r["response"]) is not None for r in eval_rows[:n_eval]]
    if eval_rows and all(checkable):
        task = AnswerTask(rows, eval_rows, n_eval)
else:
    task = AdditionTask(n_digits, n_eval, task_seed)
    rows, n_wrong = task.sft_rows(slip_prob, seed, slip)
    report = (f"SFT data: {len(rows)} demonstrations ({n_wrong / len(rows):.1%} wrong), "
              f"{n_eval} held-out problems")
# ... as token ids. A dataset's are cached on disk (formats.cached_encode) for the next run.
train_data, skipped = cached_encode(encode_sft_rows, rows, tok, block_size,
                                    dataset or "embedded task", use_cache=bool(dataset))
eval_data, eval_skipped = cached_encode(encode_sft_rows, eval_rows[:n_eval], tok, block_size,
                                        eval_dataset or dataset, use_cache=bool(dataset))
# rows cut to fit block_size are counted; a block_size that fits no row whole stops here
check_rows_fit(train_data, skipped, block_size, dataset or "embedded task")
if process.master:
    line = (f"{report}; encoded: {len(train_data)} training rows (skipped: {skipped}; "
            f"truncated: {skipped.truncated()})")
    if eval_rows:
        line += (f", {len(eval_data)} held-out rows (skipped: {eval_skipped}; "
                 f"truncated: {eval_skipped.truncated()})")
    print(f"{line}; model: {model.get_num_params() / 1e6:.2f}M parameters")
# --logprobs=auto: chunked for a large vocabulary (GPT-2's), plain for the embedded task's
logprob_kind = logprob_path(logprobs, model.config.vocab_size)
# with compile, lengths are padded to a multiple of 16, so fewer shapes need a graph of their own
pad_multiple = 16 if compile else 1
# --packing: rows of at most pack_tokens tokens, attention by FlexAttention or model.Segments
use_flex = runtime.use_flex_attention(attention, packing, process, dropout)
row_packing = None
if packing:
    row_packing = Packing(pack_tokens, flex=use_flex)


def compute_loss(model, rows):
    """Mean negative log-likelihood per response token of [(prompt_ids, response_ids)] rows, prompt
    and padding masked out (logprobs.completion_logps collates them; notebook 02 draws the mask)."""
    # (B,) each: summed over the response tokens and EOS, and how many tokens that is
    logps, n_tokens = completion_logps(model, rows, tok.pad_id, block_size, process.device,
                                       pad_multiple, logprobs=logprob_kind, chunk=logprob_chunk,
                                       packing=row_packing)
    return sft_loss(logps, n_tokens)


def evaluate():
    """Held-out task_accuracy (embedded task, GSM8K) and/or eval_loss (NLL per response token)."""
    results = {}
    if task is not None:
        results = evaluate_task(model, task, tok, process)
    if eval_data:
        # batches weighted by their response tokens: a mean per token, whatever batch_size
        def loss_of_rows(indices):
            return compute_loss(model, [eval_data[i] for i in indices]), {}
        response_tokens = [len(response) for _, response in eval_data]
        results.update(evaluate_loss(model, loss_of_rows, len(eval_data), batch_size, process,
                                     row_weights=response_tokens))
    return results


def save(it, results):
    checkpoint.save_run(config, it, model, optimizer, order, scaler, tok.name, process,
                        nonfinite_skipped=guard.total, **results)


# training: the model wrapped for it (DDP / FSDP2 / compile; `model` stays the plain one)
wrapped_model = runtime.wrap_policy(model, process, compile)
optimizer = runtime.configure_optimizer(model, weight_decay, learning_rate, (beta1, beta2),
                                        process.device_type)
# fp16 only: the loss is scaled so that small gradients survive; else a no-op
scaler = runtime.grad_scaler(process)
order = BatchOrder(len(train_data), seed)
guard = runtime.NonFiniteGuard(max_nonfinite)
start_iter = 0
if start.run_to_resume:
    # --init_from=resume: continue exactly where the checkpoint left off (weights, optimizer, data)
    path, saved = start.run_to_resume
    start_iter, guard.total = checkpoint.resume(path, saved, model, optimizer, order, scaler,
                                                process, max_iters)
flops_per_token = model_flops_per_token(model, train_data, logprobs=logprob_kind)  # for MFU
# --report_to: the trackers (rank 0 only) get every record metrics.jsonl gets
trackers = Trackers(report_to, out_dir, run_name, project, config, start_iter, process)
logger = Logger(out_dir, process, start_iter, max_iters, log_interval, flops_per_token, compile,
                trackers)
# From here on, SIGTERM (a scheduler's notice) or a first Ctrl-C stops the run after the step it
# interrupts, with a checkpoint; a second Ctrl-C stops it at once
signals = runtime.StopOnSignal(process)
results = {}
for it in range(start_iter, max_iters + 1):
    if it % eval_interval == 0 or it == max_iters:
        results = evaluate()
        logger.eval(it, results)
    if it == max_iters:
        break
    periodic = checkpoint_interval and it % checkpoint_interval == 0
    at_eval = always_save_checkpoint and it % eval_interval == 0
    if it > start_iter and (periodic or at_eval):
        save(it, results)
    t0 = time.time()
    lr = runtime.get_lr(it, learning_rate, min_lr, warmup_iters, lr_decay_iters or max_iters,
                        decay_lr)
    runtime.set_lr(optimizer, lr)
    # the step's row indices, the same on every rank; the loss is a mean over their response tokens
    step_rows = order.take(batch_size * gradient_accumulation_steps)
    step_tokens = sum(len(train_data[i][1]) for i in step_rows)
    micro_batches = runtime.my_micro_batches(step_rows, batch_size, gradient_accumulation_steps,
                                             process)
    step_loss = 0.0
    for k, indices in enumerate(micro_batches):
        rows = [train_data[i] for i in indices]
        # this micro-batch's share of the step's response tokens, on all ranks
        share = sum(len(response) for _, response in rows) / step_tokens
        # gradients are synchronised over the ranks only after the last micro-batch
        runtime.sync_gradients(wrapped_model, process, k == len(micro_batches) - 1)
        with process.autocast():
            loss = compute_loss(wrapped_model, rows)
        # DDP averages gradients over the ranks, where the shares already sum to 1
        scaler.scale(loss * share * process.world_size).backward()
        step_loss += loss.detach() * share
        # tokens read, for tok/s
        tokens_read = sum(len(prompt) + len(response) - 1 for prompt, response in rows)
        logger.add(loss, {}, share, tokens_read)
    scaler.unscale_(optimizer)
    # clip the gradients to a total norm of grad_clip; the norm before clipping is logged
    grad_norm = runtime.clip_grad_norm(wrapped_model, grad_clip)
    # skip the update if the loss or the gradient is not finite: the same decision on every rank
    if guard.all_finite(step_loss, grad_norm, scaler, process, it):
        scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    logger.step(it, lr, grad_norm, time.time() - t0, guard.total)
    # Every step the ranks agree (one all-reduce) whether any got SIGTERM or Ctrl-C. If one did,
    # all join save() (rank 0 writes) and exit with code 75: step `it` is done, so the checkpoint
    # is of it + 1 steps, and --init_from=resume starts there. After the last step the run just
    # finishes, final evaluation included.
    if signals.stop_requested(process) and it + 1 < max_iters:
        save(it + 1, results)
        logger.close_trackers()
        signals.exit(process, it + 1, max_iters, os.path.join(out_dir, "ckpt.pt"))
save(max_iters, results)
logger.finish(guard.total)
wall_s = time.time() - t_start
last_line = (f"SFT done: {summary(results)} in {wall_s:.0f} s, peak RSS {peak_rss_mb():.0f} MB "
             f"-> {os.path.join(out_dir, 'ckpt.pt')}")
# out_dir/summary.json: the run in one file (results, speed, settings, git commit)
run_summary = logger.write_summary(out_dir, config, results, last_line, wall_s,
                                   training_rows=len(train_data), skipped=str(skipped),
                                   truncated=skipped.truncated(), nonfinite_skipped=guard.total)
logger.close_trackers(run_summary)
if process.master:
    print(last_line)
runtime.cleanup(process)
