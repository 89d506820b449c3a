"""
Held-out evaluation, shared by sft.py and dpo.py: exact-match accuracy of greedy answers on a task with a
verifier, and the training loss (with its metrics) over held-out rows. Both run the plain model, in eval mode,
without gradients, and put it back in training mode after. Also the completions dpo.py builds its on-policy
pairs from (complete), generated the same way.
"""

import torch

from logger import Progress
from runtime import all_reduce_sum, unwrap


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
