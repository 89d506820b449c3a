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
    return min(limit, -(-T // multiple) * multiple)


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
    """Preference pairs [(prompt, chosen, rejected)] -> one packed, right-padded row per pair (a
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
