"""
GRPO: reinforcement learning with a reward function, the road DPO takes a shortcut around. Load the
SFT checkpoint into the policy (and, when beta > 0, a frozen copy as the reference); then at every
step sample G answers to each of a batch of training prompts from the current policy, reward them,
turn the rewards into group-relative advantages, and take an optimizer step on GRPO's clipped
objective (losses.grpo_loss). No pairs and no judge: a reward function of (prompt, answer).

$ python grpo.py                          # the embedded task, out/sft/ckpt.pt -> out/grpo
$ python grpo.py --reward=correct         # 0/1 exact match instead of the graded reward
$ python grpo.py --beta=0                 # no KL penalty: no reference model in memory
$ python grpo.py --loss_type=dr_grpo --scale_rewards=none    # Dr. GRPO
$ python grpo.py --importance_sampling_level=sequence --num_iterations=2    # GSPO, ratio != 1
$ torchrun --standalone --nproc_per_node=2 grpo.py    # DDP; the global batch stays the same

Top to bottom: the settings; 1. the policy and its frozen copy, the reference; 2. the task and
its reward function; 3. rollouts: sample, reward, advantages; 4. the per-token log-probs and the
loss of a micro-batch; 5. the training loop; the summary line. SIGTERM or Ctrl-C during training
saves a checkpoint after the current step; --init_from=resume continues exactly.
"""

import os

# Before torch loads OpenMP: spin briefly, then sleep (as in dpo.py; docs/scale_and_speed.md)
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")

import copy  # noqa: E402  (the imports below load torch)
import time

import torch

import losses
from configurator import UserError, apply_overrides, check_config, install_error_handler
from data import BatchOrder, Tokenizer, collate
from logprobs import token_logps
from nanopo import checkpoint, runtime
from nanopo.logger import (Logger, Trackers, check_report_to, model_flops_per_token, peak_rss_mb,
                           summary)
from nanopo.tasks import AdditionTask, evaluate_task

# bad input ends the run with one line, not a traceback
install_error_handler()
# --------------------------------------------------------------------------------------------------
# default config: GRPO on the embedded task, from the quick start's SFT model
out_dir = "out/grpo"
init_from = "sft"         # 'sft' (sft_ckpt) or 'resume' (out_dir/ckpt.pt)
sft_ckpt = "out/sft/ckpt.pt"
seed = 1
device = "auto"
dtype = "auto"
compile = None            # torch.compile: None = on with CUDA, off on a CPU
threads = 0               # CPU threads (torch.set_num_threads); 0 = torch's default
eval_interval = 20
log_interval = 5
checkpoint_interval = 0
always_save_checkpoint = False
keep_last = 1
# experiment trackers (nanopo/trackers.py): they get what metrics.jsonl gets
report_to = "none"        # 'wandb', 'tensorboard' or 'trackio', comma-separated for several
run_name = ""             # the run's name in the trackers; '' = out_dir
project = "nanopo"        # the wandb / trackio project
# GRPO (TRL's GRPOConfig names; not all its defaults: TRL's beta is 0 and its loss_type dapo)
reward = "graded"         # 'graded': the task's -log(1 + |error|); 'correct': 1 if right, else 0
num_generations = 8       # G: answers per prompt, each group its own baseline
prompts_per_step = 32     # prompts per step: a step trains on prompts_per_step x G answers
temperature = 1.0         # the rollouts' sampling temperature
beta = 0.04               # weight of the KL penalty to the reference; 0: no reference at all
epsilon = 0.2             # PPO clipping: the ratio is clipped to [1 - epsilon, 1 + epsilon_high]
epsilon_high = 0.0        # 0 = epsilon; DAPO raises it (0.28) so unlikely tokens can grow
loss_type = "grpo"        # grpo | bnpo | dr_grpo | dapo: how the token terms are averaged
importance_sampling_level = "token"  # 'token' (PPO's ratio) or 'sequence' (GSPO)
scale_rewards = "group"   # advantages divided by the std of the 'group', the 'batch', or 'none'
num_iterations = 1        # optimizer steps per batch of answers; 1: the ratio is 1, nothing clips
# optimisation
batch_size = 64           # answers per micro-batch (over all ranks, as in dpo.py)
max_iters = 60            # steps, each a fresh batch of answers (x num_iterations optimizer steps)
learning_rate = 1e-4
min_lr = 1e-4
warmup_iters = 0
lr_decay_iters = 0
decay_lr = False
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0
max_nonfinite = 5
# bigger models on the same hardware (docs/lora_and_checkpointing.md)
lora_rank = 0             # > 0: train LoRA adapters only; the reference is the policy with them off
lora_alpha = 16.0
lora_dropout = 0.0
lora_targets = "attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj"
grad_checkpoint = False
# --------------------------------------------------------------------------------------------------
config = apply_overrides(globals())
# GRPO's beta, unlike DPO's, may be 0: no KL penalty (checked below)
check_config(config, exempt=("beta",))
check_report_to(report_to)
if not beta >= 0:
    raise UserError(f"beta={beta} makes no sense: expected >= 0 (0: no KL penalty, no reference)")
if init_from not in ("sft", "resume"):
    raise UserError(f"unknown init_from '{init_from}': expected 'sft' or 'resume'")
if num_generations < 2:
    raise UserError(f"num_generations={num_generations}: a group needs 2 or more answers, "
                    "or every advantage is 0")
if epsilon_high and epsilon_high < epsilon:
    raise UserError(f"epsilon_high={epsilon_high} is below epsilon={epsilon}: the upper clip "
                    "range would be narrower than the lower one (0 = epsilon)")
if reward not in ("graded", "correct"):
    raise UserError(f"unknown reward '{reward}': expected 'graded' or 'correct'")
if loss_type not in losses.GRPO_LOSS_TYPES:
    raise UserError(f"unknown loss_type '{loss_type}': expected one of "
                    f"{', '.join(losses.GRPO_LOSS_TYPES)}")
if importance_sampling_level not in ("token", "sequence"):
    raise UserError(f"unknown importance_sampling_level '{importance_sampling_level}': expected "
                    "'token' or 'sequence'")
if scale_rewards not in losses.SCALE_REWARDS:
    raise UserError(f"unknown scale_rewards '{scale_rewards}': expected one of "
                    f"{', '.join(losses.SCALE_REWARDS)}")
answers_per_step = prompts_per_step * num_generations
if answers_per_step % batch_size:
    raise UserError(f"prompts_per_step x num_generations = {answers_per_step} answers per step is "
                    f"not a multiple of batch_size={batch_size}")
gradient_accumulation_steps = answers_per_step // batch_size
# --------------------------------------------------------------------------------------------------
t_start = time.time()
process = runtime.setup(device, dtype, seed, False, threads)
# a step's micro-batches that cannot be split evenly over the ranks stop here
runtime.micro_batches(batch_size, gradient_accumulation_steps, process.world_size)
if compile is None:
    compile = process.device_type == "cuda"
    config["compile"] = compile

# 1. the policy, the SFT model (or the run being resumed), and, only with a KL penalty, the
# reference: a frozen copy of it
# (dpo_start is shared with dpo.py: the SFT checkpoint, or the run in out_dir to resume)
start = checkpoint.dpo_start(config, needs_reference=beta > 0)
policy = runtime.prepare_model(start.policy.to(process.device), config, process)
tok = Tokenizer(start.tokenizer)
reference = None
if beta > 0 and lora_rank:
    # LoRA: the reference is the policy with its adapters switched off
    reference = checkpoint.AdaptersOff(policy)
elif beta > 0:
    reference = copy.deepcopy(policy)
    reference.eval()
    reference.requires_grad_(False)

# 2. the task and the reward function: a plain function of (prompt, answer) text, so any other
# task or verifier plugs in here
task = AdditionTask(**start.task)


def reward_of(prompt, answer):
    """The reward of one answer: the graded true reward (0 for the exact sum, -log(1 + |error|)
    otherwise), or 1.0 / 0.0 for right / wrong."""
    if reward == "correct":
        return float(task.is_correct(prompt, answer))
    return task.reward(prompt, answer)


prompts = [task.prompt(a, b) for a, b in task.train_problems]
prompt_ids = [tok.encode(p) for p in prompts]
max_completion_length = task.max_new_tokens
if process.master:
    print(f"GRPO: {len(prompts)} training prompts, {num_generations} answers each per step, "
          f"{prompts_per_step} prompts per step; reward '{reward}'")


# 3. rollouts: G answers to each of the step's prompts from the current policy, their rewards and
# advantages. Every rank samples the same answers (same weights, the same random stream), as dpo.py
# builds the same pairs on every rank; then each trains on its share.
class SamplingRNG:
    """The rollouts' own random stream, seeded alike on every rank (so no other draw, such as a
    LoRA adapter's dropout on a rank's own rows, can make the ranks' answers differ), and saved in
    the checkpoints, so a resumed run samples what it would have sampled."""

    def __init__(self, seed):
        self.generator = torch.Generator(device=process.device).manual_seed(seed)

    def state_dict(self):
        return {"sampling_rng": self.generator.get_state()}

    def load_state_dict(self, ckpt):
        if "sampling_rng" in ckpt:
            self.generator.set_state(ckpt["sampling_rng"])


sampling_rng = SamplingRNG(seed)


@torch.no_grad()
def rollouts(step_prompts):
    """The step's answers as rows [(prompt_ids, answer_ids + EOS if it was sampled)], grouped by
    prompt (G consecutive rows each), with their advantages (B,) and the rollout metrics."""
    was_training = policy.training
    policy.eval()
    group_prompts = [prompt_ids[i] for i in step_prompts for _ in range(num_generations)]
    with process.autocast():
        answers = policy.generate(group_prompts, max_completion_length, tok.eos_id, tok.pad_id,
                                  temperature=temperature, generator=sampling_rng.generator)
    policy.train(was_training)
    rows, rewards, correct = [], [], 0
    for k, answer in enumerate(answers):
        # generate drops EOS: an answer that stopped early sampled it, so it goes back, to be
        # scored: the model learns where to stop
        stopped = len(answer) < max_completion_length
        rows.append((group_prompts[k], answer + [tok.eos_id] if stopped else answer))
        prompt_text, answer_text = prompts[step_prompts[k // num_generations]], tok.decode(answer)
        rewards.append(reward_of(prompt_text, answer_text))
        correct += task.is_correct(prompt_text, answer_text)
    rewards = torch.tensor(rewards, dtype=torch.float32)
    advantages = losses.group_advantages(rewards, num_generations, scale_rewards)
    # TRL's frac_reward_zero_std: the share of answers whose advantage had a zero std to divide by
    std = rewards.view(-1, num_generations).std(dim=1)
    if scale_rewards == "batch":
        std = rewards.std().expand(len(std))
    metrics = {"reward": rewards.mean(), "reward_std": rewards.std(),
               "frac_reward_zero_std": (std == 0).float().mean(),
               "completions/mean_length": torch.tensor([len(r) for _, r in rows]).float().mean(),
               "sampled_accuracy": torch.tensor(correct / len(rows))}
    return rows, advantages, metrics


# 4. the loss of a micro-batch: per-token log-probs of the answers under the policy (and the
# sampling policy, and the reference), then losses.grpo_loss
def answer_logps(model, rows):
    """Per-token log-probs of the rows' answer tokens, (B, T) float32, under the distribution the
    answers were sampled from (the logits divided by the temperature), and the mask (B, T), 1 on
    the answer's tokens and EOS."""
    idx, targets, mask = collate(rows, tok.pad_id)
    idx, targets, mask = idx.to(process.device), targets.to(process.device), mask.to(process.device)
    return token_logps(model(idx) / temperature, targets), mask


def compute_loss(policy_model, rows, advantages, old_logps, reference_logps):
    """(loss, metrics) of a micro-batch of answers."""
    policy_logps, mask = answer_logps(policy_model, rows)
    return losses.grpo_loss(policy_logps, old_logps, reference_logps, mask,
                            advantages.to(process.device), beta=beta, epsilon=epsilon,
                            epsilon_high=epsilon_high or None, loss_type=loss_type,
                            importance_sampling_level=importance_sampling_level,
                            max_completion_length=max_completion_length)


# 5. training
wrapped_policy = runtime.wrap_policy(policy, process, compile)
wrapped_reference = runtime.wrap_reference(reference, process, compile)
optimizer = runtime.configure_optimizer(policy, weight_decay, learning_rate, (beta1, beta2),
                                        process.device_type)
scaler = runtime.grad_scaler(process)
order = BatchOrder(len(prompts), seed)
guard = runtime.NonFiniteGuard(max_nonfinite)
start_iter = 0
if start.run_to_resume:
    path, saved = start.run_to_resume
    start_iter, guard.total = checkpoint.resume(path, saved, policy, optimizer, order, scaler,
                                                process, max_iters, states=(sampling_rng,))
# model FLOPs of the training passes (sampling not counted): a prompt and a full-length answer
example_rows = [(p, [0] * max_completion_length) for p in prompt_ids[:256]]
flops_per_token = model_flops_per_token(policy, example_rows, forward_only=reference is not None)
trackers = Trackers(report_to, out_dir, run_name, project, config, start_iter, process)
logger = Logger(out_dir, process, start_iter, max_iters, log_interval, flops_per_token, compile,
                trackers)
if process.master:
    print(f"loss_type {loss_type}, beta {beta}: {1 + isinstance(reference, torch.nn.Module)} "
          "model(s) in memory")


def evaluate():
    """Held-out greedy task_accuracy and task_reward (the graded reward's mean)."""
    return evaluate_task(policy, task, tok, process, reward=True)


def save(it, results):
    checkpoint.save_run(config, it, policy, optimizer, order, scaler, tok.name, process,
                        sft_ckpt=start.sft_ckpt, nonfinite_skipped=guard.total,
                        **sampling_rng.state_dict(), **results)


# From here on, SIGTERM (a scheduler's notice) or a first Ctrl-C stops the run after the step it
# interrupts, with a checkpoint; a second Ctrl-C stops it at once
signals = runtime.StopOnSignal(process)
sampling_s = training_s = 0.0
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
    # sample G answers to each of the step's prompts, reward them, and compare within each group
    rows, advantages, rollout_metrics = rollouts(order.take(prompts_per_step))
    # every rank sampled from the same weights and stream: check that they got the same answers
    runtime.check_same_on_all_ranks(rows, process)
    t1 = time.time()
    sampling_s += t1 - t0
    micro_batches = runtime.my_micro_batches(list(range(len(rows))), batch_size,
                                             gradient_accumulation_steps, process)
    # the log-probs of the policy that sampled the answers (needed once the ratio can leave 1)
    # and of the reference, fixed for the step: computed once, without gradients
    old_and_reference_logps = []
    with torch.no_grad(), process.autocast():
        for indices in micro_batches:
            batch = [rows[i] for i in indices]
            old_logps = None
            if num_iterations > 1:
                # the model training runs (compiled, ...), so that the first ratio is exactly 1
                old_logps = answer_logps(wrapped_policy, batch)[0]
            reference_logps = None
            if reference is not None:
                reference_logps = answer_logps(wrapped_reference, batch)[0]
            old_and_reference_logps.append((old_logps, reference_logps))
    # dapo averages over the step's tokens: each micro-batch counts by its share of them
    step_tokens = sum(len(answer) for _, answer in rows)
    for _ in range(num_iterations):
        step_loss = 0.0
        for k, indices in enumerate(micro_batches):
            batch = [rows[i] for i in indices]
            share = len(indices) / len(rows)
            if loss_type == "dapo":
                share = sum(len(answer) for _, answer in batch) / step_tokens
            runtime.sync_gradients(wrapped_policy, process, k == len(micro_batches) - 1)
            old_logps, reference_logps = old_and_reference_logps[k]
            with process.autocast():
                loss, metrics = compute_loss(wrapped_policy, batch, advantages[indices],
                                             old_logps, reference_logps)
            # the loss is a mean over the step's answers (dapo: tokens); the world_size factor
            # undoes DDP's average over ranks (the shares of all ranks together sum to 1)
            scaler.scale(loss * share * process.world_size).backward()
            step_loss += loss.detach() * share
            tokens_forwarded = sum(len(p) + len(a) - 1 for p, a in batch)
            logger.add(loss, {**metrics, **rollout_metrics}, share / num_iterations,
                       tokens_forwarded)
        scaler.unscale_(optimizer)
        grad_norm = runtime.clip_grad_norm(wrapped_policy, grad_clip)
        if guard.all_finite(step_loss, grad_norm, scaler, process, it):
            scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    training_s += time.time() - t1
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
answers = (max_iters - start_iter) * answers_per_step
last_line = (f"GRPO done: {summary(results, start.sft_accuracy)}; {answers:,} answers sampled, "
             f"sampling {sampling_s:.0f} s, training {training_s:.0f} s, in {wall_s:.0f} s, "
             f"peak RSS {peak_rss_mb():.0f} MB -> {os.path.join(out_dir, 'ckpt.pt')}")
run_summary = logger.write_summary(out_dir, config, results, last_line, wall_s,
                                   sft_accuracy=start.sft_accuracy, answers_sampled=answers,
                                   sampling_s=round(sampling_s, 1),
                                   training_s=round(training_s, 1), nonfinite_skipped=guard.total)
logger.close_trackers(run_summary)
if process.master:
    print(last_line)
runtime.cleanup(process)
