"""
KTO's unpaired batches (Ethayarajh et al. 2024, arXiv:2402.01306; the loss itself is losses.kto_loss).

KTO learns from single answers labelled desirable or undesirable, not from pairs. What differs from the
pairwise losses is here, in one place: its examples (prompt, completion, desirable), read from unpaired rows or
made from pairs; the mismatched (prompt, completion) rows behind its KL reference point; and the loss of a
micro-batch with its metrics. dpo.py switches to these at one point.

Why mismatched pairs. KTO scores an answer by how far its log-ratio r = log pi(y|x) - log pi_ref(y|x) sits
above or below a reference point z0 = KL(pi || pi_ref), the log-ratio a *typical* answer has. An estimate of
that KL must not come from the answers being trained on: their log-ratios are exactly what the loss pushes
up (desirable) or down (undesirable), so z0 would chase r. Pairing each prompt with another row's
completion gives answers that are neither pushed nor chosen for the prompt: a rough sample of how far the
policy has drifted from the reference overall. It is computed without gradients and clamped at 0, as in the
paper.
"""

import torch

from data import encode_pair_rows, encode_sft_rows
from configurator import UserError
from nanopo.formats import cached_encode
from logprobs import completion_logps
from losses import kto_loss, kto_mismatched_indices
from nanopo.runtime import all_reduce_sum


def encode(rows, tok, block_size, source, use_cache=False, allow_empty=False):
    """Text rows -> examples [(prompt_ids, completion_ids, desirable)] and a SkipCounter: unpaired rows
    {'prompt', 'completion', 'label'} as labelled; each pair {'prompt', 'chosen', 'rejected'} as a desirable
    chosen and an undesirable rejected example. allow_empty: as data.encode_sft_rows."""
    if rows and "label" in rows[0]:
        # encoded per label, so a skipped row cannot shift the labels of the others
        good, skipped = encode_sft_rows([{"prompt": r["prompt"], "response": r["completion"]} for r in rows
                                         if r["label"]], tok, block_size, source=source, allow_empty=allow_empty)
        bad, skipped_bad = encode_sft_rows([{"prompt": r["prompt"], "response": r["completion"]} for r in rows
                                            if not r["label"]], tok, block_size, source=source,
                                           allow_empty=allow_empty)
        skipped.add_all(skipped_bad)
        return [(p, y, True) for p, y in good] + [(p, y, False) for p, y in bad], skipped
    pairs, skipped = cached_encode(encode_pair_rows, rows, tok, block_size, source, use_cache, allow_empty)
    return [(p, c, True) for p, c, _ in pairs] + [(p, r, False) for p, _, r in pairs], skipped


def check_micro_batch(rows_per_micro_batch):
    """A micro-batch of one row has no other row to mismatch with: an error, before any work."""
    if rows_per_micro_batch < 2:
        raise UserError(f"kto needs micro-batches of >= 2 rows on each process (its KL estimate pairs each prompt "
                        f"with another row's completion): batch_size gives {rows_per_micro_batch}")


def check(examples, eval_examples, desirable_weight, undesirable_weight, master):
    """A held-out set of one row has no other row to mismatch with: an error. A desirable/undesirable balance
    outside the paper's recommended range: a warning."""
    if len(eval_examples) == 1:
        raise UserError("kto needs at least 2 held-out rows (its KL estimate pairs each row with another): got 1")
    n_good = sum(label for _, _, label in examples)
    ratio = desirable_weight * n_good / max(undesirable_weight * (len(examples) - n_good), 1e-9)
    if master and not 1.0 <= ratio <= 4 / 3:
        print(f"warning: desirable_weight * n_desirable / (undesirable_weight * n_undesirable) = {ratio:.2f}, "
              "outside the KTO paper's recommended [1, 4/3]")


def mismatched(seqs, block_size):
    """[(prompt_ids, completion_ids)] -> prompt i with completion (i + 1) % n, cut to fit block_size as the
    matched rows were (a long prompt beside another row's long completion would not fit; a prompt leaves room
    for at least one completion token)."""
    return [(seqs[i][0], seqs[j][1][:block_size + 1 - len(seqs[i][0])])
            for i, j in enumerate(kto_mismatched_indices(len(seqs)))]


def batch_loss(policy_model, reference_model, rows, beta, desirable_weight, undesirable_weight, rt,
               pad_id, block_size, multiple=1, logprobs="plain", chunk=1024, packing=None):
    """KTO on a micro-batch of examples [(prompt_ids, completion_ids, desirable)]. pad_id, block_size,
    multiple, logprobs, chunk, packing: as logprobs.completion_logps takes them (packing: the matched
    rows and the mismatched KL rows are packed alike). Returns (loss, metrics): rewards of
    the desirable (logged as rewards/chosen) and undesirable (rewards/rejected) rows of the micro-batch, their
    policy log-probs, and kl, the reference point."""
    seqs = [(p, y) for p, y, _ in rows]
    kl_seqs = mismatched(seqs, block_size)

    def logps(model, seqs):
        """(B,) summed log-probs of the completions."""
        return completion_logps(model, seqs, pad_id, block_size, rt.device, multiple, logprobs, chunk,
                                packing)[0]

    desirable = torch.tensor([label for _, _, label in rows], device=rt.device)  # (B,) bool
    policy_logps = logps(policy_model, seqs)  # (B,), with gradients
    with torch.no_grad():
        policy_kl_logps = logps(policy_model, kl_seqs)
        ref_both = logps(reference_model, seqs + kl_seqs)  # (2B,): the reference runs both sets at once
    ref_logps, ref_kl_logps = ref_both[:len(rows)], ref_both[len(rows):]
    # under DDP every rank uses the same reference point: the mean of the ranks' estimates
    kl_reduce = (lambda kl: all_reduce_sum(kl.clone(), rt) / rt.world_size) if rt.ddp else None
    loss, rewards, kl = kto_loss(policy_logps, ref_logps, desirable, policy_kl_logps, ref_kl_logps, beta,
                                 desirable_weight, undesirable_weight, kl_reduce)
    n_good, n_bad = desirable.sum().clamp(min=1), (~desirable).sum().clamp(min=1)
    # per-group means within the micro-batch (a group absent from it counts as 0)
    return loss, {"rewards/chosen": (rewards * desirable).sum() / n_good,
                  "rewards/rejected": (rewards * ~desirable).sum() / n_bad,
                  "logps/chosen": (policy_logps.detach() * desirable).sum() / n_good,
                  "logps/rejected": (policy_logps.detach() * ~desirable).sum() / n_bad, "kl": kl}


def tokens(rows):
    """Tokens of the trained rows (padding not counted), for tok/s on stdout."""
    return sum(len(p) + len(y) - 1 for p, y, _ in rows)
