"""
Supervised fine-tuning: train a GPT on prompt -> response demonstrations, the loss on response tokens and EOS
only, and save the checkpoint dpo.py starts from.

On the embedded task (default), from scratch, on a CPU:
$ python sft.py
Smaller or different runs override any setting below:
$ python sft.py --max_iters=200 --out_dir=out/sft_short
$ python sft.py config/tiny.py
With DDP on 2 processes (gloo on CPU, nccl on GPUs); the global batch stays the same:
$ torchrun --standalone --nproc_per_node=2 sft.py
"""

import os
import time

import torch

import common
from configurator import apply_overrides
from data import (AdditionTask, AnswerTask, BatchOrder, Tokenizer, UserError, cached_encode, collate, encode_sft_rows,
                  gsm8k_answer, load_splits)
from losses import sequence_logprobs, sft_loss
from model import GPT, GPTConfig, logprobs_from_logits

# -----------------------------------------------------------------------------------------------------------
# default config: the embedded task's recipe, about 1.5 minutes on a 2-core CPU
out_dir = "out/sft"
seed = 1
device = "auto"           # 'auto' = cuda if available, else cpu; or 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = "auto"            # 'auto' = bfloat16 on CUDA when supported, else float32; or 'float32', 'bfloat16'
compile = None            # torch.compile: None = on with CUDA, off on a CPU (where it costs ~30 s up front
                          # for a small speed-up); True / False to choose
fsdp = False              # torchrun only: shard parameters, gradients and optimizer state with FSDP2
eval_interval = 200
log_interval = 50
init_from = "scratch"     # 'scratch', 'resume' (continue from out_dir/ckpt.pt exactly), or GPT-2 weights:
                          # 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl' (needs transformers, tokenizer='gpt2')
checkpoint_interval = 0   # also checkpoint every N iters (0: only at the end)
always_save_checkpoint = False  # also checkpoint at every evaluation
keep_last = 1             # > 1: keep the newest K checkpoints as ckpt_<iter>.pt besides ckpt.pt
# data: the embedded task, or a dataset (README: "Your own data")
dataset = ""              # '' = the embedded addition task; else a hub name (e.g. 'openai/gsm8k:main') or a
                          # local .jsonl / .json / .parquet file
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
# -----------------------------------------------------------------------------------------------------------
config = apply_overrides(globals())
common.check_config(config)  # nonsense values (batch_size=0, ...) stop here, in one line
# -----------------------------------------------------------------------------------------------------------

t_start = time.time()
rt = common.setup_runtime(device, dtype, seed, fsdp)
if compile is None:  # decided now that the device is known, and recorded with the run
    compile = config["compile"] = rt.device_type == "cuda"
if init_from == "resume":  # the run in out_dir: as in nanoGPT, the model's shape (and tokenizer) come from it
    run_path, run_ckpt = common.load_run_checkpoint(out_dir)
    shape = {k: run_ckpt["model_args"].get(k) for k in ("n_layer", "n_head", "n_embd", "block_size", "bias")}
    common.keep_checkpoint_settings(config, dict(shape, tokenizer=run_ckpt["tokenizer"]), run_path)
    tokenizer, block_size = config["tokenizer"], config["block_size"]  # the data depend on these two
tok = Tokenizer(tokenizer)

# the demonstrations, as token ids: the embedded task's imperfect ones, or a dataset's
eval_rows = []
if dataset:
    rows, eval_rows, report = load_splits(dataset, "sft", dataset_format, dataset_split, eval_dataset, eval_split,
                                          skip_bad_rows)
    # solutions with a checkable final answer (GSM8K) also give a held-out task_accuracy
    checkable = eval_rows and all(gsm8k_answer(r["response"]) is not None for r in eval_rows[:n_eval])
    task = AnswerTask(rows, eval_rows, n_eval) if checkable else None
    if rt.master:
        print(report)
else:
    task = AdditionTask(n_digits, n_eval, task_seed)
    rows, n_wrong = task.sft_rows(slip_prob, seed)
    if rt.master:
        print(f"SFT data: {len(rows)} demonstrations ({n_wrong} = {n_wrong / len(rows):.1%} with a wrong "
              f"answer), {len(task.eval_prompts)} held-out problems")
# a dataset's token ids are cached on disk (data.cached_encode): a second run does not tokenise again
train_data, skipped = cached_encode(encode_sft_rows, rows, tok, block_size, dataset or "embedded task", bool(dataset))
eval_data, eval_skipped = cached_encode(encode_sft_rows, eval_rows[:n_eval], tok, block_size,
                                        eval_dataset or dataset, bool(dataset))
if rt.master and skipped.total():
    print(f"skipped {skipped.total()} training rows: {skipped}")
if rt.master and eval_skipped.total():
    print(f"skipped {eval_skipped.total()} held-out rows: {eval_skipped}")

if init_from.startswith("gpt2"):
    if tokenizer != "gpt2":
        raise UserError(f"init_from='{init_from}' needs tokenizer='gpt2', not '{tokenizer}'")
    try:  # transformers is optional, and the weights come from the hub (or its local cache)
        model = GPT.from_hf_gpt2(init_from, block_size=block_size, dropout=dropout).to(rt.device)
    except (ImportError, OSError) as e:
        raise UserError(f"could not load GPT-2 weights '{init_from}' (pip install transformers; needs the hub or its "
                        f"cache): {type(e).__name__}: {str(e).strip().splitlines()[0][:160]}") from None
elif init_from == "scratch":
    model = GPT(GPTConfig(block_size=block_size, vocab_size=tok.n_vocab, n_layer=n_layer, n_head=n_head,
                          n_embd=n_embd, dropout=dropout, bias=bias)).to(rt.device)
elif init_from == "resume":
    model = common.model_from_checkpoint(run_ckpt, run_path, dropout=dropout).to(rt.device)
else:
    raise UserError(f"unknown init_from '{init_from}': expected 'scratch', 'resume' or a GPT-2 name ('gpt2', ...)")
if rt.master:
    print(f"model: {model.get_num_params() / 1e6:.2f}M parameters")
train_model = common.prepare_for_training(model, rt, compile)
optimizer = common.configure_optimizer(model, weight_decay, learning_rate, (beta1, beta2), rt.device_type)
scaler = common.grad_scaler(rt)
order = BatchOrder(len(train_data), seed)
start_iter, nonfinite_skipped = 0, 0
if init_from == "resume":  # continue the run in out_dir exactly where its last checkpoint left it
    start_iter = common.resume_state(run_ckpt, model, optimizer, order, scaler, run_path, rt)
    nonfinite_skipped = run_ckpt.get("nonfinite_skipped", 0)
    if rt.master:
        print(f"resuming {run_path} from iter {start_iter}")


def make_batch(indices, data=train_data):
    """Rows `indices` of `data` -> a right-padded batch on the device: idx, targets, mask (B, T), and the
    token and FLOP counts for the stdout line."""
    rows = [data[i] for i in indices]
    T = max(len(p) + len(r) for p, r in rows) - 1
    idx, targets, mask = collate(rows, tok.pad_id, common.padded_length(T, block_size, compile))
    return {"idx": idx.to(rt.device), "targets": targets.to(rt.device), "mask": mask.to(rt.device),
            "n_tokens": sum(len(p) + len(r) - 1 for p, r in rows),
            "flops": idx.numel() * model.flops_per_token(idx.size(1))}  # every (padded) position is computed


def target_tokens(indices, data=train_data):
    """Response tokens + EOS of rows `indices`: what compute_loss's loss is a mean over. train_loop and
    evaluate_loss weight each micro-batch by them, so a step's loss is the mean over all of its tokens whatever
    the split over micro-batches and ranks (a mean of per-micro-batch means would not be)."""
    return sum(len(data[i][1]) for i in indices)


def compute_loss(batch, run_model=None):
    """Mean negative log-likelihood per response token (prompt and padding are masked out). run_model: what to
    run instead of train_model (evaluation runs the plain module: no compiled graphs for its shapes)."""
    logits, _ = (run_model or train_model)(batch["idx"])  # training: the DDP / compile wrapper, so gradients sync
    logps, n_tokens = sequence_logprobs(logprobs_from_logits(logits, batch["targets"]), batch["mask"])
    return sft_loss(logps, n_tokens), {}  # a fully masked batch gives 0, not 0/0


def evaluate():
    """Held-out task_accuracy (embedded task, GSM8K) and/or eval_loss (held-out rows of a dataset)."""
    results = {"task_accuracy": common.evaluate_task(model, task, tok, rt)} if task is not None else {}
    if eval_data:  # held-out NLL per response token
        results.update(common.evaluate_loss(model, lambda batch: compute_loss(batch, model), make_batch, eval_data,
                                            batch_size, rt, target_tokens))
    return results


results = common.train_loop(rt, train_model, optimizer, config, order, make_batch, compute_loss, evaluate,
                            describe=lambda r: "", tokenizer=tokenizer, start_iter=start_iter, scaler=scaler,
                            nonfinite_skipped=nonfinite_skipped, loss_weight=target_tokens)
if rt.master:
    print(f"SFT done: {common.summary(results)} in {time.time() - t_start:.0f} s, "
          f"peak RSS {common.peak_rss_mb():.0f} MB "
          f"-> {os.path.join(out_dir, 'ckpt.pt')}")
common.cleanup(rt)
