"""
Supervised fine-tuning: train a GPT on prompt -> response demonstrations, the loss on response tokens and EOS
only, and save the checkpoint dpo.py starts from.

On the embedded task (default), from scratch, on a CPU:
$ python sft.py
Smaller or different runs override any setting below:
$ python sft.py --max_iters=200 --out_dir=out/sft_short
$ python sft.py config/tiny_sft.py
With DDP on 2 processes (gloo on CPU, nccl on GPUs); the global batch stays the same:
$ torchrun --standalone --nproc_per_node=2 sft.py
"""

import os

# Before torch loads OpenMP: a thread that finishes its share of an op early spins briefly, then sleeps. OpenMP's
# long default spin is slower on an idle CPU and 2.7x slower beside a busy process (README "CPU threads").
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")

import time  # noqa: E402  (the imports below load torch)

from nanopo import checkpoint
from nanopo import runtime
from configurator import apply_overrides, check_config
from data import BatchOrder, Tokenizer, encode_sft_rows
from configurator import install_error_handler
from nanopo.evaluation import evaluate_loss, evaluate_task
from nanopo.formats import cached_encode, load_splits
from nanopo.logger import Logger, model_flops_per_token, peak_rss_mb, summary
from logprobs import completion_logps, logprob_path
from losses import sft_loss
from nanopo.runtime import NonFiniteGuard, clip_grad_norm, configure_optimizer, get_lr, set_lr
from nanopo.tasks import AdditionTask, AnswerTask, gsm8k_answer

install_error_handler()  # bad input ends the run with one line, not a traceback
# -----------------------------------------------------------------------------------------------------------
# default config: the embedded task's recipe, about 1.5 minutes on a 2-core CPU
out_dir = "out/sft"
seed = 1
device = "auto"           # 'auto' = cuda if available, else cpu; or 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = "auto"            # 'auto' = bfloat16 on CUDA when supported, else float32; or 'float32', 'bfloat16'
compile = None            # torch.compile: None = on with CUDA, off on a CPU (~30 s up front for little); or True/False
logprobs = "auto"         # 'chunked': the LM head at response positions only; 'plain'; 'auto': chunked if vocab >= 4096
logprob_chunk = 1024      # chunked: logit rows at a time (memory ~ chunk x V x 4 B); 0: all, kept (faster)
fsdp = False              # torchrun only: shard parameters, gradients and optimizer state with FSDP2
threads = 0               # CPU threads (torch.set_num_threads); 0 = torch's default, one per core
eval_interval = 200
log_interval = 50
init_from = "scratch"     # 'scratch', 'resume' (out_dir/ckpt.pt), or 'gpt2', 'gpt2-medium', ... (needs transformers)
checkpoint_interval = 0   # also checkpoint every N iters (0: only at the end)
always_save_checkpoint = False  # also checkpoint at every evaluation
keep_last = 1             # > 1: keep the newest K checkpoints as ckpt_<iter>.pt besides ckpt.pt
# data: the embedded task, or a dataset (README: "Your own data")
dataset = ""              # '' = the embedded task; else a hub name ('openai/gsm8k:main') or a .jsonl/.json/.parquet
dataset_format = ""       # '' = detect from the columns; or prompt_completion, messages, gsm8k, trl, hh, ...
dataset_split = "train"
eval_dataset = ""         # held-out rows from a file of their own (a local file has one split)...
eval_split = ""           # ...else from this split of `dataset` ('test' for GSM8K and HH); '' = none
skip_bad_rows = False     # count and skip malformed rows instead of stopping at the first
tokenizer = "byte"        # 'byte' (offline, 258 tokens) or 'gpt2' (tiktoken r50k_base)
n_digits = 2              # a+b with n-digit a and b
n_eval = 1000             # held-out problems, disjoint from training
task_seed = 1234          # fixes the train/held-out split, whatever --seed is
slip_prob = 0.6           # fraction of demonstrations given the 'forgot every carry' answer
slip = "every"            # 'every': a slip forgets every carry; 'each': each carry slips with slip_prob on its own
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
beta2 = 0.99              # the tiny model sees few tokens per step (nanoGPT's shakespeare-char uses 0.99)
grad_clip = 1.0
max_nonfinite = 5         # stop after this many non-finite steps in a row
# bigger models on the same hardware (README "LoRA and activation checkpointing")
lora_rank = 0             # > 0: train rank-r LoRA adapters (lora.py) on lora_targets, every other weight frozen
lora_alpha = 16.0         # the adapters' update is scaled by lora_alpha / lora_rank
lora_dropout = 0.0        # dropout on the adapters' input
lora_targets = "attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj"  # all four projections of every block (README says why)
grad_checkpoint = False   # True: recompute blocks in backward (~1/3 more time); 'selective': LayerNorm/GELU only
# -----------------------------------------------------------------------------------------------------------
config = apply_overrides(globals())
check_config(config)  # nonsense values (batch_size=0, ...) stop here, in one line
# -----------------------------------------------------------------------------------------------------------
t_start = time.time()
rt = runtime.setup(device, dtype, seed, fsdp, threads)
runtime.micro_batches(batch_size, gradient_accumulation_steps, rt.world_size)  # an uneven split stops here
compile = config["compile"] = rt.device_type == "cuda" if compile is None else compile  # recorded with the run
start = checkpoint.sft_start(config)  # fresh weights, GPT-2's, or the run in out_dir (resume)
tokenizer, block_size = config["tokenizer"], config["block_size"]  # a resumed run keeps its checkpoint's
tok, model = Tokenizer(tokenizer), runtime.prepare_model(start.policy.to(rt.device), config, rt)  # LoRA, checkpointing

# the demonstrations: the embedded task's imperfect ones, or a dataset's
eval_rows = []
if dataset:
    rows, eval_rows, report = load_splits(dataset, "sft", dataset_format, dataset_split, eval_dataset, eval_split,
                                          skip_bad_rows)
    # solutions with a checkable final answer (GSM8K) also give a held-out task_accuracy
    checkable = eval_rows and all(gsm8k_answer(r["response"]) is not None for r in eval_rows[:n_eval])
    task = AnswerTask(rows, eval_rows, n_eval) if checkable else None
else:
    task = AdditionTask(n_digits, n_eval, task_seed)
    rows, n_wrong = task.sft_rows(slip_prob, seed, slip)
    report = f"SFT data: {len(rows)} demonstrations ({n_wrong / len(rows):.1%} wrong), {n_eval} held-out problems"
# ... as token ids; a dataset's are cached on disk (formats.cached_encode): a second run does not tokenise again
train_data, skipped = cached_encode(encode_sft_rows, rows, tok, block_size, dataset or "embedded task", bool(dataset))
eval_data, eval_skipped = cached_encode(encode_sft_rows, eval_rows[:n_eval], tok, block_size,
                                        eval_dataset or dataset, bool(dataset))
if rt.master:
    print(f"{report}; encoded: {len(train_data)} training rows (skipped: {skipped})"
          + (f", {len(eval_data)} held-out rows (skipped: {eval_skipped})" if eval_rows else "")
          + f"; model: {model.get_num_params() / 1e6:.2f}M parameters")
layout = dict(pad_id=tok.pad_id, block_size=block_size, device=rt.device, multiple=16 if compile else 1,
              logprobs=logprob_path(logprobs, model.config.vocab_size), chunk=logprob_chunk)  # (completion_logps)


def compute_loss(model, rows):
    """Mean negative log-likelihood per response token of [(prompt_ids, response_ids)] rows, prompt and padding
    masked out (logprobs.completion_logps collates them; notebook 02 draws the mask)."""
    logps, n_tokens = completion_logps(model, rows, **layout)  # (B,) each: summed over response + EOS
    return sft_loss(logps, n_tokens)


def evaluate():
    """Held-out task_accuracy (embedded task, GSM8K) and/or eval_loss (NLL per response token of held-out rows)."""
    results = evaluate_task(model, task, tok, rt) if task is not None else {}
    if eval_data:  # batches weighted by their response tokens: a mean per token, whatever batch_size
        results.update(evaluate_loss(model, lambda idx: (compute_loss(model, [eval_data[i] for i in idx]), {}),
                                     len(eval_data), batch_size, rt, row_weights=[len(r) for _, r in eval_data]))
    return results


def save(it, results):
    checkpoint.save_run(config, it, model, optimizer, order, scaler, tok.name, rt, nonfinite_skipped=guard.total,
                        **results)


# training: the model wrapped for it (DDP / FSDP2 / compile; `model` stays the plain one), its optimizer, the loop
wrapped_model = runtime.wrap_policy(model, rt, compile)
optimizer = configure_optimizer(model, weight_decay, learning_rate, (beta1, beta2), rt.device_type)
scaler = runtime.grad_scaler(rt)  # fp16 only: scales the loss so small gradients survive; else a no-op
order = BatchOrder(len(train_data), seed)
guard = NonFiniteGuard(max_nonfinite)
start_iter = 0
if start.run:  # --init_from=resume: continue exactly where the run's checkpoint left off (weights, optimizer, data)
    start_iter, guard.total = checkpoint.resume(*start.run, model, optimizer, order, scaler, rt, max_iters)
flops_per_token = model_flops_per_token(model, train_data, logprobs=layout["logprobs"])  # for MFU
logger = Logger(out_dir, rt, start_iter, max_iters, log_interval, flops_per_token, compile)
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
    step_tokens = sum(len(train_data[i][1]) for i in step_rows)  # response tokens + EOS: the loss is their mean
    micro_batches = runtime.my_micro_batches(step_rows, batch_size, gradient_accumulation_steps, rt)  # this rank's
    step_loss = 0.0
    for k, indices in enumerate(micro_batches):
        rows = [train_data[i] for i in indices]
        share = sum(len(r) for _, r in rows) / step_tokens  # of the step's response tokens, on all ranks
        runtime.sync_gradients(wrapped_model, rt, k == len(micro_batches) - 1)  # only after the last micro-batch
        with rt.autocast():
            loss = compute_loss(wrapped_model, rows)
        scaler.scale(loss * share * rt.world_size).backward()  # DDP averages over ranks; the shares sum to 1
        step_loss += loss.detach() * share
        logger.add(loss, {}, share, sum(len(p) + len(r) - 1 for p, r in rows))  # tokens read, for tok/s
    scaler.unscale_(optimizer)
    grad_norm = clip_grad_norm(wrapped_model, grad_clip)
    if guard.all_finite(step_loss, grad_norm, scaler, rt, it):  # the same decision on every rank
        scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    logger.step(it, lr, grad_norm, time.time() - t0, guard.total)
save(max_iters, results)
logger.finish(guard.total)
if rt.master:
    print(f"SFT done: {summary(results)} in {time.time() - t_start:.0f} s, peak RSS {peak_rss_mb():.0f} MB "
          f"-> {os.path.join(out_dir, 'ckpt.pt')}")
runtime.cleanup(rt)
