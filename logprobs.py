"""
Log-probabilities of responses, the quantity every preference loss is a function of.

    token_logps          logits (B, T, V) -> log p(target) at every position, (B, T), always float32
    summed_logps         per-token log-probs + response mask -> summed log-prob and token count per row
    average_logps        summed log-prob / token count: the per-token mean (0 for an empty response)
    concatenated_logps   a model + pairs -> chosen and rejected log-probs from ONE forward over 2B rows
    prefix_shared_logps  the same from B packed rows [prompt | chosen | rejected]: the prompt runs once
                         (packed_row_logps: the same from such rows' logits)
    reference_table      a reference's log-probs of every pair, once (--precompute_ref)
    completion_logps     a model + (prompt, completion) rows -> summed log-probs (KTO's unpaired rows)

Naming, as everywhere in this repo: *_logps are summed over a response's tokens + EOS, (B,); *_avg_logps are
those divided by the token count. Log-probs are float32 whatever the autocast dtype: losses take differences
of sums of them, and bf16 rounding would swamp a small margin.
"""

import torch

from data import collate, collate_pairs, collate_prefix_shared, padded_length
from model import block_mask


def token_logps(logits, targets):
    """logits (B, T, V) in any dtype, targets (B, T) -> log p(targets) (B, T) in float32."""
    logps = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    return torch.gather(logps, 2, targets.unsqueeze(-1)).squeeze(-1)


def summed_logps(per_token, mask):
    """Sum per-token log-probs over the response (mask = 1 on response tokens and EOS, 0 on prompt and padding).
    per_token, mask: (B, T). Returns (logps, n_tokens), both (B,): the summed log-prob and how many tokens it
    sums (float). An empty mask gives logps 0 and n_tokens 0."""
    keep = mask.bool()
    # where, not multiply: a -inf log-prob at a masked (padding) position must not turn the sum into NaN
    return torch.where(keep, per_token, torch.zeros_like(per_token)).sum(-1), keep.to(per_token.dtype).sum(-1)


def average_logps(logps, n_tokens):
    """Per-token average log-prob of each response, (B,): logps / n_tokens, with 0 tokens giving 0 (not NaN)."""
    return logps / n_tokens.clamp(min=1)


def concatenated_logps(model, pairs, pad_id, block_size, device, multiple=1):
    """Pairs [(prompt_ids, chosen_ids, rejected_ids)] -> (chosen_logps, rejected_logps, chosen_n, rejected_n),
    (B,) each, from ONE forward of `model` over 2B right-padded rows, chosen first then rejected (the
    'concatenated forward'). multiple: pad the length up to a multiple of it (for torch.compile's shapes)."""
    T = max(len(p) + max(len(c), len(r)) for p, c, r in pairs) - 1
    idx, targets, mask = collate_pairs(pairs, pad_id, padded_length(T, block_size, multiple))  # (2B, T) each
    logits, _ = model(idx.to(device))  # (2B, T, V)
    logps, n_tokens = summed_logps(token_logps(logits, targets.to(device)), mask.to(device))  # (2B,) each
    B = len(pairs)
    return logps[:B], logps[B:], n_tokens[:B], n_tokens[B:]


def prefix_shared_logps(model, pairs, pad_id, block_size, device, multiple=1, flex=False):
    """The same four (B,) tensors as concatenated_logps, from B packed rows [prompt | chosen | rejected]: an
    attention mask keeps the two branches apart and position ids restart after the prompt, so every token sees
    what it sees in its plain row (data.collate_prefix_shared draws the layout). flex: the mask as a
    FlexAttention BlockMask (GPUs), else a boolean mask for SDPA."""
    T = max(len(p) + len(c) + len(r) - 2 for p, c, r in pairs)
    batch = {k: v.to(device) for k, v in
             collate_prefix_shared(pairs, pad_id, padded_length(T, 2 * block_size, multiple)).items()}
    mask = block_mask(batch["attn_mask"]) if flex else batch["attn_mask"]  # (B, 1, T, T) bool
    logits, _ = model(batch["idx"], pos=batch["pos"], attn_mask=mask)  # (B, T, V)
    return packed_row_logps(logits, batch)


def packed_row_logps(logits, batch):
    """Logits (B, T, V) of a data.collate_prefix_shared batch -> (chosen_logps, rejected_logps, chosen_n,
    rejected_n), (B,) each, as the concatenated forward gives them."""
    per_token = token_logps(logits, batch["targets"])  # (B, T)
    chosen_logps, chosen_n = summed_logps(per_token, batch["chosen_mask"])
    rejected_logps, rejected_n = summed_logps(per_token, batch["rejected_mask"])
    # the first rejected token: a second gather from the last prompt column, whose logits both branches share
    first_logits = logits[torch.arange(logits.size(0), device=logits.device), batch["first_index"]]  # (B, V)
    first_logps = token_logps(first_logits[:, None], batch["first_target"][:, None])[:, 0]  # (B,)
    return chosen_logps, rejected_logps + first_logps, chosen_n, rejected_n + 1


def completion_logps(model, seqs, pad_id, block_size, device, multiple=1):
    """Summed log-probs of [(prompt_ids, completion_ids)] rows, (B,): KTO's unpaired examples."""
    T = max(len(p) + len(r) for p, r in seqs) - 1
    idx, targets, mask = collate(seqs, pad_id, padded_length(T, block_size, multiple))
    logits, _ = model(idx.to(device))
    return summed_logps(token_logps(logits, targets.to(device)), mask.to(device))[0]


@torch.no_grad()
def reference_table(reference, pairs, pair_logps, batch_size, autocast):
    """--precompute_ref: (N, 2) summed log-probs of every pair's chosen ([:, 0]) and rejected ([:, 1]) response
    under the reference, computed once, batch_size pairs at a time; pair_logps(model, pairs) is dpo.py's layout
    (concatenated_logps or prefix_shared_logps with its settings), autocast() its precision."""
    table = torch.zeros(len(pairs), 2)
    for i in range(0, len(pairs), batch_size):
        with autocast():
            rc, rr, _, _ = pair_logps(reference, pairs[i:i + batch_size])
        table[i:i + batch_size] = torch.stack([rc, rr], dim=1).float().cpu()
    return table


# Tokens each layout runs through the model per pair (padding not counted): for tok/s and MFU on stdout
def concatenated_tokens(pairs):
    return sum(2 * len(p) + len(c) + len(r) - 2 for p, c, r in pairs)


def prefix_shared_tokens(pairs):
    return sum(len(p) + len(c) + len(r) - 2 for p, c, r in pairs)
