"""
Text -> tensors: the tokenizer, encoding rows into token ids (truncation, skipped rows counted),
collation into padded batches with masks, prefix-shared packing, and a resumable batch order.

The masking rule, used by SFT and every preference loss alike: a row is [prompt | response | EOS];
the model reads it shifted by one (inputs = tokens[:-1], targets = tokens[1:]) and the mask is 1
exactly on the targets that are response tokens or the EOS, never on prompt or padding.
"""

import tiktoken
import torch

from configurator import UserError

# --------------------------------------------------------------------------------------------------
# Tokenisation

class Tokenizer:
    """A thin wrapper over a tiktoken Encoding that knows its EOS and padding ids.

    'byte': 256 byte tokens + <|endoftext|> (256) + <|pad|> (257), built offline; any text encodes
            losslessly.
    'gpt2': GPT-2's BPE (tiktoken's r50k_base, 50,257 tokens); padding reuses <|endoftext|> (50256),
            which is harmless because padding is always masked out.
    The name is stored in every checkpoint; loading a checkpoint with another tokenizer is an
    error."""

    def __init__(self, name):
        self.name = name
        if name == "byte":
            # pat_str: one piece per character; its UTF-8 bytes become one token each
            self.enc = tiktoken.Encoding(
                name="byte",
                pat_str=r"[\s\S]",
                mergeable_ranks={bytes([i]): i for i in range(256)},
                special_tokens={"<|endoftext|>": 256, "<|pad|>": 257},
            )
            self.eos_id = 256
            self.pad_id = 257
        elif name == "gpt2":
            try:
                self.enc = tiktoken.get_encoding("r50k_base")
            except Exception as e:
                # no network and no cached file
                raise UserError(
                    "could not load the GPT-2 BPE (tiktoken 'r50k_base'): set TIKTOKEN_CACHE_DIR "
                    "to a folder holding its rank file, or allow tiktoken to download it "
                    f"({type(e).__name__})") from None
            self.eos_id = self.enc.eot_token
            self.pad_id = self.enc.eot_token
        else:
            raise UserError(f"unknown tokenizer '{name}': expected 'byte' or 'gpt2'")
        self.n_vocab = self.enc.n_vocab

    def encode(self, text):
        # encode_ordinary: a user's text that happens to contain "<|endoftext|>" stays plain text
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        """Ids -> text. Padding and ids past the vocabulary (a model's table may be rounded up) are
        dropped."""
        # (GPT-2's padding id is its EOS id, which stays)
        is_padding = [i == self.pad_id and i != self.eos_id for i in ids]
        keep = [i for i, pad in zip(ids, is_padding) if i < self.n_vocab and not pad]
        return self.enc.decode(keep)


# --------------------------------------------------------------------------------------------------
# Rows -> token ids (with truncation) -> padded tensors

def truncate(prompt_ids, responses, max_len, max_prompt_len):
    """Fit [prompt | response] (each response already ends in EOS) into max_len tokens, for one or
    more responses sharing the prompt: first keep only the last max_prompt_len prompt tokens (the
    end of a prompt matters most to its answer), then cut the responses' tails. Returns
    (prompt_ids, [response_ids, ...]), or None when the prompt or a response would be left empty."""
    if len(prompt_ids) + max(len(r) for r in responses) > max_len:
        # at most max_len - 1 prompt tokens, so every response keeps at least one token
        prompt_ids = prompt_ids[-min(max_prompt_len, max_len - 1):]
        responses = [r[:max_len - len(prompt_ids)] for r in responses]
    if len(prompt_ids) == 0 or min(len(r) for r in responses) == 0:
        return None
    return prompt_ids, responses


class SkipCounter:
    """Counts rows left out and why, and rows cut to fit block_size and how, so a run reports them
    instead of dropping or cutting them silently. `shortest`: the fewest tokens any row needed whole
    (prompt + response + EOS), for the error when no row fits."""

    def __init__(self):
        self.reasons = {}
        self.cuts = {}
        self.rows_cut = 0
        self.shortest = None

    def add(self, reason):
        self.reasons[reason] = self.reasons.get(reason, 0) + 1

    def add_cut(self, how):
        """One more row cut to fit; how: 'prompt cut from the left' and/or 'response cut'."""
        self.rows_cut += 1
        for kind in how:
            self.cuts[kind] = self.cuts.get(kind, 0) + 1

    def saw_row(self, n_tokens):
        """A row that needs n_tokens whole."""
        if self.shortest is None or n_tokens < self.shortest:
            self.shortest = n_tokens

    def total(self):
        return sum(self.reasons.values())

    def add_all(self, other):
        for reason, n in other.reasons.items():
            self.reasons[reason] = self.reasons.get(reason, 0) + n
        for kind, n in other.cuts.items():
            self.cuts[kind] = self.cuts.get(kind, 0) + n
        self.rows_cut += other.rows_cut
        if other.shortest is not None:
            self.saw_row(other.shortest)

    def truncated(self):
        """'none', or how many rows were cut and how: '3 rows (2 prompt cut from the left, ...)'."""
        if self.rows_cut == 0:
            return "none"
        how = ", ".join(f"{n} {kind}" for kind, n in sorted(self.cuts.items()))
        return f"{self.rows_cut} rows ({how})"

    def __str__(self):
        return ", ".join(f"{n} {r}" for r, n in sorted(self.reasons.items())) or "none"


def check_rows_fit(rows, counter, block_size, source):
    """Stop with one line when every encoded row had to be cut to fit block_size: the run would
    learn from nothing but fragments (a block_size of 2 on the embedded task cuts every answer)."""
    if rows and counter.rows_cut == len(rows):
        raise UserError(f"{source}: block_size={block_size} fits no row whole (every one of "
                        f"{len(rows)} was cut); the shortest needs {counter.shortest} tokens "
                        f"(prompt + response + EOS): use --block_size={counter.shortest - 1} "
                        "or more")


def cuts_of(prompt_ids, responses, fitted):
    """How truncate() changed a row: ('prompt cut from the left',) and/or ('response cut',)."""
    prompt, kept = fitted
    how = []
    if len(prompt) < len(prompt_ids):
        how.append("prompt cut from the left")
    if any(len(k) < len(r) for k, r in zip(kept, responses)):
        how.append("response cut")
    return how


def _check_text(row, key, where):
    if key not in row:
        raise UserError(f"{where}: missing key '{key}'")
    if not isinstance(row[key], str):
        raise UserError(f"{where}: key '{key}' should be a string, found {type(row[key]).__name__}")
    return row[key]


def encode_sft_rows(rows, tok, block_size, max_prompt_len=None, source="sft data",
                    allow_empty=False):
    """[{'prompt', 'response'}] -> [(prompt_ids, response_ids + [EOS])], truncated to
    block_size + 1 tokens (the model reads block_size of them). Rows with an empty response are
    skipped and counted, unless allow_empty: a model's own empty answer is a real one, and trains as
    EOS alone."""
    max_len = block_size + 1
    max_prompt_len = max_prompt_len or max_len // 2
    out, skipped = [], SkipCounter()
    for i, row in enumerate(rows):
        where = f"{source}, row {i}"
        prompt = _check_text(row, "prompt", where)
        response = _check_text(row, "response", where)
        if not response.strip() and not allow_empty:
            skipped.add("empty response")
            continue
        prompt_ids = tok.encode(prompt)
        responses = [tok.encode(response) + [tok.eos_id]]
        fitted = truncate(prompt_ids, responses, max_len, max_prompt_len)
        if fitted is None:
            skipped.add("empty prompt")
            continue
        skipped.saw_row(len(prompt_ids) + len(responses[0]))
        how = cuts_of(prompt_ids, responses, fitted)
        if how:
            skipped.add_cut(how)
        out.append((fitted[0], fitted[1][0]))
    return out, skipped


def encode_pair_rows(rows, tok, block_size, max_prompt_len=None, source="preference data",
                     allow_empty=False):
    """[{'prompt', 'chosen', 'rejected'}] -> [(prompt_ids, chosen_ids, rejected_ids)], each response
    ending in EOS and truncated with the same prompt. Empty responses (unless allow_empty, as in
    encode_sft_rows) and identical chosen/rejected are skipped and counted."""
    max_len = block_size + 1
    max_prompt_len = max_prompt_len or max_len // 2
    out, skipped = [], SkipCounter()
    for i, row in enumerate(rows):
        where = f"{source}, row {i}"
        prompt = _check_text(row, "prompt", where)
        chosen = _check_text(row, "chosen", where)
        rejected = _check_text(row, "rejected", where)
        if (not chosen.strip() or not rejected.strip()) and not allow_empty:
            skipped.add("empty response")
            continue
        if chosen == rejected:
            skipped.add("chosen == rejected")
            continue
        prompt_ids = tok.encode(prompt)
        responses = [tok.encode(chosen) + [tok.eos_id], tok.encode(rejected) + [tok.eos_id]]
        fitted = truncate(prompt_ids, responses, max_len, max_prompt_len)
        if fitted is None:
            skipped.add("empty prompt")
            continue
        p, (c, r) = fitted
        if c == r:
            skipped.add("chosen == rejected after truncation")
            continue
        skipped.saw_row(len(prompt_ids) + max(len(x) for x in responses))
        how = cuts_of(prompt_ids, responses, fitted)
        if how:
            skipped.add_cut(how)
        out.append((p, c, r))
    return out, skipped


def collate(sequences, pad_id, length=None):
    """[(prompt_ids, response_ids)] -> right-padded tensors, each (B, T) with T = longest row - 1
    (or `length`): idx (inputs), targets (inputs shifted by one), mask (1.0 on response and EOS
    targets only)."""
    # a row of n tokens gives n - 1 (input, next token) positions
    T = length
    if T is None:
        T = max(len(p) + len(r) for p, r in sequences) - 1
    B = len(sequences)
    idx = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T))
    for b, (p, r) in enumerate(sequences):
        tokens = torch.tensor(p + r, dtype=torch.long)
        n = len(tokens) - 1
        idx[b, :n] = tokens[:-1]
        targets[b, :n] = tokens[1:]
        # target t is token t+1: the first response token is target len(p)-1
        mask[b, len(p) - 1:n] = 1.0
    return idx, targets, mask


def padded_length(T, limit, multiple=1):
    """T rounded up to a multiple of `multiple`, at most `limit`. With torch.compile every batch is
    padded to a multiple of 16 tokens, so a handful of shapes compile once each instead of one graph
    per new length."""
    if multiple == 1:
        return T
    return min(limit, round_up(T, multiple))


def round_up(n, multiple):
    """n rounded up to a multiple of `multiple`."""
    return -(-n // multiple) * multiple


def collate_pairs(pairs, pad_id, length=None):
    """Preference pairs -> one batch of 2B rows, chosen first then rejected, padded to one length,
    so that each model needs a single forward per step (the 'concatenated forward'). Returns idx,
    targets, mask, each (2B, T), as collate does."""
    seqs = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
    return collate(seqs, pad_id, length)


# --------------------------------------------------------------------------------------------------
# Prefix sharing
#
# Chosen and rejected share their prompt. The concatenated forward runs it twice (rows
# [prompt|chosen] and [prompt|rejected]); prefix sharing packs each pair into ONE row
# [prompt | chosen | rejected] and uses an attention mask and position ids that make every token see
# exactly what it sees in its plain row. The log-probs are the same (up to float rounding); the
# prompt's compute is paid once.

# segment ids of the packed row's columns
_PROMPT = 0
_CHOSEN = 1
_REJECTED = 2
_PAD = 3


def collate_prefix_shared(pairs, pad_id, length=None):
    """Preference pairs [(prompt, chosen, rejected)] -> one shared, right-padded row per pair (a
    dict of tensors).

    Layout, for prompt p0 p1 p2, chosen c0 c1 E, rejected r0 E (E = EOS; P=3, C=3, R=2, one pad
    column):

        column         0   1   2   3   4   5   6
        idx            p0  p1  p2  c0  c1  r0  pad
        pos            0   1   2   3   4   3   0     rejected restarts at P, as in its plain row
        targets        p1  p2  c0  c1  E   E   pad
        chosen_mask    0   0   1   1   1   0   0     c0, c1, E
        rejected_mask  0   0   0   0   0   1   0     E; r0 from first_index/first_target (below)

    A response's last token (E) is only ever a target, never an input, so a row holds
    P + C + R - 2 columns. r0 has no column of its own: in the plain rejected row it is predicted by
    the last prompt token, and here the column before r0 is c1 (the chosen branch). But the last
    prompt column (P-1) attends to the prompt only, so its logits are the same for both branches: it
    predicts c0 (targets) AND r0 (first_target). A second gather at first_index = P-1 reads r0's
    log-prob; prefix_shared_logps does both.

    attn_mask[b, 0, query, key], True = may attend (x):

                   p0  p1  p2  c0  c1  r0  pad
            p0     x
            p1     x   x
            p2     x   x   x
            c0     x   x   x   x
            c1     x   x   x   x   x
            r0     x   x   x           x         the rejected branch never sees the chosen tokens
            pad                            x     pad sees only itself: no empty softmax row (NaN)

    Returns idx, targets, pos (B, T) long; attn_mask (B, 1, T, T) bool; chosen_mask, rejected_mask
    (B, T) float; first_index, first_target (B,) long. T = longest packed row, or `length`."""
    T = length or max(len(p) + len(c) + len(r) - 2 for p, c, r in pairs)
    B = len(pairs)
    idx = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), pad_id, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    segment = torch.full((B, T), _PAD, dtype=torch.long)
    chosen_mask = torch.zeros((B, T))
    rejected_mask = torch.zeros((B, T))
    first_index = torch.zeros(B, dtype=torch.long)
    first_target = torch.zeros(B, dtype=torch.long)
    for b, (p, c, r) in enumerate(pairs):
        P, C, R = len(p), len(c), len(r)
        if P == 0 or C == 0 or R == 0:
            raise ValueError(f"collate_prefix_shared: pair {b} has an empty prompt or response")
        n = P + C + R - 2
        if n > T:
            raise ValueError(f"collate_prefix_shared: pair {b} needs {n} columns, length is {T}")
        idx[b, :n] = torch.tensor(p + c[:-1] + r[:-1], dtype=torch.long)
        targets[b, :n] = torch.tensor(p[1:] + c + r[1:], dtype=torch.long)
        pos[b, :P + C - 1] = torch.arange(P + C - 1)
        pos[b, P + C - 1:n] = torch.arange(P, P + R - 1)
        segment[b, :P] = _PROMPT
        segment[b, P:P + C - 1] = _CHOSEN
        segment[b, P + C - 1:n] = _REJECTED
        # column P-1 predicts c0, ..., column P+C-2 predicts E
        chosen_mask[b, P - 1:P + C - 1] = 1.0
        # r1 .. E; r0 is the second gather
        rejected_mask[b, P + C - 1:n] = 1.0
        first_index[b] = P - 1
        first_target[b] = r[0]
    q = segment[:, :, None]  # (B, T, 1): the query's segment
    k = segment[:, None, :]  # (B, 1, T): the key's segment
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    attn_mask = causal & (q != _PAD) & (k != _PAD) & ~((q == _REJECTED) & (k == _CHOSEN))
    # real rows have their diagonal already; padding needs it
    attn_mask = attn_mask | torch.eye(T, dtype=torch.bool)
    return {"idx": idx, "targets": targets, "pos": pos, "attn_mask": attn_mask[:, None],
            "chosen_mask": chosen_mask, "rejected_mask": rejected_mask,
            "first_index": first_index, "first_target": first_target}


# --------------------------------------------------------------------------------------------------
# Packing (--packing)
#
# A padded batch holds each example in a row of its own, every row as long as the longest. On data
# whose lengths vary several-fold (most real preference data), half a step's tokens can be padding,
# and the transformer computes all of it. Packing lays the examples end to end instead; each one,
# a *segment*, keeps its own positions and attends only within itself, so every token sees what it
# sees in its padded row and the log-probs are the same (up to float rounding).
#
# Three segments of 4, 3 and 2 tokens (a, b, c), padded and packed:
#
#     padded (3 rows x 4)        packed (1 row x 9)
#     a0 a1 a2 a3                a0 a1 a2 a3 b0 b1 b2 c0 c1
#     b0 b1 b2 pad               doc  0  0  0  0  1  1  1  2  2    which segment a column holds
#     c0 c1 pad pad              pos  0  1  2  3  0  1  2  0  1    restart at every segment
#
# and the packed row's attention, True (x) where a query may attend a key: causal within a segment,
# never across (a block-diagonal mask). Prefix-shared pairs pack the same way, each segment then
# one [prompt | chosen | rejected] row with its own mask (collate_prefix_shared) as its block.
#
#              a0 a1 a2 a3 b0 b1 b2 c0 c1
#         a0   x
#         a1   x  x
#         a2   x  x  x
#         a3   x  x  x  x
#         b0               x
#         b1               x  x
#         b2               x  x  x
#         c0                        x
#         c1                        x  x
#
# The trunk's matmuls (q, k, v, the MLP: most of the FLOPs) run on the packed row, 9 tokens here
# instead of 12. Attention keeps to each segment: on a GPU FlexAttention reads the mask above and
# skips its empty blocks; on a CPU model.Segments gathers the segments' queries, keys and values
# into a padded layout of its own, segments of similar length side by side (attention_groups),
# runs causal attention there, and puts the outputs back into the packed row (pack's index and
# inverse say where each token goes).
#
# Every scored token keeps its place: `ids` says which response's sum it belongs to, so the summed
# log-probs come back as the usual (B,) tensors in the batch's own order, and the losses, the
# gradient accumulation shares and the DDP sharding see the same pairs as without packing.


def place_segments(lengths, budget=0):
    """Segment lengths [n_0, n_1, ...] -> ([(row, offset) per segment], number of rows): where each
    segment goes in a packed batch of rows of at most `budget` tokens. budget 0: one row, the
    segments in their order. Else first-fit decreasing: longest first, each into the first row
    with room (so no two segments longer than half the budget share a row)."""
    if budget == 0:
        offsets = [sum(lengths[:s]) for s in range(len(lengths))]
        return [(0, o) for o in offsets], 1
    if max(lengths) > budget:
        raise UserError(f"pack_tokens={budget}: a row of {max(lengths)} tokens does not fit; use "
                        f"--pack_tokens={max(lengths)} or more (0: one row per micro-batch)")
    places = [None] * len(lengths)
    filled = []  # tokens used in each row so far
    order = sorted(range(len(lengths)), key=lambda s: -lengths[s])  # stable: ties keep their order
    for s in order:
        row = next((r for r, used in enumerate(filled) if used + lengths[s] <= budget), None)
        if row is None:
            row = len(filled)
            filled.append(0)
        places[s] = (row, filled[row])
        filled[row] += lengths[s]
    return places, len(filled)


def check_pack_tokens(pack_tokens, block_size, prefix_sharing=False):
    """Stop with one line when a packed row of pack_tokens tokens could not hold the longest
    segment: block_size tokens, or 2 * block_size - 1 for a prefix-shared pair."""
    longest = 2 * block_size - 1 if prefix_sharing else block_size
    if 0 < pack_tokens < longest:
        raise UserError(f"pack_tokens={pack_tokens} cannot hold the longest row, {longest} tokens "
                        f"(block_size {block_size}{', prefix-shared' if prefix_sharing else ''}): "
                        f"use --pack_tokens={longest} or more (0: one row per micro-batch)")


def scored_entries(batch):
    """The scored tokens of a padded batch (collate, collate_pairs or collate_prefix_shared) as flat
    (S*L,) entries: (flat position s * L + l, target, id, rank), long tensors each. id: whose summed
    log-prob the token adds to (row s for collate's rows; pair s's chosen response s, its rejected
    one B + s for prefix-shared rows); rank: its place in that response, 1 for the first token
    (LD-DPO needs it). A prefix-shared row's first rejected token is predicted at the last prompt
    column (first_index), which predicts c0 as well: it becomes an entry of its own there."""
    S, L = batch["idx"].shape
    flat = torch.arange(S * L).view(S, L)
    rows = torch.arange(S)[:, None].expand(S, L)
    parts = []  # (mask, id, rank offset)
    if "mask" in batch:
        parts.append((batch["mask"], rows, 0))
    else:
        parts.append((batch["chosen_mask"], rows, 0))
        # the first rejected token (rank 1) is the separate entry below
        parts.append((batch["rejected_mask"], rows + S, 1))
    out = []
    for mask, ids, offset in parts:
        keep = mask.bool()
        rank = mask.long().cumsum(1) + offset
        out.append((flat[keep], batch["targets"][keep], ids[keep], rank[keep]))
    if "first_index" in batch:
        first = torch.arange(S) * L + batch["first_index"]
        ones = torch.ones(S, dtype=torch.long)
        out.append((first, batch["first_target"], torch.arange(S) + S, ones))
    return [torch.cat(column) for column in zip(*out)]


# model.Segments attends in groups of segments of similar length, each group padded to its longest:
# a segment joins the current group while it is at least this fraction of the group's longest, so
# at most a quarter of a group's slots are padding (of its attention's work, at most about 44%:
# the work grows with the square of the length)
GROUP_RATIO = 0.75


def attention_groups(lengths, multiple=1, limit=None):
    """Segment lengths -> [(segments, width)]: the segments, longest first, in groups of similar
    length (GROUP_RATIO), and each group's width: its longest, rounded up to `multiple` (at most
    `limit`, the padded rows' own width, which a segment never exceeds)."""
    order = sorted(range(len(lengths)), key=lambda s: -lengths[s])
    groups = []
    for s in order:
        if not groups or lengths[s] < GROUP_RATIO * lengths[groups[-1][0]]:
            groups.append([])
        groups[-1].append(s)
    out = []
    for segments in groups:
        width = round_up(lengths[segments[0]], multiple)
        if limit is not None:
            width = min(width, limit)
        out.append((segments, width))
    return out


def pack(batch, lengths, pad_id, budget=0, multiple=1, group_multiple=1):
    """A padded batch of S rows (collate, collate_pairs or collate_prefix_shared; tensors (S, L))
    and the real length of each row -> the same examples packed (the diagram above), a dict:

        idx, pos, doc (R, T) long   tokens, positions (restarting per segment) and segment ids of
                                    the packed rows (doc -1 on the padding after the last segment)
        local (R, T) long           each column's place in its segment (flex's mask reads it)
        cols, targets, ids, rank    (R, K) long: each packed row's scored tokens (scored_entries),
                                    in column order, padded with ids -1 to the longest row's count
        n_sums                      int: how many summed log-probs the ids index (S, or 2S for
                                    prefix-shared pairs)
        seg_mask                    None (causal segments), or collate_prefix_shared's (S, 1, L, L)

    and the layout model.Segments attends in (attention_layout): the segments in groups
    (attention_groups), group g a block of S_g segments x L_g slots, the blocks one after another:

        groups                      [(S_g, L_g)]
        group_masks                 None, or per group its segments' seg_mask, (S_g, 1, L_g, L_g)
        index (slots,) long         slot -> flat packed position r * T + t (a slot past its
                                    segment's end: 0, a real token that no real query sees)
        inverse (R * T,) long       flat packed position -> slot (a padding column: 0, whose output
                                    it then holds, read by nothing that is scored)
        slot_real (slots,) bool     the slots inside their segment

    pad_id fills the columns after the last segment. budget: tokens per packed row (place_segments;
    0: one row). multiple: T and K are rounded up to a multiple of it, group_multiple the groups'
    widths (torch.compile's shapes)."""
    S, L = batch["idx"].shape
    places, R = place_segments(lengths, budget)
    T = round_up(max(offset + n for (_, offset), n in zip(places, lengths)), multiple)
    pos = batch.get("pos")
    if pos is None:
        pos = torch.arange(L).expand(S, L)
    idx = torch.full((R * T,), pad_id, dtype=torch.long)
    packed_pos = torch.zeros(R * T, dtype=torch.long)
    doc = torch.full((R * T,), -1, dtype=torch.long)
    local = torch.zeros(R * T, dtype=torch.long)
    packed_at = torch.zeros((S, L), dtype=torch.long)  # padded (s, l) -> flat packed position
    for s, ((row, offset), n) in enumerate(zip(places, lengths)):
        start = row * T + offset
        where = torch.arange(start, start + n)
        packed_at[s, :n] = where
        idx[where] = batch["idx"][s, :n]
        packed_pos[where] = pos[s, :n]
        doc[where] = s
        local[where] = torch.arange(n)
    out = scored_by_row(batch, packed_at, R, T, multiple)
    out.update(attention_layout(batch, lengths, packed_at, R * T, group_multiple))
    return dict(out, idx=idx.view(R, T), pos=packed_pos.view(R, T), doc=doc.view(R, T),
                local=local.view(R, T), seg_mask=batch.get("attn_mask"))


def attention_layout(batch, lengths, packed_at, n_packed, multiple=1):
    """pack's attention layout (its docstring): groups, group_masks, index, inverse, slot_real.
    Segment s of group g sits at slots base_g + j * L_g + l, j its place in the group."""
    S, L = batch["idx"].shape
    groups = attention_groups(lengths, multiple, limit=L)
    n_slots = sum(len(segments) * width for segments, width in groups)
    index = torch.zeros(n_slots, dtype=torch.long)
    slot_real = torch.zeros(n_slots, dtype=torch.bool)
    inverse = torch.zeros(n_packed, dtype=torch.long)
    base = 0
    for segments, width in groups:
        for j, s in enumerate(segments):
            n = lengths[s]
            slots = torch.arange(base + j * width, base + j * width + n)
            index[slots] = packed_at[s, :n]
            slot_real[slots] = True
            inverse[packed_at[s, :n]] = slots
        base += len(segments) * width
    group_masks = None
    if "attn_mask" in batch:
        group_masks = [batch["attn_mask"][segments][:, :, :width, :width]
                       for segments, width in groups]
    return {"groups": [(len(segments), width) for segments, width in groups],
            "group_masks": group_masks, "index": index, "inverse": inverse,
            "slot_real": slot_real}


def scored_by_row(batch, packed_at, R, T, multiple=1):
    """pack's scored tokens (scored_entries) moved to their packed columns and listed row by row:
    cols, targets, ids, rank (R, K), K the most any row has (rounded up to `multiple`), and
    n_sums."""
    slot, targets, ids, rank = scored_entries(batch)
    where = packed_at.flatten()[slot]
    order = torch.argsort(where, stable=True)
    where, targets, ids, rank = where[order], targets[order], ids[order], rank[order]
    row_of = where // T
    counts = torch.bincount(row_of, minlength=R)
    K = round_up(int(counts.max()), multiple)
    # each entry's place within its row's list
    k = torch.arange(len(where)) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    out = {name: torch.zeros((R, K), dtype=torch.long) for name in ("cols", "targets", "rank")}
    out["ids"] = torch.full((R, K), -1, dtype=torch.long)
    out["cols"][row_of, k] = where % T
    out["targets"][row_of, k] = targets
    out["ids"][row_of, k] = ids
    out["rank"][row_of, k] = rank
    out["n_sums"] = 2 * batch["idx"].size(0) if "first_index" in batch else batch["idx"].size(0)
    return out


# --------------------------------------------------------------------------------------------------
# Batch order

class BatchOrder:
    """A deterministic, resumable stream of row indices: epoch e is a permutation drawn from
    (seed, e), and `take(k)` continues where the last call stopped, across epochs. state_dict() goes
    into checkpoints."""

    def __init__(self, n, seed):
        if n == 0:
            raise UserError("no training rows left (all were skipped or the data is empty)")
        self.n = n
        self.seed = seed
        self.epoch = 0
        self.pos = 0
        self._perm = self._permutation()

    def _permutation(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def take(self, k):
        """The next k row indices, starting a new shuffled epoch whenever one runs out."""
        out = []
        while len(out) < k:
            if self.pos == self.n:
                self.epoch += 1
                self.pos = 0
                self._perm = self._permutation()
            m = min(k - len(out), self.n - self.pos)
            out += self._perm[self.pos:self.pos + m]
            self.pos += m
        return out

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos, "n": self.n, "seed": self.seed}

    def load_state_dict(self, state):
        """Continue where a checkpoint's order stopped; an order over other rows or another seed is
        an error."""
        if (state.get("n", self.n), state.get("seed", self.seed)) != (self.n, self.seed):
            raise UserError(f"the checkpoint's data order is over {state.get('n')} rows with "
                            f"seed {state.get('seed')}, this run has {self.n} rows with seed "
                            f"{self.seed}: resume with the same data and seed")
        self.epoch = state["epoch"]
        self.pos = state["pos"]
        self._perm = self._permutation()
