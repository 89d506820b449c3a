"""
Log-probabilities of responses, the quantity every preference loss is a function of.

    token_logps          logits (B, T, V) -> log p(target) at every position, (B, T),
                         always float32
    summed_logps         per-token log-probs + response mask -> summed log-prob and token count
                         per row
    average_logps        summed log-prob / token count: the per-token mean (0 for an empty response)
    concatenated_logps   a model + pairs -> chosen and rejected log-probs from ONE forward over
                         2B rows
    prefix_shared_logps  the same from B rows [prompt | chosen | rejected]: the prompt runs once
                         (prefix_shared_row_logps: the same from such rows' logits)
    packed_logps         the same from packed rows (--packing, data.pack): several pairs per row,
                         no padding between them (completion_logps packs SFT's and KTO's rows)
    completion_logps     a model + (prompt, completion) rows -> summed log-probs and token counts
                         (SFT, KTO)
    logps_table          a model + all pairs -> their summed log-probs as a table
                         (the precomputed reference)
    length_desensitized  LD-DPO (--ld_alpha): the tail of the longer response counts alpha times
    wpo_token_logps      WPO (--use_weighting): per-token log-weights, and wpo_weights,
                         a pair's weight

Two paths give the same numbers (--logprobs in sft.py and dpo.py):
    plain    the reference implementation, the one to read first: logits at every position,
             (B, T, V), then token_logps and summed_logps. Half of a typical row is prompt, whose
             log-probs are thrown away, and at GPT-2's 50,257 tokens each (B, T, V) float32 copy is
             the largest tensor of the step.
    chunked  scored_columns picks, per row, the K columns whose target a mask counts (response
             tokens and EOS); the model's forward (score=...) gathers their hidden states and
             model.target_logps turns them into log p(target) a chunk of rows at a time,
             recomputing a chunk's logits in backward instead of keeping them. The LM head runs at
             K of T positions, and the extra memory is O(chunk x V). With chunk=0 the K columns'
             logits are made at once and plain autograd keeps them for backward: no logits made
             twice (faster), for memory O(K x V): the speed of the idea, without its memory saving.
             WPO needs the whole distribution at every scored token, so --use_weighting runs the
             plain path.

Naming, as everywhere in this repo: *_logps are summed over a response's tokens + EOS, (B,);
*_avg_logps are those divided by the token count. Log-probs are float32 whatever the autocast
dtype: losses take differences of sums of them, and bf16 rounding would swamp a small margin.
"""

import torch

from data import collate, collate_pairs, collate_prefix_shared, pack, padded_length
from model import Segments, block_mask, document_block_mask


def token_logps(logits, targets):
    """logits (B, T, V) in any dtype, targets (B, T) -> log p(targets) (B, T) in float32 (float64
    for float64 logits, as the chunked path gives them)."""
    logps = torch.log_softmax(at_least_float32(logits), dim=-1)  # (B, T, V)
    return torch.gather(logps, 2, targets.unsqueeze(-1)).squeeze(-1)


def at_least_float32(x):
    """bf16 / fp16 -> float32; float32 and float64 as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def summed_logps(per_token, mask):
    """Sum per-token log-probs over the response (mask = 1 on response tokens and EOS, 0 on prompt
    and padding). per_token, mask: (B, T). Returns (logps, n_tokens), both (B,): the summed log-prob
    and how many tokens it sums (float). An empty mask gives logps 0 and n_tokens 0."""
    keep = mask.bool()
    # where, not multiply: a -inf log-prob at a masked (padding) position must not turn the sum
    # into NaN
    logps = torch.where(keep, per_token, torch.zeros_like(per_token)).sum(-1)
    n_tokens = keep.to(per_token.dtype).sum(-1)
    return logps, n_tokens


def average_logps(logps, n_tokens):
    """Per-token average log-prob of each response, (B,): logps / n_tokens, with 0 tokens giving 0
    (not NaN)."""
    return logps / n_tokens.clamp(min=1)


def concatenated_logps(model, pairs, pad_id, block_size, device, multiple=1, logprobs="plain",
                       chunk=1024, ld_alpha=1.0, wpo=False):
    """Pairs [(prompt_ids, chosen_ids, rejected_ids)] -> (chosen_logps, rejected_logps, chosen_n,
    rejected_n), (B,) each, from ONE forward of `model` over 2B right-padded rows, chosen first then
    rejected (the 'concatenated forward'). multiple: pad the length up to a multiple of it (for
    torch.compile's shapes). logprobs: 'plain' or 'chunked' (the module docstring); chunk: rows of
    logits at a time (0: all, kept for backward), chunked only.
    ld_alpha < 1: the summed log-probs are LD-DPO's (length_desensitized). wpo: a fifth tensor, each
    pair's WPO weight (wpo_weights), detached."""
    # the longest row, less one: a row of n tokens gives n - 1 (input, next token) positions
    T = max(len(p) + max(len(c), len(r)) for p, c, r in pairs) - 1
    length = padded_length(T, block_size, multiple)
    idx, targets, mask = collate_pairs(pairs, pad_id, length)  # (2B, T) each
    # the same numbers, the LM head only where mask = 1: (2B, K) each
    if _chunked(logprobs) and not wpo:
        batch = {"idx": idx, "targets": targets, "mask": mask}
        per_token, scored = chunked_token_logps(model, batch, device, chunk, multiple)
        mask = scored["mask"]
    else:
        # No attention mask is needed: the padding is on the right and attention is causal, so no
        # real token ever attends to it (and the mask drops the padding's own log-probs).
        logits = model(idx.to(device))  # (2B, T, V)
        targets, mask = targets.to(device), mask.to(device)
        per_token = token_logps(logits, targets)  # (2B, T)
    logps, n_tokens = summed_logps(per_token, mask)  # (2B,) each
    B = len(pairs)
    if ld_alpha != 1.0:
        public_n = torch.minimum(n_tokens[:B], n_tokens[B:]).repeat(2)
        logps = length_desensitized(per_token, mask, public_n, ld_alpha)
    out = (logps[:B], logps[B:], n_tokens[:B], n_tokens[B:])
    if wpo:
        log_w = summed_logps(wpo_token_logps(logits, targets), mask)[0]  # (2B,)
        out += (wpo_weights(log_w[:B], log_w[B:], n_tokens[:B], n_tokens[B:]),)
    return out


def prefix_shared_logps(model, pairs, pad_id, block_size, device, multiple=1, flex=False,
                        logprobs="plain", chunk=1024, ld_alpha=1.0, wpo=False):
    """The same four (B,) tensors as concatenated_logps, from B prefix-shared rows [prompt |
    chosen | rejected]: an attention mask keeps the two branches apart and position ids restart
    after the prompt, so every token sees what it sees in its plain row
    (data.collate_prefix_shared draws the layout). flex: the mask as a FlexAttention BlockMask
    (GPUs), else a boolean mask for SDPA. logprobs, chunk, ld_alpha, wpo: as in
    concatenated_logps."""
    T = max(len(p) + len(c) + len(r) - 2 for p, c, r in pairs)
    batch = collate_prefix_shared(pairs, pad_id, padded_length(T, 2 * block_size, multiple))
    if _chunked(logprobs) and not wpo:
        # per_token is (B, K + 1): the first rejected token comes back as the last column
        # (scored_columns)
        per_token, scored = chunked_token_logps(model, batch, device, chunk, multiple, flex)
        return _prefix_shared_sums(per_token[:, :-1], scored["chosen_mask"][:, :-1],
                            scored["rejected_mask"][:, :-1], per_token[:, -1], ld_alpha)
    batch = {k: v.to(device) for k, v in batch.items()}
    mask = block_mask(batch["attn_mask"]) if flex else batch["attn_mask"]  # (B, 1, T, T) bool
    logits = model(batch["idx"], pos=batch["pos"], attn_mask=mask)  # (B, T, V)
    return prefix_shared_row_logps(logits, batch, ld_alpha, wpo)


def prefix_shared_row_logps(logits, batch, ld_alpha=1.0, wpo=False):
    """Logits (B, T, V) of a data.collate_prefix_shared batch -> (chosen_logps, rejected_logps,
    chosen_n, rejected_n), (B,) each, as the concatenated forward gives them (and with ld_alpha,
    wpo, as it does)."""
    per_token = token_logps(logits, batch["targets"])  # (B, T)
    # the first rejected token: a second gather from the last prompt column, whose logits both
    # branches share
    rows = torch.arange(logits.size(0), device=logits.device)
    first_logits = logits[rows, batch["first_index"]][:, None]
    first_logps = token_logps(first_logits, batch["first_target"][:, None])[:, 0]  # (B,)
    out = _prefix_shared_sums(per_token, batch["chosen_mask"], batch["rejected_mask"], first_logps,
                       ld_alpha)
    if wpo:
        chosen_n, rejected_n = out[2], out[3]
        log_w = wpo_token_logps(logits, batch["targets"])  # (B, T)
        first_w = wpo_token_logps(first_logits, batch["first_target"][:, None])[:, 0]
        chosen_log_w = summed_logps(log_w, batch["chosen_mask"])[0]
        rejected_log_w = summed_logps(log_w, batch["rejected_mask"])[0] + first_w
        out += (wpo_weights(chosen_log_w, rejected_log_w, chosen_n, rejected_n),)
    return out


def _prefix_shared_sums(per_token, chosen_mask, rejected_mask, first_logps, ld_alpha):
    """A prefix-shared row's summed log-probs and counts from its per-token log-probs, the
    branches' masks and the first rejected token's log-prob (B,), which the masks leave out."""
    chosen_logps, chosen_n = summed_logps(per_token, chosen_mask)
    rejected_logps, rejected_n = summed_logps(per_token, rejected_mask)
    rejected_n = rejected_n + 1
    # the first rejected token is response token 1: always inside the shared length
    if ld_alpha != 1.0:
        public = torch.minimum(chosen_n, rejected_n)
        chosen_logps = length_desensitized(per_token, chosen_mask, public, ld_alpha)
        rejected_logps = length_desensitized(per_token, rejected_mask, public, ld_alpha, first=2)
    return chosen_logps, rejected_logps + first_logps, chosen_n, rejected_n


def completion_logps(model, seqs, pad_id, block_size, device, multiple=1, logprobs="plain",
                     chunk=1024, packing=None):
    """[(prompt_ids, completion_ids)] rows -> (summed log-probs, token counts), (B,) each: SFT's
    rows, KTO's unpaired examples. packing: None (padded rows), or a Packing: the rows packed
    (packed_token_logps)."""
    T = max(len(p) + len(r) for p, r in seqs) - 1
    idx, targets, mask = collate(seqs, pad_id, padded_length(T, block_size, multiple))
    if packing is not None:
        rows = {"idx": idx, "targets": targets, "mask": mask}
        lengths = [len(p) + len(r) - 1 for p, r in seqs]
        per_token, _, batch = packed_token_logps(model, rows, lengths, pad_id, device, multiple,
                                                 packing, logprobs, chunk)
        return sums_by_id(per_token, batch["ids"], batch["n_sums"])
    if _chunked(logprobs):
        batch = {"idx": idx, "targets": targets, "mask": mask}
        per_token, scored = chunked_token_logps(model, batch, device, chunk, multiple)
        return summed_logps(per_token, scored["mask"])
    logits = model(idx.to(device))
    return summed_logps(token_logps(logits, targets.to(device)), mask.to(device))


@torch.no_grad()
def logps_table(pair_logps, model, pairs, batch_size, autocast):
    """(N, 2) float32 table on the CPU of `model`'s summed log-probs of every pair, [:, 0] chosen
    and [:, 1] rejected, batch_size pairs at a time under no_grad: dpo.py's precomputed reference.
    pair_logps(model, pairs) is concatenated_logps or prefix_shared_logps with their layout;
    autocast() the run's autocast context."""
    table = torch.zeros(len(pairs), 2)
    for i in range(0, len(pairs), batch_size):
        with autocast():
            chosen, rejected, _, _ = pair_logps(model, pairs[i:i + batch_size])
        table[i:i + batch_size] = torch.stack([chosen, rejected], dim=1).float().cpu()
    return table


# --------------------------------------------------------------------------------------------------
# Packed rows (--packing): several pairs per row, no padding between them (data.pack draws one)

class Packing:
    """How to pack: pack_tokens, the tokens a packed row may hold (0: one row per micro-batch);
    flex, the attention: FlexAttention's document mask (a GPU's default) or model.Segments (a CPU,
    or --attention=sdpa)."""

    def __init__(self, pack_tokens=0, flex=False):
        self.pack_tokens = pack_tokens
        self.flex = flex


def packed_logps(model, pairs, pad_id, block_size, device, multiple=1, packing=None,
                 prefix_sharing=False, logprobs="plain", chunk=1024, ld_alpha=1.0, wpo=False):
    """The same four (B,) tensors as concatenated_logps (five with wpo), from packed rows: each
    pair's two rows [prompt | chosen] and [prompt | rejected] (or, with prefix_sharing, its one row
    [prompt | chosen | rejected]) laid end to end with the other pairs' (data.pack). Each segment
    keeps its positions and attends within itself, so the numbers are the padded layout's, but the
    trunk runs no padding. packing: a Packing; logprobs, chunk, ld_alpha, wpo: as in
    concatenated_logps."""
    packing = packing or Packing()
    B = len(pairs)
    # the padded rows first (their masks and targets say what is scored), then packed
    if prefix_sharing:
        lengths = [len(p) + len(c) + len(r) - 2 for p, c, r in pairs]
        width = padded_length(max(lengths), 2 * block_size, multiple)
        rows = collate_prefix_shared(pairs, pad_id, width)
    else:
        lengths = ([len(p) + len(c) - 1 for p, c, _ in pairs]
                   + [len(p) + len(r) - 1 for p, _, r in pairs])
        width = padded_length(max(lengths), block_size, multiple)
        idx, targets, mask = collate_pairs(pairs, pad_id, width)
        rows = {"idx": idx, "targets": targets, "mask": mask}
    per_token, log_w, batch = packed_token_logps(model, rows, lengths, pad_id, device, multiple,
                                                 packing, logprobs, chunk, wpo)
    # ids 0..B-1: the chosen responses, B..2B-1: the rejected ones, in the pairs' order
    ids = batch["ids"]
    logps, n_tokens = sums_by_id(per_token, ids, 2 * B)  # (2B,) each
    if ld_alpha != 1.0:
        # LD-DPO (length_desensitized): tokens past the pair's shared length count ld_alpha times
        public_n = torch.minimum(n_tokens[:B], n_tokens[B:]).repeat(2)  # (2B,)
        shared = batch["rank"] <= public_n[ids.clamp(min=0)]  # (R, K)
        weighted = torch.where(shared, per_token, ld_alpha * per_token)
        logps = sums_by_id(weighted, ids, 2 * B)[0]
    out = (logps[:B], logps[B:], n_tokens[:B], n_tokens[B:])
    if wpo:
        log_w = sums_by_id(log_w, ids, 2 * B)[0]
        out += (wpo_weights(log_w[:B], log_w[B:], n_tokens[:B], n_tokens[B:]),)
    return out


def packed_token_logps(model, rows, lengths, pad_id, device, multiple, packing, logprobs, chunk,
                       wpo=False):
    """Padded rows (collate, collate_pairs or collate_prefix_shared) and their real lengths ->
    packed (packed_batch) -> the model (packed_batch_logps): (per-token log-probs (R, K) at the
    scored tokens, float32; WPO's per-token log-weights there with wpo, else None; the packed batch
    on the device, whose ids (R, K) say whose sum each token adds to)."""
    batch = packed_batch(rows, lengths, pad_id, device, multiple, packing)
    per_token, log_w = packed_batch_logps(model, batch, logprobs, chunk, wpo)
    return per_token, log_w, batch


def packed_batch(rows, lengths, pad_id, device, multiple, packing):
    """The host's half: padded rows -> data.pack's dict on the device, plus its attention,
    'attn_mask': FlexAttention's document mask or model.Segments."""
    packed_multiple = multiple
    if packing.pack_tokens == 0 and multiple > 1:
        # compile: one row stands in for S padded rows, so rounding its length to S times the
        # multiple leaves as few shapes (graphs to compile) as rounding each row to the multiple
        packed_multiple = multiple * len(lengths)
    # each attention group's width: rounded up as a padded row's length would be
    batch = pack(rows, lengths, pad_id, packing.pack_tokens, packed_multiple,
                 group_multiple=multiple)
    seg_mask = batch.pop("seg_mask")
    group_masks = batch.pop("group_masks")
    attn_mask = None
    if packing.flex:
        # from the host's tensors: the tiles are found without a GPU sync per segment
        attn_mask = document_block_mask(batch["doc"], batch["local"], seg_mask, device=device)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    if packing.flex:
        batch["attn_mask"] = attn_mask
    else:
        if group_masks is not None:
            group_masks = [m.to(device) for m in group_masks]
        packed_real = batch["doc"].flatten() >= 0
        batch["attn_mask"] = Segments(batch["index"], batch["inverse"], packed_real,
                                      batch["slot_real"], batch["groups"], group_masks)
    return batch


def packed_batch_logps(model, batch, logprobs, chunk, wpo=False):
    """The model's half: a packed_batch -> (per-token log-probs (R, K) at its scored tokens,
    float32; WPO's per-token log-weights there with wpo, else None)."""
    if _chunked(logprobs) and not wpo:
        # the LM head at the scored tokens only, as on the padded chunked path
        per_token = model(batch["idx"], pos=batch["pos"], attn_mask=batch["attn_mask"],
                          score=(batch["cols"], batch["targets"]), chunk=chunk)  # (R, K)
        return per_token, None
    logits = model(batch["idx"], pos=batch["pos"], attn_mask=batch["attn_mask"])  # (R, T, V)
    # the logits at the scored columns, (R, K, V); a column that predicts two targets (a
    # prefix-shared pair's last prompt column: c0 and r0) is read twice
    rows = torch.arange(logits.size(0), device=logits.device)[:, None]
    logits = logits[rows, batch["cols"]]
    per_token = token_logps(logits, batch["targets"])  # (R, K)
    log_w = None
    if wpo:
        log_w = wpo_token_logps(logits, batch["targets"])
    return per_token, log_w


def sums_by_id(values, ids, n):
    """Per-token values (R, K) summed by ids (R, K) into n sums, ids -1 left out -> (sums, counts),
    (n,) each: a packed batch's summed log-probs and token counts per response."""
    keep = ids >= 0
    # where, not multiply: a padding entry's value must not reach a sum, even as NaN * 0
    values = torch.where(keep, values, torch.zeros_like(values)).flatten()
    slots = ids.clamp(min=0).flatten()
    sums = values.new_zeros(n).scatter_add(0, slots, values)
    counts = values.new_zeros(n).scatter_add(0, slots, keep.flatten().to(values.dtype))
    return sums, counts


# --------------------------------------------------------------------------------------------------
# Training-dynamics options that act on the log-probs: LD-DPO and WPO

def length_desensitized(per_token, mask, public_n, alpha, first=1):
    """LD-DPO ("Length Desensitization in Direct Preference Optimization", Liu et al. 2024,
    arXiv:2409.06411): a response's log-prob with the tokens past the pair's shared length
    discounted,

        log pi_LD(y) = sum over the first l_p response tokens of log p(y_t)
                       + alpha * sum over the rest

    with l_p = public_n = min(chosen tokens, rejected tokens) of the pair, (B,). Summed log-probs
    grow with length, so DPO can raise a margin by lengthening the chosen answer (or shortening the
    rejected one); alpha < 1 shrinks what the excess length of the longer response can contribute,
    to the log-probs and to their gradient. alpha = 1 is the plain sum. per_token, mask: (B, T);
    first: the index (1-based) of the first response token mask covers (2 for a packed row's
    rejected branch, whose first token is gathered apart). Applied to both models, so
    policy = reference still gives DPO's ln 2 (TRL applies it to the policy only; the gradient is
    the same, the margin at the start is not). Returns (B,)."""
    # (B, T): the response-token index of each masked position
    position = mask.cumsum(-1) + (first - 1)
    weighted = torch.where(position <= public_n[:, None], per_token, alpha * per_token)
    return summed_logps(weighted, mask)[0]


@torch.no_grad()
def wpo_token_logps(logits, targets):
    """WPO's per-token log-weights ("WPO: Enhancing RLHF with Weighted Preference Optimization",
    Zhou et al. 2024, arXiv:2406.11827, eq. 2, aligned version, as TRL's use_weighting):

        log w_t = log p(y_t) - log sum_v p(v)^2          # (B, T) float32, no gradient

    sum_v p(v)^2 is the probability the policy gives, on average, to a token sampled from itself, so
    dividing by it makes a response the policy would itself produce weigh ~1 at every position,
    however peaked the distribution is."""
    logps = torch.log_softmax(at_least_float32(logits), dim=-1)  # (B, T, V)
    target_logps = torch.gather(logps, 2, targets.unsqueeze(-1)).squeeze(-1)
    return target_logps - torch.logsumexp(2 * logps, dim=-1)


def wpo_weights(chosen_log_w, rejected_log_w, chosen_n, rejected_n):
    """A pair's WPO weight from the summed per-token log-weights of its two responses, (B,) each:

        weight = min(1, exp(mean_t log w_t(chosen) + mean_t log w_t(rejected)))

    Preference data sampled far from the current policy (off-policy) weighs less: WPO reweights
    towards the on-policy pairs DPO's derivation assumes. Per-token means, so a long response is not
    penalised for its length. Detached; the pairwise losses multiply each pair's loss by it
    (losses.batch_mean)."""
    log_w = average_logps(chosen_log_w, chosen_n) + average_logps(rejected_log_w, rejected_n)
    return torch.exp(log_w).clamp(max=1)


# --------------------------------------------------------------------------------------------------
# The chunked path

MASKS = ("mask", "chosen_mask", "rejected_mask")  # the masks a collated batch may have (data.py)


AUTO_CHUNKED_VOCAB = 4096  # --logprobs=auto: the chunked path from this vocabulary size up


def logprob_path(logprobs, vocab_size):
    """The path --logprobs names, 'auto' resolved by the vocabulary: 'chunked' from
    AUTO_CHUNKED_VOCAB tokens up (at GPT-2's 50,257 the LM head is a third of the FLOPs and its
    logits most of the activation memory), else 'plain' (at the embedded task's 258 the head is
    about 1% of the FLOPs, so chunking saves nothing, and the plain path is the one to read; the two
    paths differ in the last bits, which 1,500 SFT steps grow into a different model)."""
    if logprobs != "auto":
        return logprobs
    if vocab_size >= AUTO_CHUNKED_VOCAB:
        return "chunked"
    return "plain"


def _chunked(logprobs):
    if logprobs not in ("chunked", "plain"):
        raise ValueError(f"logprobs='{logprobs}': expected 'chunked' or 'plain'")
    return logprobs == "chunked"


def scored_columns(batch, multiple=1):
    """A collated CPU batch (data.collate, collate_pairs or collate_prefix_shared) -> the same batch
    seen only where a target is scored: cols (B, K), each row's columns where some mask is 1, in
    order, right-padded to the longest row's count (rounded up to `multiple`, for torch.compile's
    shapes) with columns no mask counts; the targets and every mask gathered at cols, (B, K) too.
    For example, a collated row

        column   0   1   2   3   4   5
        targets  p1  p2  c0  c1  E   pad      ->  cols 2 3 4, targets c0 c1 E, mask 1 1 1
        mask     0   0   1   1   1   0

    A prefix-shared row's first rejected token, predicted from the last prompt column
    (first_index), becomes one more column at the end, counted by rejected_mask: the hidden state
    of that column is gathered twice."""
    masks = [k for k in MASKS if k in batch]
    scored = sum(batch[k] for k in masks) > 0  # (B, T) bool
    K = padded_length(int(scored.sum(1).max()), scored.size(1), multiple)
    # scored columns first, in their order
    cols = torch.argsort((~scored).int(), dim=1, stable=True)[:, :K]
    # padding slots: unscored columns, all masks 0
    out = dict(batch, cols=cols, targets=batch["targets"].gather(1, cols),
               **{k: batch[k].gather(1, cols) for k in masks})
    if "first_index" in batch:
        ones = torch.ones(cols.size(0), 1)
        out["cols"] = torch.cat([cols, batch["first_index"][:, None]], 1)  # (B, K + 1)
        out["targets"] = torch.cat([out["targets"], batch["first_target"][:, None]], 1)
        out["chosen_mask"] = torch.cat([out["chosen_mask"], 0 * ones], 1)
        out["rejected_mask"] = torch.cat([out["rejected_mask"], ones], 1)
    return out


def chunked_token_logps(model, batch, device, chunk, multiple=1, flex=False):
    """The chunked path for a collated CPU batch -> (per-token log-probs (B, K) at the scored
    columns, float32; the batch seen there, scored_columns' dict on the device, whose masks sum them
    as summed_logps does on the plain path). The model's forward gathers the hidden states at the
    scored columns and runs the LM head there only, `chunk` rows at a time (model.GPT.forward's
    `score`)."""
    batch = {k: v.to(device) for k, v in scored_columns(batch, multiple).items()}
    attn_mask = batch.get("attn_mask")  # prefix-shared rows: (B, 1, T, T) bool
    if flex and attn_mask is not None:
        attn_mask = block_mask(attn_mask)
    per_token = model(batch["idx"], pos=batch.get("pos"), attn_mask=attn_mask,
                      score=(batch["cols"], batch["targets"]), chunk=chunk)  # (B, K), float32
    return per_token, batch


# Tokens each layout runs through the model per pair (padding not counted): for tok/s and MFU on
# stdout
def concatenated_tokens(pairs):
    return sum(2 * len(p) + len(c) + len(r) - 2 for p, c, r in pairs)


def prefix_shared_tokens(pairs):
    return sum(len(p) + len(c) + len(r) - 2 for p, c, r in pairs)
