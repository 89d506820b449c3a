"""
Preference optimisation: load the SFT checkpoint into the policy, deep-copy it into a frozen reference, build
preference pairs (on the embedded task: the verified answer above the SFT model's own mistakes) and train the
policy with the loss chosen by --loss_type.

$ python dpo.py                                   # DPO on the embedded task, from out/sft/ckpt.pt
$ python dpo.py --beta=0.5 --out_dir=out/dpo_b05  # any setting below can be overridden
$ python dpo.py config/simpo.py                   # another loss with its own recipe (see config/)
$ python dpo.py --loss_type=sft                   # baseline: continued SFT on the chosen answers only
$ torchrun --standalone --nproc_per_node=2 dpo.py # DDP; the global batch stays the same
"""

import copy
import json
import os
import time

import torch

import common
from configurator import apply_overrides
from data import (AdditionTask, AnswerTask, BatchOrder, Tokenizer, UserError, cached_encode, collate, collate_pairs,
                  collate_prefix_shared, dataset_kind, encode_pair_rows, encode_sft_rows, load_splits,
                  prefix_shared_logps)
from losses import (average_logprobs, dpo_loss, hinge_loss, ipo_loss, kto_loss, kto_mismatched_indices,
                    orpo_loss, sequence_logprobs, sft_loss, simpo_loss)
from model import FLEX_AVAILABLE, GPT, GPTConfig, block_mask, logprobs_from_logits

# -----------------------------------------------------------------------------------------------------------
# default config: DPO on the embedded task, well under a minute on a 2-core CPU
out_dir = "out/dpo"
init_from = "sft"         # 'sft' (sft_ckpt), 'resume' (out_dir/ckpt.pt), or 'scratch' (reference-free losses only)
sft_ckpt = "out/sft/ckpt.pt"
seed = 1
device = "auto"
dtype = "auto"
compile = None            # torch.compile: None = on with CUDA, off on a CPU; True / False to choose
fsdp = False              # torchrun only: shard parameters, gradients and optimizer state with FSDP2
eval_interval = 50
log_interval = 10
checkpoint_interval = 0
always_save_checkpoint = False
keep_last = 1
# the objective
loss_type = "dpo"         # dpo | ipo | hinge | simpo | orpo | kto | sft (see losses.py and the README)
beta = 1.0                # dpo/ipo/hinge/kto: KL strength (larger = closer to the reference); simpo: reward
                          # scale; orpo: lambda, the weight of the odds-ratio term (as in TRL)
label_smoothing = 0.0     # dpo: > 0 gives conservative DPO (assumed probability that a label is flipped)
simpo_gamma = 0.5         # simpo: target reward margin
desirable_weight = 1.0    # kto: weights of desirable / undesirable examples
undesirable_weight = 1.0
reference_free = False    # dpo/ipo/hinge against a uniform reference (reference log-probs 0): no reference model
rpo_alpha = 0.0           # > 0: add rpo_alpha * NLL of the chosen response to a pairwise loss (RPO)
precompute_ref = False    # one no-grad pass computes the reference log-probs, then the reference is freed
prefix_sharing = False    # one row [prompt | chosen | rejected] per pair: the shared prompt is computed once
attention = "auto"        # prefix-shared rows: 'flex' (FlexAttention), 'sdpa' (boolean mask), 'auto' = flex on CUDA
# data: the embedded task (default), or a dataset (README: "Your own data")
dataset = ""              # '' = pairs built on the embedded task; else a hub name or a local .jsonl/.json/.parquet
                          # of pairs (trl, hh, ultrafeedback, ...), unpaired kto rows, or solutions (gsm8k)
dataset_format = ""       # '' = detect from the columns
dataset_split = "train"   # ultrafeedback_binarized: 'train_prefs'
eval_dataset = ""         # held-out rows from a file of their own (a local file has one split)...
eval_split = ""           # ...else from this split of `dataset` ('test_prefs', 'test'); '' = none
skip_bad_rows = False     # count and skip malformed rows instead of stopping at the first
# pairs built on the embedded task or a dataset of solutions (task settings come from the SFT checkpoint)
n_pairs = 2000            # training prompts that get a pair
n_samples = 2             # samples per prompt (temperature below) looked at when the greedy answer is right
sample_temperature = 1.0
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
# -----------------------------------------------------------------------------------------------------------
config = apply_overrides(globals())
common.check_config(config)  # nonsense values (batch_size=0, ...) stop here, in one line
# -----------------------------------------------------------------------------------------------------------
LOSS_TYPES = ("dpo", "ipo", "hinge", "simpo", "orpo", "kto", "sft")
if loss_type not in LOSS_TYPES:
    raise UserError(f"unknown loss_type '{loss_type}': expected one of {', '.join(LOSS_TYPES)}")
if init_from not in ("sft", "resume", "scratch"):
    raise UserError(f"unknown init_from '{init_from}': expected 'sft', 'resume' or 'scratch'")
# simpo, orpo and sft never look at a reference; dpo/ipo/hinge skip it with --reference_free
needs_reference = loss_type in ("dpo", "ipo", "hinge", "kto") and not (reference_free and loss_type != "kto")
if reference_free and loss_type not in ("dpo", "ipo", "hinge"):
    raise UserError(f"reference_free applies to dpo, ipo and hinge, not '{loss_type}'")
if precompute_ref and loss_type == "kto":
    raise UserError("precompute_ref is not available for kto: its KL term pairs completions across each batch")
if rpo_alpha > 0 and loss_type not in ("dpo", "ipo", "hinge", "simpo"):
    raise UserError(f"rpo_alpha adds an NLL term to dpo, ipo, hinge or simpo, not to '{loss_type}'"
                    + (" (orpo has one already)" if loss_type == "orpo" else ""))
if label_smoothing > 0 and loss_type != "dpo":
    raise UserError(f"label_smoothing (conservative DPO) applies to dpo only, not to '{loss_type}'")

t_start = time.time()
rt = common.setup_runtime(device, dtype, seed, fsdp)
if loss_type == "kto" and common.micro_batches(batch_size, gradient_accumulation_steps, rt.world_size)[1] < 2:
    raise UserError(f"kto needs micro-batches of >= 2 rows on each process (its KL estimate pairs each prompt with "
                    f"another row's completion): batch_size={batch_size} gives 1")
if compile is None:  # decided now that the device is known, and recorded with the run
    compile = config["compile"] = rt.device_type == "cuda"
if attention not in ("auto", "flex", "sdpa"):
    raise UserError(f"unknown attention '{attention}': expected 'auto', 'flex' or 'sdpa'")
if attention == "flex" and (not FLEX_AVAILABLE or rt.device_type != "cuda"):
    raise UserError("attention='flex' needs a CUDA GPU and torch >= 2.5 (FlexAttention has no backward on a CPU)")
use_flex = prefix_sharing and FLEX_AVAILABLE and (attention == "flex" or
                                                  (attention == "auto" and rt.device_type == "cuda"))

# 1. the models: policy = the SFT model (or a fresh one), reference = a frozen copy of it
from_scratch = init_from == "scratch"
if init_from == "resume":  # the run's own checkpoint names the SFT checkpoint its reference came from
    run_path, run_ckpt = common.load_run_checkpoint(out_dir)
    run_config = run_ckpt["config"]
    if "sft_ckpt" not in run_config:
        raise UserError(f"{run_path} was not written by dpo.py (its config names no sft_ckpt): point --out_dir "
                        "at a dpo.py run to resume it")
    # written back into config: this run's checkpoints must name it too, for the next resume
    sft_ckpt = config["sft_ckpt"] = run_config["sft_ckpt"]
    from_scratch = not sft_ckpt or run_config.get("init_from") == "scratch"
if from_scratch:
    if needs_reference:
        raise UserError(f"a run from init_from='scratch' has no reference model for '{loss_type}': use orpo, simpo, "
                        "sft or --reference_free=True")
    sft_ckpt = config["sft_ckpt"] = ""  # there is none (and a resume reads it so)
    if init_from == "resume":  # the model's shape, tokenizer and task are the run's own
        own = {k: run_config.get(k) for k in ("n_layer", "n_head", "n_embd", "block_size", "n_digits", "n_eval",
                                              "task_seed")}
        common.keep_checkpoint_settings(config, dict(own, tokenizer=run_ckpt["tokenizer"]), run_path)
        tokenizer, n_digits, n_eval, task_seed = (config[k] for k in ("tokenizer", "n_digits", "n_eval", "task_seed"))
        policy = common.model_from_checkpoint(run_ckpt, run_path, dropout=0.0)  # resume_state loads it again
    tok = Tokenizer(tokenizer)
    if init_from == "scratch":
        policy = GPT(GPTConfig(block_size=block_size, vocab_size=tok.n_vocab, n_layer=n_layer, n_head=n_head,
                               n_embd=n_embd, dropout=0.0))
    task = AdditionTask(n_digits, n_eval, task_seed)
    start_accuracy = None
else:
    ckpt = common.load_checkpoint(sft_ckpt)
    tok = Tokenizer(ckpt["tokenizer"])
    # dropout off: log-probs must be deterministic, and the policy must equal the reference at step 0
    policy = common.model_from_checkpoint(ckpt, sft_ckpt, dropout=0.0)
    task = AdditionTask(ckpt["config"]["n_digits"], ckpt["config"]["n_eval"], ckpt["config"]["task_seed"])
    start_accuracy = ckpt.get("task_accuracy")
policy.to(rt.device)
reference = None
if needs_reference:
    reference = copy.deepcopy(policy)
    reference.eval()
    reference.requires_grad_(False)
block_size = policy.config.block_size


# 2. the data. The embedded task (or a dataset of checkable solutions such as GSM8K): the verified answer
# (chosen) over the SFT model's own mistake (rejected), sampled now from the policy, which is still the SFT model.
# A preference dataset: its pairs as published. KTO: unpaired rows (a pair gives one of each label).
def generate_fn(prompts, temperature, _g=torch.Generator(device=rt.device).manual_seed(seed)):
    """Completions (text) of the policy -- still the SFT model when pairs are built -- greedy or sampled."""
    policy.eval()
    outs = []
    for i in range(0, len(prompts), 500):
        with rt.autocast():
            outs += policy.generate([tok.encode(p) for p in prompts[i:i + 500]], task.max_new_tokens, tok.eos_id,
                                    tok.pad_id, temperature=temperature, generator=_g)
    policy.train()
    return [tok.decode(o) for o in outs]


eval_rows = []
kind = dataset_kind(dataset, dataset_split, dataset_format or None) if dataset else "task"
if kind == "sft":  # solutions with a checkable final answer: on-policy pairs, as for the embedded task
    solutions, eval_solutions, report = load_splits(dataset, "sft", dataset_format, dataset_split, eval_dataset,
                                                    eval_split, skip_bad_rows)
    task = AnswerTask(solutions, eval_solutions, n_eval)
    kind = "task"
if kind == "task":
    rows, sources = task.build_pairs(None if from_scratch else generate_fn, n_pairs, n_samples,
                                     sample_temperature, seed)
    report = "pairs: rejected answers from " + ", ".join(f"{n} {k}" for k, n in sources.items() if n)
else:
    if kind == "kto" and loss_type != "kto":
        raise UserError(f"{dataset} holds unpaired (kto) rows: use --loss_type=kto")
    task = None  # no verifier: evaluation reports held-out preference metrics instead
    rows, eval_rows, report = load_splits(dataset, "kto" if loss_type == "kto" else "pairs", dataset_format,
                                          dataset_split, eval_dataset, eval_split, skip_bad_rows)


def encode(rows, source, cache):
    """Rows -> token ids and a SkipCounter: (prompt, chosen, rejected) pairs, or for kto (prompt, completion,
    desirable) examples: unpaired rows as labelled, each pair as a desirable chosen and an undesirable rejected.
    A dataset's token ids are cached on disk (data.cached_encode); on-policy pairs are new every run."""
    if loss_type == "kto" and rows and "label" in rows[0]:
        # encoded per label, so a skipped row cannot shift the labels of the others
        good, skipped = encode_sft_rows([{"prompt": r["prompt"], "response": r["completion"]} for r in rows
                                         if r["label"]], tok, block_size, source=source)
        bad, skipped_bad = encode_sft_rows([{"prompt": r["prompt"], "response": r["completion"]} for r in rows
                                            if not r["label"]], tok, block_size, source=source)
        skipped.add_all(skipped_bad)
        return [(p, y, True) for p, y in good] + [(p, y, False) for p, y in bad], skipped
    pairs, skipped = cached_encode(encode_pair_rows, rows, tok, block_size, source, cache)
    if loss_type == "kto":
        return [(p, c, True) for p, c, _ in pairs] + [(p, r, False) for p, _, r in pairs], skipped
    return pairs, skipped


train_data, skipped = encode(rows, dataset or "embedded task pairs", kind == "pairs")
eval_data, eval_skipped = encode(eval_rows[:n_eval], eval_dataset or dataset, bool(eval_rows))
if loss_type == "kto" and len(eval_data) == 1:
    raise UserError("kto needs at least 2 held-out rows (its KL estimate pairs each row with another): got 1")
if rt.master:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "pairs.jsonl"), "w") as f:  # to read what the model is taught
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"{report}; {len(train_data)} training rows, skipped: {skipped}"
          + (f"; {len(eval_data)} held-out rows, skipped: {eval_skipped}" if eval_rows else ""))
if loss_type == "kto":
    n_good = sum(label for _, _, label in train_data)
    ratio = desirable_weight * n_good / max(undesirable_weight * (len(train_data) - n_good), 1e-9)
    if rt.master and not 1.0 <= ratio <= 4 / 3:
        print(f"warning: desirable_weight * n_desirable / (undesirable_weight * n_undesirable) = {ratio:.2f}, "
              "outside the KTO paper's recommended [1, 4/3]")


def concatenated_logps(model, pairs):
    """One forward over chosen and rejected together (2B rows) -> summed log-probs and token counts, (B,) each.
    With prefix_sharing, one packed row [prompt | chosen | rejected] per pair instead (B rows, the prompt run
    once; data.collate_prefix_shared draws the mask that keeps the branches apart): the same log-probs."""
    if prefix_sharing:
        T = max(len(p) + len(c) + len(r) - 2 for p, c, r in pairs)
        batch = {k: v.to(rt.device) for k, v in collate_prefix_shared(
            pairs, tok.pad_id, common.padded_length(T, 2 * block_size, compile)).items()}
        mask = block_mask(batch["attn_mask"]) if use_flex else batch["attn_mask"]
        logits, _ = model(batch["idx"], pos=batch["pos"], attn_mask=mask)
        return prefix_shared_logps(logits, batch)
    T = max(len(p) + max(len(c), len(r)) for p, c, r in pairs) - 1
    idx, targets, mask = collate_pairs(pairs, tok.pad_id, common.padded_length(T, block_size, compile))
    logits, _ = model(idx.to(rt.device))
    logps, n_tokens = sequence_logprobs(logprobs_from_logits(logits, targets.to(rt.device)), mask.to(rt.device))
    B = len(pairs)
    return logps[:B], logps[B:], n_tokens[:B], n_tokens[B:]


def sequence_logps(model, seqs):
    """Summed log-probs of [(prompt_ids, response_ids)] rows (KTO's unpaired examples), (B,)."""
    T = max(len(p) + len(r) for p, r in seqs) - 1
    idx, targets, mask = collate(seqs, tok.pad_id, common.padded_length(T, block_size, compile))
    logits, _ = model(idx.to(rt.device))
    return sequence_logprobs(logprobs_from_logits(logits, targets.to(rt.device)), mask.to(rt.device))[0]


# 3. optionally: the reference's log-probs once, up front (training and held-out pairs), then no reference model
@torch.no_grad()
def reference_table(data):
    """(N, 2) summed reference log-probs of every pair in `data`: [:, 0] chosen, [:, 1] rejected."""
    table = torch.zeros(len(data), 2)
    for i in range(0, len(data), batch_size):
        with rt.autocast():
            rc, rr, _, _ = concatenated_logps(reference, data[i:i + batch_size])
        table[i:i + batch_size] = torch.stack([rc, rr], dim=1).float().cpu()
    return table


ref_tables = {}  # id(data) -> table, for the training and the held-out pairs
if precompute_ref and reference is not None:
    ref_tables = {id(train_data): reference_table(train_data), id(eval_data): reference_table(eval_data)}
    reference = None  # freed: training now holds one model
    if rt.master:
        print(f"precomputed reference log-probs for {len(train_data)} + {len(eval_data)} pairs; reference freed")

train_model = common.prepare_for_training(policy, rt, compile)  # only the policy is DDP-wrapped
optimizer = common.configure_optimizer(policy, weight_decay, learning_rate, (beta1, beta2), rt.device_type)
ref_model = reference
if reference is not None and fsdp:  # sharded too: the point of FSDP is two models that do not fit one GPU
    common.shard(reference)
if reference is not None and compile:  # compiled on its own: it only ever runs forward under no_grad
    ref_model = torch.compile(reference, dynamic=False)
scaler = common.grad_scaler(rt)
order = BatchOrder(len(train_data), seed)
start_iter, nonfinite_skipped = 0, 0
if init_from == "resume":  # (run_ckpt was read in step 1)
    if run_ckpt.get("tokenizer") != tok.name:
        raise UserError(f"{run_path} was trained with tokenizer '{run_ckpt.get('tokenizer')}', its SFT checkpoint "
                        f"with '{tok.name}'")
    start_iter = common.resume_state(run_ckpt, policy, optimizer, order, scaler, run_path, rt)
    nonfinite_skipped = run_ckpt.get("nonfinite_skipped", 0)
    if rt.master:
        print(f"resuming {run_path} from iter {start_iter}")
if rt.master:
    n_models = 1 + (reference is not None)
    print(f"loss_type {loss_type}: {n_models} model(s) in memory, {len(train_data)} training rows")


def make_batch(indices, data=train_data):
    """Rows `indices` of `data` (pairs, or KTO rows) and their precomputed reference log-probs if any; the
    rows are collated later, for each model, by concatenated_logps / sequence_logps."""
    batch = {"rows": [data[i] for i in indices]}
    if id(data) in ref_tables:
        batch["ref_logps"] = ref_tables[id(data)][indices].to(rt.device)  # (B, 2)
    batch["n_tokens"] = sum(len(row[0]) + len(row[1]) - 1 for row in batch["rows"])
    if loss_type != "kto":
        batch["n_tokens"] += sum(len(p) + len(r) - 1 for p, _, r in batch["rows"])
    batch["flops"] = step_flops(batch["rows"], "ref_logps" not in batch and reference is not None)
    return batch


def step_flops(rows, live_reference):
    """Model FLOPs of one micro-batch, counted over the padded rows the forwards run (for the MFU on stdout)."""
    fpt = policy.flops_per_token
    if loss_type == "kto":  # policy fwd+bwd on B rows and fwd on B mismatched rows; reference fwd on both
        T = max(len(p) + len(y) for p, y, _ in rows) - 1
        n = len(rows) * T
        return n * (fpt(T) + fpt(T, False) + (2 * fpt(T, False) if live_reference else 0))
    if prefix_sharing:
        n_rows, T = len(rows), max(len(p) + len(c) + len(r) - 2 for p, c, r in rows)
    else:
        n_rows, T = 2 * len(rows), max(len(p) + max(len(c), len(r)) for p, c, r in rows) - 1
    return n_rows * T * (fpt(T) + (fpt(T, False) if live_reference else 0))


def reward_metrics(chosen_rewards, rejected_rewards):
    """TRL's rewards/* metrics of a micro-batch."""
    return {"rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean()}


def kto_step(rows, policy_model, reference_model):
    """KTO on a micro-batch of unpaired rows; the KL reference point uses mismatched (prompt, completion) pairs."""
    seqs = [(p, y) for p, y, _ in rows]
    shifted = kto_mismatched_indices(len(rows))
    # prompt i with completion j, cut to fit block_size as the matched rows were (a long prompt with another row's
    # long completion would not fit; a prompt leaves room for at least one completion token)
    kl_seqs = [(seqs[i][0], seqs[j][1][:block_size + 1 - len(seqs[i][0])]) for i, j in enumerate(shifted)]
    desirable = torch.tensor([label for _, _, label in rows], device=rt.device)
    policy_logps = sequence_logps(policy_model, seqs)
    with torch.no_grad():
        policy_kl_logps = sequence_logps(policy_model, kl_seqs)
        ref_all = sequence_logps(reference_model, seqs + kl_seqs)
    ref_logps_, ref_kl_logps = ref_all[:len(rows)], ref_all[len(rows):]
    kl_reduce = (lambda kl: common.all_reduce_sum(kl.clone(), rt) / rt.world_size) if rt.ddp else None
    loss, rewards, kl = kto_loss(policy_logps, ref_logps_, desirable, policy_kl_logps, ref_kl_logps, beta,
                                 desirable_weight, undesirable_weight, kl_reduce)
    n_good, n_bad = desirable.sum().clamp(min=1), (~desirable).sum().clamp(min=1)
    # per-group means within the micro-batch (a group absent from it counts as 0)
    return loss, {"rewards/chosen": (rewards * desirable).sum() / n_good,
                  "rewards/rejected": (rewards * ~desirable).sum() / n_bad,
                  "logps/chosen": (policy_logps.detach() * desirable).sum() / n_good,
                  "logps/rejected": (policy_logps.detach() * ~desirable).sum() / n_bad, "kl": kl}


def compute_loss(batch, models=None):
    """The micro-batch's loss for --loss_type and its metrics (TRL's names): policy forward with gradients,
    reference forward under no_grad (or its precomputed log-probs, or none). models: (policy, reference) to run
    instead of the training wrappers (evaluation runs the plain modules: no compiled graphs for its shapes)."""
    rows = batch["rows"]
    policy_model, reference_model = models or (train_model, ref_model)
    if loss_type == "kto":
        return kto_step(rows, policy_model, reference_model)
    pc, pr, nc, nr = concatenated_logps(policy_model, rows)  # summed log-probs of chosen / rejected, (B,)
    metrics = {"logps/chosen": pc.detach().mean(), "logps/rejected": pr.detach().mean()}
    if "ref_logps" in batch:
        rc, rr = batch["ref_logps"][:, 0], batch["ref_logps"][:, 1]
    elif reference is not None:
        with torch.no_grad():
            rc, rr, _, _ = concatenated_logps(reference_model, rows)
    else:  # reference-free: a uniform reference, log-probs 0
        rc, rr = torch.zeros_like(pc), torch.zeros_like(pr)
    nll = sft_loss(pc, nc)
    if loss_type == "sft":
        return nll, {**metrics, "nll_loss": nll.detach()}
    if loss_type == "dpo":
        loss, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta, label_smoothing)
    elif loss_type == "hinge":
        loss, chosen_rewards, rejected_rewards = hinge_loss(pc, pr, rc, rr, beta)
    elif loss_type == "ipo":  # IPO's target margin is per token: it takes average log-probs (see losses.py)
        loss, chosen_rewards, rejected_rewards = ipo_loss(
            average_logprobs(pc, nc), average_logprobs(pr, nr), average_logprobs(rc, nc), average_logprobs(rr, nr),
            beta)
    elif loss_type == "simpo":
        loss, chosen_rewards, rejected_rewards = simpo_loss(average_logprobs(pc, nc), average_logprobs(pr, nr),
                                                            beta, simpo_gamma)
    else:  # orpo
        loss, chosen_rewards, rejected_rewards, log_odds_ratio, log_odds_chosen = orpo_loss(
            average_logprobs(pc, nc), average_logprobs(pr, nr), nll, beta)
        metrics.update({"nll_loss": nll.detach(), "log_odds_ratio": log_odds_ratio,
                        "log_odds_chosen": log_odds_chosen})
    if rpo_alpha > 0:
        loss = loss + rpo_alpha * nll
        metrics["nll_loss"] = nll.detach()
    return loss, {**metrics, **reward_metrics(chosen_rewards, rejected_rewards)}


def describe(r):
    if "rewards/margins" not in r:
        return ""
    return (f", rewards/chosen {r['rewards/chosen']:+.3f}, rewards/rejected {r['rewards/rejected']:+.3f}, "
            f"margins {r['rewards/margins']:+.3f}, accuracies {r['rewards/accuracies']:.2f}")


def evaluate():
    """Held-out task_accuracy (embedded task, GSM8K) and/or eval_loss, eval_rewards/... (held-out pairs)."""
    results = {"task_accuracy": common.evaluate_task(policy, task, tok, rt)} if task is not None else {}
    if eval_data:  # held-out preference metrics: eval_loss, eval_rewards/accuracies, ...
        results.update(common.evaluate_loss(policy, lambda batch: compute_loss(batch, (policy, reference)),
                                            make_batch, eval_data, batch_size, rt))
    return results


results = common.train_loop(rt, train_model, optimizer, config, order, make_batch, compute_loss, evaluate,
                            describe, tok.name, start_iter, scaler, ckpt_extra={"sft_ckpt": sft_ckpt},
                            nonfinite_skipped=nonfinite_skipped)
if rt.master:
    summary = common.summary(results)
    if start_accuracy is not None and "task_accuracy" in results:  # "task_accuracy 45.3% (SFT) -> 79.3%, ..."
        summary = f"held-out task_accuracy {start_accuracy:.1%} (SFT) -> " + summary[len("held-out task_accuracy "):]
    print(f"{loss_type.upper()} done: {summary} in {time.time() - t_start:.0f} s, "
          f"peak RSS {common.peak_rss_mb():.0f} MB "
          f"-> {os.path.join(out_dir, 'ckpt.pt')}")
common.cleanup(rt)
