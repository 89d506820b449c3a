"""
Preference optimisation. Load the SFT checkpoint into the policy, deep-copy it into a frozen
reference, build preference pairs, and train the policy on them with the loss that --loss_type
names.

$ python dpo.py                           # DPO on the embedded task, out/sft/ckpt.pt -> out/dpo
$ python dpo.py --loss_type=ipo           # another loss; each writes a folder of its own (out/ipo)
$ python dpo.py config/simpo.py           # a loss with its own recipe (see config/)
$ python dpo.py --loss_type=sft           # the honest baseline: continued SFT on the chosen answers
$ python dpo.py config/lora.py            # LoRA: the reference is the policy without its adapters
$ python dpo.py --loss_type=dpo+bco+sft --loss_weights=0.8,0.2,1.0   # a weighted sum (MPO)
$ python dpo.py --report_to=tensorboard   # also to TensorBoard (or wandb, trackio)
$ python dpo.py --packing=True            # pairs end to end in a row, no padding (data.pack)
$ torchrun --standalone --nproc_per_node=2 dpo.py    # DDP; the global batch stays the same

Top to bottom: the settings; 1. the policy and its frozen copy, the reference; 2. the pairs; 3. the
log-probs of a batch, and where the reference's come from; 4. the loss of a micro-batch
(compute_loss); 5. the training loop; the summary line. SIGTERM or Ctrl-C during training saves a
checkpoint after the current step; --init_from=resume continues exactly.
"""

import os

# Before torch loads OpenMP: a thread that finishes its share of an op early should spin briefly,
# then sleep. OpenMP's long default spin is slower on an idle CPU, and 2.7x slower beside a busy
# process (docs/scale_and_speed.md, "CPU threads").
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")

import copy  # noqa: E402  (the imports below load torch)
import time

import torch

import losses
from configurator import apply_overrides, check_config, install_error_handler
from data import BatchOrder, Tokenizer, check_pack_tokens, check_rows_fit, encode_pair_rows
from logprobs import (Packing, average_logps, concatenated_logps, concatenated_tokens,
                      logprob_path, logps_table, packed_logps, prefix_shared_logps,
                      prefix_shared_tokens)
from nanopo import checkpoint, kto, runtime
from nanopo.formats import cached_encode, dataset_kind, load_splits, write_jsonl
from nanopo.logger import (Logger, Trackers, check_report_to, model_flops_per_token, peak_rss_mb,
                           summary)
from nanopo.tasks import (AdditionTask, AnswerTask, complete, evaluate_loss, evaluate_task,
                          judged_pairs)

# bad input ends the run with one line, not a traceback
install_error_handler()
# --------------------------------------------------------------------------------------------------
# default config: DPO on the embedded task, well under a minute on a 2-core CPU
out_dir = ""              # '' = out/<loss_type> (out/sft_chosen for sft)
init_from = "sft"         # 'sft' (sft_ckpt), 'resume' (out_dir/ckpt.pt), 'scratch' (no reference)
sft_ckpt = "out/sft/ckpt.pt"
seed = 1
device = "auto"
dtype = "auto"
compile = None            # torch.compile: None = on with CUDA, off on a CPU; True / False to choose
fsdp = False              # torchrun only: shard parameters, gradients, optimizer state (FSDP2)
threads = 0               # CPU threads (torch.set_num_threads); 0 = torch's default, one per core
eval_interval = 50
log_interval = 10
checkpoint_interval = 0
always_save_checkpoint = False
keep_last = 1
# experiment trackers (nanopo/trackers.py): they get what metrics.jsonl gets
report_to = "none"        # 'wandb', 'tensorboard' or 'trackio', comma-separated for several
run_name = ""             # the run's name in the trackers; '' = out_dir
project = "nanopo"        # the wandb / trackio project
# the loss
loss_type = "dpo"         # dpo | ipo | simpo | orpo | kto | sft | ... (losses.LOSSES); a+b: a sum
loss_weights = ""         # a combination's weights, e.g. '0.8,0.2,1.0'; '' = all 1
beta = 1.0                # KL strength: larger = closer to the reference (TRL's 0.1 is weaker)
label_smoothing = 0.0     # dpo, robust, exo, aot: the assumed label-flip rate (dpo: cDPO)
simpo_gamma = 0.5         # simpo: target reward margin
discopop_tau = 0.05       # discopop: width of the switch between its logistic and exponential parts
bco_running_delta = True  # bco: reward shift = running mean of the rewards (paper); False: 0 (TRL)
f_divergence_type = "reverse_kl"  # dpo/ipo/hinge/robust/exo: the divergence behind the reward:
f_alpha_divergence_coef = 0.5     # reverse_kl (DPO), forward_kl, js, or alpha with this coefficient
use_weighting = False     # WPO: weight each pair by the policy's (per-token) probability of it
ld_alpha = 1.0            # LD-DPO: < 1 discounts the longer response's tokens past the shorter's
ref_sync_steps = 0        # TR-DPO: every N > 0 steps the reference becomes
ref_mixup_alpha = 0.6     # ref_mixup_alpha * policy + (1 - ref_mixup_alpha) * reference (TRL's 0.6)
desirable_weight = 1.0    # kto: weights of desirable / undesirable examples
undesirable_weight = 1.0
reference_free = False    # dpo/ipo/hinge/...: a uniform reference (log-probs 0), no reference model
rpo_alpha = 0.0           # > 0: add rpo_alpha * NLL of the chosen response to a pairwise loss (RPO)
precompute_ref = False    # one no-grad pass computes the reference log-probs, then frees the model
prefix_sharing = False    # one row [prompt | chosen | rejected] per pair: the prompt runs once
packing = False           # several pairs per row, end to end, no padding between them (data.pack)
pack_tokens = 0           # packing: tokens a row may hold; 0 = one row per micro-batch
attention = "auto"        # prefix-shared or packed rows: 'flex', 'sdpa'; 'auto': flex on CUDA
logprobs = "auto"         # 'chunked': LM head at response positions only; 'plain'; 'auto': by vocab
logprob_chunk = 1024      # chunked: logit rows at a time (memory ~ chunk x V x 4 B); 0: all, kept
# data: the embedded task (default), or a dataset (README: "Your own data")
dataset = ""              # '' = the embedded task; else a hub name or a .jsonl/.json/.parquet file
dataset_format = ""       # '' = detect from the columns
dataset_split = "train"   # ultrafeedback_binarized: 'train_prefs'
eval_dataset = ""         # held-out rows from a file of their own (a local file has one split)...
eval_split = ""           # ...else from this split of `dataset` ('test_prefs', 'test'); '' = none
skip_bad_rows = False     # count and skip malformed rows instead of stopping at the first
# pairs built on the embedded task or a dataset of solutions (the task comes with the checkpoint)
pairs = "verified"        # the correct answer over the model's own mistake; 'judged': by a judge
judge_temperature = 1.0   # judged: the judge's noise, P(y1 > y2) = sigmoid((r1 - r2) / temperature)
judge_reward = "log_error"  # judged: the judge's grade, 'log_error' (-log(1 + |error|)) or 'digits'
n_pairs = 2000            # training prompts that get a pair
n_samples = 2             # samples per prompt (at sample_temperature); verified: looked at when the
sample_temperature = 1.0  # greedy answer is right; judged: two distinct ones make the pair
ref_ckpt = ""             # '' = the reference is a copy of the starting policy; else this one
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
# bigger models on the same hardware (docs/lora_and_checkpointing.md)
lora_rank = 0             # > 0: train LoRA adapters only; the reference is the policy with them off
lora_alpha = 16.0         # the adapters' update is scaled by lora_alpha / lora_rank
lora_dropout = 0.0        # dropout on the adapters' input
lora_targets = "attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj"  # all four projections of every block
grad_checkpoint = False   # True: recompute blocks in backward; 'selective': LayerNorm/GELU only
# --------------------------------------------------------------------------------------------------
config = apply_overrides(globals())
# nonsense values (batch_size=0, ...) stop here, in one line, as does an option the loss ignores
check_config(config)
losses.check_loss_options(config)
# a tracker that is not installed stops the run now, not after the pairs are built
check_report_to(report_to)
# 'dpo' -> ['dpo'], [1.0]; 'dpo+sft' with loss_weights '0.8,1' -> ['dpo', 'sft'], [0.8, 1.0]
loss_names, loss_weights = losses.parse_loss_type(loss_type, loss_weights)
if not out_dir:
    # each loss writes a folder of its own, so one run never overwrites another loss's checkpoint
    out_dir = "out/sft_chosen" if loss_type == "sft" else f"out/{loss_type}"
    config["out_dir"] = out_dir
# --------------------------------------------------------------------------------------------------
t_start = time.time()
# where this process runs: its device and dtype, and its rank in a DDP job
process = runtime.setup(device, dtype, seed, fsdp, threads)
# a step's rows that cannot be split evenly over the ranks stop here
_, rows_per_micro_batch = runtime.micro_batches(batch_size, gradient_accumulation_steps,
                                                process.world_size)
if loss_type == "kto":
    # KTO pairs each prompt with another row's completion: a micro-batch needs two rows
    kto.check_micro_batch(rows_per_micro_batch)
if compile is None:
    compile = process.device_type == "cuda"
    config["compile"] = compile
use_flex = runtime.use_flex_attention(attention, prefix_sharing or packing, process)

# 1. the policy: the SFT model (or the run being resumed, or fresh weights), and the reference, a
# frozen copy of it. simpo, orpo and sft never use a reference, nor does --reference_free.
use_reference = losses.needs_reference(loss_type, reference_free)
# the SFT checkpoint, loaded strictly with dropout 0, so that log-probs are exact
start = checkpoint.dpo_start(config, use_reference)
# --lora_rank: only adapters train; --grad_checkpoint: blocks recomputed in backward
policy = runtime.prepare_model(start.policy.to(process.device), config, process)
tok = Tokenizer(start.tokenizer)
block_size = policy.config.block_size  # the checkpoint's
# (KTO's rows are never prefix-shared)
check_pack_tokens(pack_tokens, block_size, prefix_sharing and loss_type != "kto")
reference = None
if use_reference and lora_rank:
    # LoRA: the reference is the policy itself with its adapters switched off, no second copy
    reference = checkpoint.AdaptersOff(policy)
elif use_reference and ref_ckpt:
    # online rounds: the reference stays the SFT model; the policy starts from the last round
    reference = checkpoint.load_reference(ref_ckpt, start, process.device)
elif use_reference:
    reference = copy.deepcopy(policy)  # its own weights, which never change:
    reference.eval()                   # eval mode,
    reference.requires_grad_(False)    # no gradients, and no optimizer is ever given them


# 2. the pairs, as text. On the embedded task (or a dataset of checkable solutions such as GSM8K):
# the verified answer (chosen) over the SFT model's own mistake (rejected), sampled now from the
# policy, which is still the SFT model. From a preference dataset: its pairs as published.
t_pairs = time.time()  # what building the pairs costs, for summary.json (pairs_s)
task = None
eval_rows = []
if dataset and dataset_kind(dataset, dataset_split, dataset_format or None) != "sft":
    # a preference dataset has no verifier: evaluation reports held-out preference metrics instead
    split_kind = "kto" if loss_type == "kto" else "pairs"
    rows, eval_rows, report = load_splits(dataset, split_kind, dataset_format, dataset_split,
                                          eval_dataset, eval_split, skip_bad_rows)
else:
    # a task with a verifier: the embedded task, or solutions with a checkable number (GSM8K)
    if dataset:
        train_rows, held_out_rows, _ = load_splits(dataset, "sft", dataset_format, dataset_split,
                                                   eval_dataset, eval_split, skip_bad_rows)
        task = AnswerTask(train_rows, held_out_rows, n_eval)
    else:
        task = AdditionTask(**start.task, reward=judge_reward)
    sampler = torch.Generator(device=process.device).manual_seed(seed)

    def generate(prompts, temperature):
        """The policy's answers (text) to `prompts`, sampled at `temperature` (0: greedy)."""
        return complete(policy, prompts, tok, process, task.max_new_tokens, temperature=temperature,
                        label="building pairs, temperature {temperature}", generator=sampler)

    if pairs == "verified":
        # from scratch there is no model to sample mistakes from: the task makes them up
        sample = generate if start.sft_ckpt else None
        rows, sources = task.build_pairs(sample, n_pairs, n_samples, sample_temperature, seed)
    else:
        rows, sources = judged_pairs(task, generate, n_pairs, n_samples, sample_temperature,
                                     judge_temperature, seed, unpaired=loss_type == "kto")
    report = f"{pairs} pairs: " + ", ".join(f"{n} {k}" for k, n in sources.items() if n)
    # every rank sampled from the same weights with the same seed: check that they got the same rows
    runtime.check_same_on_all_ranks(rows, process)

# ... as token ids: pairs (prompt, chosen, rejected), or KTO's examples (prompt, completion,
# desirable). A dataset's are cached on disk; a model's own empty answer is an answer, so judged
# pairs allow it.
source = dataset or f"{pairs} pairs"
if loss_type == "kto":
    train_data, skipped = kto.encode(rows, tok, block_size, source, use_cache=task is None,
                                     allow_empty=pairs == "judged")
    eval_data, eval_skipped = kto.encode(eval_rows[:n_eval], tok, block_size,
                                         eval_dataset or dataset,
                                         use_cache=bool(eval_rows))
else:
    train_data, skipped = cached_encode(encode_pair_rows, rows, tok, block_size, source,
                                        use_cache=task is None, allow_empty=pairs == "judged")
    eval_data, eval_skipped = cached_encode(encode_pair_rows, eval_rows[:n_eval], tok, block_size,
                                            eval_dataset or dataset, use_cache=bool(eval_rows))
# Rows cut to fit block_size are counted. A dataset none of whose rows fits whole stops here; pairs
# built from a task may be cut (a model's own wrong answer can ramble to max_new_tokens).
if task is None:
    check_rows_fit(train_data, skipped, block_size, source)
if process.master:
    write_jsonl(os.path.join(out_dir, "pairs.jsonl"), rows)  # to read what the model is taught
    line = (f"{report}; {len(train_data)} training rows, skipped: {skipped}, "
            f"truncated: {skipped.truncated()}")
    if eval_rows:
        line += (f"; {len(eval_data)} held-out rows, skipped: {eval_skipped}, "
                 f"truncated: {eval_skipped.truncated()}")
    print(line)
pairs_s = time.time() - t_pairs

# 3. a model's log-probs of a batch of pairs (both models), and where the reference's come from
# --logprobs=auto: chunked for a large vocabulary (GPT-2's), plain for the embedded task's
logprob_kind = logprob_path(logprobs, policy.config.vocab_size)
# with compile, lengths are padded to a multiple of 16, so fewer shapes need a graph of their own
pad_multiple = 16 if compile else 1
# --packing: rows of at most pack_tokens tokens, attention by FlexAttention or model.Segments
row_packing = None
if packing:
    row_packing = Packing(pack_tokens, flex=use_flex)


def pair_logps(model, batch, wpo=False):
    """The model's summed log-probs of the pairs' chosen and rejected responses (response tokens and
    EOS), and their token counts: (chosen_logps, rejected_logps, chosen_n, rejected_n), (B,) each.
    With wpo, a fifth: each pair's WPO weight. LD-DPO (--ld_alpha < 1) discounts both models' long
    tails."""
    if packing:
        # several pairs per row, end to end, no padding between them (data.pack draws a row); with
        # prefix_sharing, each pair is one [prompt | chosen | rejected] segment
        return packed_logps(model, batch, tok.pad_id, block_size, process.device, pad_multiple,
                            packing=row_packing, prefix_sharing=prefix_sharing,
                            logprobs=logprob_kind, chunk=logprob_chunk, ld_alpha=ld_alpha, wpo=wpo)
    if prefix_sharing:
        # one packed row [prompt | chosen | rejected] per pair: the shared prompt runs once
        return prefix_shared_logps(model, batch, tok.pad_id, block_size, process.device,
                                   pad_multiple, flex=use_flex, logprobs=logprob_kind,
                                   chunk=logprob_chunk, ld_alpha=ld_alpha, wpo=wpo)
    # the concatenated forward: the chosen rows and the rejected rows in one batch of 2B
    return concatenated_logps(model, batch, tok.pad_id, block_size, process.device, pad_multiple,
                              logprobs=logprob_kind, chunk=logprob_chunk, ld_alpha=ld_alpha,
                              wpo=wpo)


# The reference's log-probs come from one of three places: the frozen model run live under no_grad
# (the default); a table computed once before training, after which the model is freed
# (--precompute_ref); or nowhere, a uniform reference whose log-probs are 0 (--reference_free;
# simpo, orpo and sft have none).
train_table = None
eval_table = None
if precompute_ref:
    # one pass under no_grad, batch by batch: (N, 2) tables, chosen then rejected
    train_table = logps_table(pair_logps, reference, train_data, batch_size, process.autocast)
    eval_table = logps_table(pair_logps, reference, eval_data, batch_size, process.autocast)
    reference = None  # freed: training now holds one model
    if process.master:
        print(f"precomputed reference log-probs for {len(train_data)} + {len(eval_data)} pairs; "
              "reference freed")


def reference_logps(reference_model, batch, table_rows=None):
    """The reference's summed log-probs of the pairs' chosen and rejected responses, (B,) each."""
    if table_rows is not None:
        # precomputed: this batch's rows of the table
        return table_rows[:, 0].to(process.device), table_rows[:, 1].to(process.device)
    if reference_model is None:
        # a uniform reference
        zeros = torch.zeros(len(batch), device=process.device)
        return zeros, zeros
    # the frozen model, live
    with torch.no_grad():
        reference_chosen_logps, reference_rejected_logps, _, _ = pair_logps(reference_model, batch)
    return reference_chosen_logps, reference_rejected_logps


# 4. the loss of a micro-batch. losses.LOSSES maps --loss_type to its function ('dpo' ->
# losses.dpo_loss); here are the settings each one takes besides beta, by keyword.
LOSS_SETTINGS = {
    "dpo": {"label_smoothing": label_smoothing},
    "robust": {"label_smoothing": label_smoothing},
    # EXO needs a label-flip rate above 0: TRL's 1e-3 unless label_smoothing says otherwise
    "exo": {"label_smoothing": label_smoothing or 1e-3},
    "aot": {"label_smoothing": label_smoothing},
    "aot_unpaired": {"label_smoothing": label_smoothing},
    "discopop": {"tau": discopop_tau},
}
# BCO's reward shift: the running mean of every reward seen in training (the paper)
bco_reward_mean = runtime.RunningMean("bco_running_delta")


def compute_loss(policy_model, reference_model, batch, table_rows=None):
    """(loss, metrics) of a micro-batch of pairs (KTO: of examples). Training passes the wrapped
    models (DDP, compile), evaluation the plain ones (so that no graphs are compiled for its
    shapes)."""
    if loss_type == "kto":
        # unpaired examples, with a KL reference point from mismatched rows: nanopo/kto.py
        return kto.batch_loss(policy_model, reference_model, batch, beta, desirable_weight,
                              undesirable_weight, process, pad_id=tok.pad_id, block_size=block_size,
                              multiple=pad_multiple, logprobs=logprob_kind, chunk=logprob_chunk,
                              packing=row_packing)
    # The reference's first: its temporaries are freed before the policy's activations pile up.
    reference_chosen_logps, reference_rejected_logps = reference_logps(reference_model, batch,
                                                                       table_rows)
    # The policy's, with gradients, and the responses' token counts: (B,) each.
    # With --use_weighting, WPO's per-pair weights too (else None).
    outputs = pair_logps(policy_model, batch, wpo=use_weighting)
    policy_chosen_logps, policy_rejected_logps, chosen_n, rejected_n = outputs[:4]
    wpo_weights = outputs[4] if use_weighting else None
    metrics = {"logps/chosen": policy_chosen_logps.detach().mean(),
               "logps/rejected": policy_rejected_logps.detach().mean()}
    if use_weighting:
        metrics["wpo_weight"] = wpo_weights.mean()

    loss = 0.0
    rewards = {}
    # one term of weight 1, or a weighted sum of several (MPO: --loss_type=dpo+bco+sft)
    for name, weight in zip(loss_names, loss_weights):
        term_metrics = {}
        if name == "sft":
            # the honest baseline: the chosen answers' NLL per token; the rejected ones are not used
            term_loss = losses.sft_loss(policy_chosen_logps, chosen_n)
            term_metrics["nll_loss"] = term_loss.detach()
        elif name == "simpo":
            # no reference: the policy's per-token averages, and a target margin simpo_gamma
            term_loss, chosen_rewards, rejected_rewards = losses.simpo_loss(
                average_logps(policy_chosen_logps, chosen_n),
                average_logps(policy_rejected_logps, rejected_n), beta, simpo_gamma)
        elif name == "orpo":
            # no reference: the chosen answers' NLL plus beta times a log-odds ratio of averages
            nll = losses.sft_loss(policy_chosen_logps, chosen_n)
            orpo = losses.orpo_loss(average_logps(policy_chosen_logps, chosen_n),
                                    average_logps(policy_rejected_logps, rejected_n), nll, beta)
            term_loss, chosen_rewards, rejected_rewards, log_odds_ratio, log_odds_chosen = orpo
            term_metrics.update({"nll_loss": nll.detach(), "log_odds_ratio": log_odds_ratio,
                                 "log_odds_chosen": log_odds_chosen})
        else:
            # every loss against a reference: the four log-probs, then losses.LOSSES[name]
            chosen, rejected = policy_chosen_logps, policy_rejected_logps
            reference_chosen, reference_rejected = reference_chosen_logps, reference_rejected_logps
            if name in losses.PER_TOKEN_AVERAGE:
                # IPO and dpo_norm compare per-token averages: a scale that length does not grow
                chosen = average_logps(chosen, chosen_n)
                rejected = average_logps(rejected, rejected_n)
                reference_chosen = average_logps(reference_chosen, chosen_n)
                reference_rejected = average_logps(reference_rejected, rejected_n)
            # the implicit rewards beta * log(policy / reference), whatever the loss does with them
            chosen_rewards, rejected_rewards = losses.implicit_rewards(
                beta, chosen, rejected, reference_chosen, reference_rejected)
            if f_divergence_type != "reverse_kl" and name in losses.F_DIVERGENCE_LOSSES:
                # another f-divergence: the margin compares psi(log-ratio) for each response
                chosen = losses.f_divergence(chosen - reference_chosen, f_divergence_type,
                                             f_alpha_divergence_coef)
                rejected = losses.f_divergence(rejected - reference_rejected, f_divergence_type,
                                               f_alpha_divergence_coef)
                reference_chosen = torch.zeros_like(chosen)
                reference_rejected = torch.zeros_like(rejected)
            settings = dict(LOSS_SETTINGS.get(name, {}))
            if name == "bco":
                delta = 0.0
                if bco_running_delta:
                    # a training batch moves BCO's shift before it is used; held-out ones don't
                    if torch.is_grad_enabled():
                        all_rewards = torch.cat([chosen_rewards, rejected_rewards])
                        bco_reward_mean.update(all_rewards, process)
                    delta = bco_reward_mean.mean
                settings["delta"] = delta
                term_metrics["delta"] = chosen.new_tensor(delta)
            if use_weighting:
                settings["weights"] = wpo_weights
            # the loss --loss_type names; the rewards it returns are the ones above (before any
            # f-divergence reshaping), so only its loss is kept
            loss_function = losses.LOSSES[name]
            term_loss, _, _ = loss_function(chosen, rejected, reference_chosen, reference_rejected,
                                            beta, **settings)
        if name != "sft":
            term_metrics.update(losses.reward_metrics(chosen_rewards, rejected_rewards))
            if not rewards:
                # the top-level rewards/* are the first term's that has rewards
                rewards = {k: v for k, v in term_metrics.items() if k.startswith("rewards/")}
        loss = loss + weight * term_loss
        if len(loss_names) == 1:
            metrics.update(term_metrics)
        else:
            # a combination also logs every term under its name: dpo/loss, bco/rewards/margins, ...
            metrics[f"{name}/loss"] = term_loss.detach()
            metrics.update({f"{name}/{key}": value for key, value in term_metrics.items()})
    if len(loss_names) > 1:
        metrics.update(rewards)

    if rpo_alpha > 0:
        # RPO: plus the chosen answers' NLL, which keeps their likelihood from falling
        nll = losses.sft_loss(policy_chosen_logps, chosen_n)
        loss = loss + rpo_alpha * nll
        metrics["nll_loss"] = nll.detach()
    return loss, metrics


if loss_type == "kto":
    kto.check(train_data, eval_data, desirable_weight, undesirable_weight, process.master)

# 5. training: the policy gets gradients and optimizer steps, the reference never does.
# The wrappers add DDP / FSDP2 / compile; `policy` stays the plain module (evaluation, saving).
wrapped_policy = runtime.wrap_policy(policy, process, compile)
# FSDP2 / compile, never DDP: the reference has no gradients to synchronise
wrapped_reference = runtime.wrap_reference(reference, process, compile)
optimizer = runtime.configure_optimizer(policy, weight_decay, learning_rate, (beta1, beta2),
                                        process.device_type)
# fp16 only: the loss is scaled so that small gradients survive; else a no-op
scaler = runtime.grad_scaler(process)
order = BatchOrder(len(train_data), seed)
guard = runtime.NonFiniteGuard(max_nonfinite)
# TR-DPO: every ref_sync_steps steps the reference moves towards the policy; a no-op when 0
reference_sync = checkpoint.ReferenceSync(reference, policy, ref_sync_steps, ref_mixup_alpha,
                                          process)
start_iter = 0
if start.run_to_resume:
    # --init_from=resume: continue exactly where the checkpoint left off (weights, optimizer, data)
    path, saved = start.run_to_resume
    start_iter, guard.total = checkpoint.resume(path, saved, policy, optimizer, order, scaler,
                                                process, max_iters,
                                                states=(bco_reward_mean, reference_sync))

# For MFU: forward-only passes per trained token, besides the policy's forward and backward: the
# live reference's; with KTO, its mismatched rows through the policy, and through the reference
forward_only = 0
if reference is not None:
    forward_only += 1
if loss_type == "kto":
    forward_only += 1 + (reference is not None)
if loss_type == "kto":
    count_tokens = kto.tokens
elif prefix_sharing:
    count_tokens = prefix_shared_tokens
else:
    count_tokens = concatenated_tokens
flops_per_token = model_flops_per_token(policy, train_data, forward_only, logprob_kind)
# --report_to: the trackers (rank 0 only) get every record metrics.jsonl gets
trackers = Trackers(report_to, out_dir, run_name, project, config, start_iter, process)
logger = Logger(out_dir, process, start_iter, max_iters, log_interval, flops_per_token, compile,
                trackers)
if process.master:
    print(f"loss_type {loss_type}: {1 + isinstance(reference, torch.nn.Module)} model(s) in memory")


def evaluate():
    """Held-out task_accuracy (a task with a verifier) and/or eval_loss, eval_rewards/... (held-out
    rows)."""
    results = {}
    if task is not None:
        results = evaluate_task(policy, task, tok, process, reward=pairs == "judged")
    if eval_data:
        # the training loss and metrics over the held-out rows, named eval_*
        def loss_of_rows(indices):
            table_rows = None if eval_table is None else eval_table[indices]
            return compute_loss(policy, reference, [eval_data[i] for i in indices], table_rows)
        results.update(evaluate_loss(policy, loss_of_rows, len(eval_data), batch_size, process))
    return results


def save(it, results):
    checkpoint.save_run(config, it, policy, optimizer, order, scaler, tok.name, process,
                        sft_ckpt=start.sft_ckpt, nonfinite_skipped=guard.total,
                        **bco_reward_mean.state_dict(), **reference_sync.state_dict(), **results)


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
    # the step's row indices, the same on every rank; then this rank's micro-batches of them
    step_rows = order.take(batch_size * gradient_accumulation_steps)
    micro_batches = runtime.my_micro_batches(step_rows, batch_size, gradient_accumulation_steps,
                                             process)
    step_loss = 0.0
    for k, indices in enumerate(micro_batches):
        batch = [train_data[i] for i in indices]
        # this micro-batch's share of the step's rows, on all ranks: the loss is a mean over them
        share = len(indices) / len(step_rows)
        # gradients are synchronised over the ranks only after the last micro-batch
        runtime.sync_gradients(wrapped_policy, process, k == len(micro_batches) - 1)
        table_rows = None if train_table is None else train_table[indices]
        with process.autocast():
            loss, metrics = compute_loss(wrapped_policy, wrapped_reference, batch, table_rows)
        # The backward pass. The loss is a mean over the step's rows, so this micro-batch counts by
        # its share. DDP and FSDP divide the summed gradients by the number of ranks: the world_size
        # factor undoes that, as the shares of all the ranks already sum to 1.
        scaler.scale(loss * share * process.world_size).backward()
        step_loss += loss.detach() * share
        logger.add(loss, metrics, share, count_tokens(batch))
    scaler.unscale_(optimizer)
    # clip the gradients to a total norm of grad_clip; the norm before clipping is logged
    grad_norm = runtime.clip_grad_norm(wrapped_policy, grad_clip)
    # skip the update if the loss or the gradient is not finite: the same decision on every rank
    if guard.all_finite(step_loss, grad_norm, scaler, process, it):
        # AdamW's step (the GradScaler only acts in fp16)
        scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    reference_sync.after_step(it)  # TR-DPO
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
last_line = (f"{loss_type.upper()} done: {summary(results, start.sft_accuracy)} in {wall_s:.0f} s, "
             f"peak RSS {peak_rss_mb():.0f} MB -> {os.path.join(out_dir, 'ckpt.pt')}")
# out_dir/summary.json: the run in one file (results, speed, settings, git commit)
run_summary = logger.write_summary(out_dir, config, results, last_line, wall_s,
                                   sft_accuracy=start.sft_accuracy, pairs_s=round(pairs_s, 1),
                                   training_rows=len(train_data), skipped=str(skipped),
                                   truncated=skipped.truncated(), nonfinite_skipped=guard.total)
logger.close_trackers(run_summary)
if process.master:
    print(last_line)
runtime.cleanup(process)
