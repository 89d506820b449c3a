"""
Held-out evaluation, shared by sft.py and dpo.py: exact-match accuracy of greedy answers on a task with a
verifier, and the training loss (with its metrics) over held-out rows. Both run the plain model, in eval mode,
without gradients, and put it back in training mode after. Also the completions dpo.py builds its on-policy
pairs from (complete), generated the same way, and a point of the reward-KL frontier (sampled_kl): what the
policy's samples earn and how far they are from a reference's, for online_dpo.py and the notebooks.
"""

import torch

from data import collate
from nanopo.logger import Progress
from logprobs import summed_logps, token_logps
from nanopo.runtime import all_reduce_sum, unwrap


@torch.no_grad()
def complete(model, prompts, tok, rt, max_new_tokens, label, temperature=0.0, generator=None, batch_size=500):
    """The plain model's completions (text) of `prompts`, greedy (temperature 0) or sampled, batch_size prompts
    at a time, in eval mode, with progress lines under `label` (which may name {temperature}): for evaluation,
    and for dpo.py's on-policy pairs."""
    raw = unwrap(model)
    was_training = raw.training
    raw.eval()
    outs, progress = [], Progress(label.format(temperature=float(temperature)), len(prompts), rt.master)
    for i in range(0, len(prompts), batch_size):
        with rt.autocast():
            outs += raw.generate([tok.encode(p) for p in prompts[i:i + batch_size]], max_new_tokens, tok.eos_id,
                                 tok.pad_id, temperature=temperature, generator=generator)
        progress.update(len(outs))
    raw.train(was_training)
    return [tok.decode(o) for o in outs]


@torch.no_grad()
def evaluate_task(model, task, tok, rt, reward=False, batch_size=500):
    """{'task_accuracy': held-out exact-match accuracy (0-1) of greedy completions of task.eval_prompts, checked
    by task.is_correct}, and with reward=True 'task_reward': their mean graded reward (task.reward, what a judge
    ranks by). Under DDP each rank takes every world_size-th prompt and the sums are reduced, so no rank waits
    on another's share. Under FSDP2 every forward is a collective, so every rank generates for every prompt
    instead (identical weights and inputs give identical outputs and the same number of steps)."""
    rank, world = (0, 1) if rt.fsdp else (rt.rank, rt.world_size)
    prompts = task.eval_prompts[rank::world]
    texts = complete(model, prompts, tok, rt, task.max_new_tokens, "evaluating held-out prompts", batch_size=batch_size)
    sums = torch.tensor([sum(task.is_correct(p, t) for p, t in zip(prompts, texts)),
                         sum(task.reward(p, t) for p, t in zip(prompts, texts)) if reward else 0.0, len(prompts)],
                        dtype=torch.float64, device=rt.device)
    if not rt.fsdp:
        sums = all_reduce_sum(sums, rt)
    results = {"task_accuracy": (sums[0] / sums[2]).item()}
    if reward:
        results["task_reward"] = (sums[1] / sums[2]).item()
    return results


@torch.no_grad()
def evaluate_loss(model, loss_of_rows, n_rows, batch_size, rt, row_weights=None):
    """Held-out loss and metrics: loss_of_rows(indices) -> (loss, {name: value}) over held-out rows `indices`,
    for every row, named eval_<name> (TRL's eval_loss, eval_rewards/accuracies, ...). Batch means are weighted
    by their rows, or by the sum of row_weights over their rows (SFT: response tokens), so they do not depend on
    batch_size. Every rank computes the whole (small) held-out set, so there is no collective it could miss."""
    raw = unwrap(model)
    was_training = raw.training
    raw.eval()
    totals, names = None, None
    starts = list(range(0, n_rows, batch_size))
    if len(starts) > 1 and n_rows - starts[-1] == 1:
        starts.pop()  # no batch of one row: it joins the one before (KTO's KL estimate needs two rows)
    weight = (lambda indices: sum(row_weights[i] for i in indices)) if row_weights else len
    for start, end in zip(starts, starts[1:] + [n_rows]):
        indices = list(range(start, end))
        with rt.autocast():
            loss, metrics = loss_of_rows(indices)
        values = torch.stack([loss.float()] + [v.float() for v in metrics.values()]) * weight(indices)
        totals, names = (values if totals is None else totals + values), ["loss", *metrics]
    raw.train(was_training)
    total_weight = weight(list(range(n_rows)))
    return {f"eval_{k}": v / total_weight for k, v in zip(names, totals.tolist())}


@torch.no_grad()
def sampled_kl(policy, reference, task, tok, n_prompts=500, max_new_tokens=8, seed=0, draws=1):
    """Monte-Carlo estimate of KL(policy || reference) on held-out prompts, in nats per completion:
    sample y ~ policy(.|x) at temperature 1, then average log policy(y|x) - log reference(y|x) over the
    samples (the log-probs are summed over the sampled tokens, EOS included when it was sampled).
    Also the samples' exact-match accuracy, and their mean graded reward when the task has one (what a judge
    ranks by): the reward the KL is paid for, the two axes of the DPO paper's reward-KL frontier. Plain
    (unwrapped) models on the CPU, the first n_prompts held-out problems, `draws` samples each (more draws, smaller
    standard errors). Returns a dict with kl, kl_stderr, sampled_accuracy, sampled_reward and
    sampled_reward_stderr (standard errors over the samples)."""
    policy.eval()
    reference.eval()
    problems = task.eval_problems[:n_prompts] * draws
    texts = [task.prompt(a, b) for a, b in problems]
    prompts = [tok.encode(t) for t in texts]
    g = torch.Generator().manual_seed(seed)
    outs = policy.generate(prompts, max_new_tokens, tok.eos_id, tok.pad_id, temperature=1.0, generator=g)
    # generate drops the EOS; a completion shorter than max_new_tokens stopped because EOS was sampled
    seqs = [(p, o + [tok.eos_id] if len(o) < max_new_tokens else o) for p, o in zip(prompts, outs)]
    idx, targets, mask = collate(seqs, tok.pad_id)
    log_ratio = (summed_logps(token_logps(policy(idx)[0], targets), mask)[0]
                 - summed_logps(token_logps(reference(idx)[0], targets), mask)[0])  # (n,)
    answers = [tok.decode(o) for o in outs]
    correct = [task.is_correct(t, y) for t, y in zip(texts, answers)]
    rewards = torch.tensor([task.reward(t, y) for t, y in zip(texts, answers)], dtype=torch.float64)
    n = len(seqs)
    return {"kl": log_ratio.mean().item(), "kl_stderr": (log_ratio.std() / n ** 0.5).item(),
            "sampled_accuracy": sum(correct) / n, "sampled_reward": rewards.mean().item(),
            "sampled_reward_stderr": (rewards.std() / n ** 0.5).item()}
