"""
Everything between text and tensors: tokenisation (tiktoken), the embedded default task, preference pairs built
from the SFT model's own mistakes, masking, right padding, truncation, and a resumable batch order.

The masking rule, used by SFT and every preference loss alike: a row is [prompt | response | EOS]; the model
reads it shifted by one (inputs = tokens[:-1], targets = tokens[1:]) and the mask is 1 exactly on the targets
that are response tokens or the EOS, never on prompt or padding.
"""

import os
import random

import tiktoken
import torch


class UserError(Exception):
    """A problem with the user's input or settings: reported as one line, never as a traceback."""


# -----------------------------------------------------------------------------------------------------------
# Tokenisation

class Tokenizer:
    """A thin wrapper over a tiktoken Encoding that knows its EOS and padding ids.

    'byte': 256 byte tokens + <|endoftext|> (256) + <|pad|> (257), built offline; any text encodes losslessly.
    'gpt2': GPT-2's BPE (tiktoken's r50k_base, 50,257 tokens); padding reuses <|endoftext|> (50256), which
            is harmless because padding is always masked out.
    The name is stored in every checkpoint; loading a checkpoint with another tokenizer is an error."""

    def __init__(self, name):
        self.name = name
        if name == "byte":
            self.enc = tiktoken.Encoding(
                name="byte",
                pat_str=r"[\s\S]",  # one piece per character; its UTF-8 bytes become one token each
                mergeable_ranks={bytes([i]): i for i in range(256)},
                special_tokens={"<|endoftext|>": 256, "<|pad|>": 257},
            )
            self.eos_id, self.pad_id = 256, 257
        elif name == "gpt2":
            try:
                self.enc = tiktoken.get_encoding("r50k_base")
            except Exception as e:  # no network and no cached file
                raise UserError(
                    "could not load the GPT-2 BPE (tiktoken 'r50k_base'): set TIKTOKEN_CACHE_DIR to a folder "
                    f"holding its rank file, or allow tiktoken to download it ({type(e).__name__})") from None
            self.eos_id = self.pad_id = self.enc.eot_token
        else:
            raise UserError(f"unknown tokenizer '{name}': expected 'byte' or 'gpt2'")
        self.n_vocab = self.enc.n_vocab

    def encode(self, text):
        # encode_ordinary: a user's text that happens to contain "<|endoftext|>" stays plain text
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        """Ids -> text. Padding and ids past the vocabulary (a model's table may be rounded up) are dropped."""
        keep = [i for i in ids if i < self.n_vocab and (i != self.pad_id or i == self.eos_id)]
        return self.enc.decode(keep)


# -----------------------------------------------------------------------------------------------------------
# The embedded task: n-digit addition with an exact verifier

class AdditionTask:
    """'a+b=' -> 'c' for n-digit a and b. Every problem (a, b) is enumerated once, shuffled with `seed`, and the
    first `n_eval` go to the held-out split, so train and held-out are disjoint by problem.

    The SFT demonstrations are imperfect in a systematic way, as human or model-written data often is: with
    probability `slip_prob` a demonstration gives the 'forgot every carry' answer (each digit is
    (x_i + y_i) mod 10, carries dropped). That answer is wrong whenever the problem has a carry, so the SFT model
    learns the slip; DPO pairs then show the correct answer above a wrong one and teach it out again."""

    def __init__(self, n_digits=2, n_eval=1000, seed=1234):
        lo, hi = 10 ** (n_digits - 1), 10 ** n_digits
        problems = [(a, b) for a in range(lo, hi) for b in range(lo, hi)]
        random.Random(seed).shuffle(problems)
        if n_eval >= len(problems):
            raise UserError(f"n_eval={n_eval} leaves no training problems ({len(problems)} in all)")
        self.eval_problems, self.train_problems = problems[:n_eval], problems[n_eval:]
        self.n_digits = n_digits

    @staticmethod
    def prompt(a, b):
        return f"{a}+{b}="

    @staticmethod
    def answer(a, b):
        return str(a + b)

    @staticmethod
    def no_carry_answer(a, b):
        """The slip: add digit by digit and forget every carry (47+85 -> '22')."""
        digits, place = 0, 1
        while a or b:
            digits += ((a % 10 + b % 10) % 10) * place
            a, b, place = a // 10, b // 10, place * 10
        return str(digits)

    @staticmethod
    def parse(prompt):
        a, b = prompt.rstrip("=").split("+")
        return int(a), int(b)

    def is_correct(self, prompt, completion):
        return completion.strip() == self.answer(*self.parse(prompt))

    def sft_rows(self, slip_prob, seed):
        """One demonstration per training problem; returns (rows, n_wrong) with rows [{'prompt', 'response'}]."""
        rng = random.Random(seed)
        rows, n_wrong = [], 0
        for a, b in self.train_problems:
            response = self.no_carry_answer(a, b) if rng.random() < slip_prob else self.answer(a, b)
            n_wrong += response != self.answer(a, b)
            rows.append({"prompt": self.prompt(a, b), "response": response})
        return rows, n_wrong

    def corrupt(self, answer, rng):
        """A plausible wrong answer: one digit changed (never to a leading zero)."""
        i = rng.randrange(len(answer))
        choices = [d for d in "0123456789" if d != answer[i] and not (i == 0 and d == "0" and len(answer) > 1)]
        return answer[:i] + rng.choice(choices) + answer[i + 1:]

    def build_pairs(self, generate_fn, n_prompts, n_samples, temperature, seed):
        """Preference pairs for `n_prompts` training problems: chosen = the verified correct answer; rejected =
        the model's own greedy answer when it is wrong (an on-policy negative), else the first wrong one of
        `n_samples` samples at `temperature`, else a one-digit corruption of the correct answer.
        generate_fn(prompts, temperature) -> completions (strings). Returns (rows, counts by source)."""
        rng = random.Random(seed)
        problems = rng.sample(self.train_problems, min(n_prompts, len(self.train_problems)))
        prompts = [self.prompt(a, b) for a, b in problems]
        greedy = generate_fn(prompts, 0.0)
        samples = [generate_fn(prompts, temperature) for _ in range(n_samples)]
        rows, counts = [], {"greedy": 0, "sampled": 0, "corruption": 0}
        for i, (prompt, (a, b)) in enumerate(zip(prompts, problems)):
            chosen = self.answer(a, b)
            candidates = [("greedy", greedy[i])] + [("sampled", s[i]) for s in samples]
            source, rejected = next(((src, c.strip()) for src, c in candidates
                                     if c.strip() and c.strip() != chosen), ("corruption", None))
            if rejected is None:
                rejected = self.corrupt(chosen, rng)
            counts[source] += 1
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        return rows, counts


# -----------------------------------------------------------------------------------------------------------
# Rows -> token ids (with truncation) -> padded tensors

def truncate(prompt_ids, responses, max_len, max_prompt_len):
    """Fit [prompt | response] (each response already ends in EOS) into max_len tokens, for one or more responses
    sharing the prompt: first keep only the last max_prompt_len prompt tokens (the end of a prompt matters most to
    its answer), then cut the responses' tails. Returns (prompt_ids, [response_ids, ...]), or None when the prompt
    or a response would be left empty."""
    if len(prompt_ids) + max(len(r) for r in responses) > max_len:
        prompt_ids = prompt_ids[-max_prompt_len:]
        responses = [r[:max_len - len(prompt_ids)] for r in responses]
    if len(prompt_ids) == 0 or min(len(r) for r in responses) == 0:
        return None
    return prompt_ids, responses


class SkipCounter:
    """Counts rows left out and why, so a run can report them instead of dropping them silently."""

    def __init__(self):
        self.reasons = {}

    def add(self, reason):
        self.reasons[reason] = self.reasons.get(reason, 0) + 1

    def total(self):
        return sum(self.reasons.values())

    def __str__(self):
        return ", ".join(f"{n} {r}" for r, n in sorted(self.reasons.items())) or "none"


def _check_text(row, key, where):
    if key not in row:
        raise UserError(f"{where}: missing key '{key}'")
    if not isinstance(row[key], str):
        raise UserError(f"{where}: key '{key}' should be a string, found {type(row[key]).__name__}")
    return row[key]


def encode_sft_rows(rows, tok, block_size, max_prompt_len=None, source="sft data"):
    """[{'prompt', 'response'}] -> [(prompt_ids, response_ids + [EOS])], truncated to block_size + 1 tokens
    (the model reads block_size of them). Rows with an empty response are skipped and counted."""
    max_len = block_size + 1
    max_prompt_len = max_prompt_len or max_len // 2
    out, skipped = [], SkipCounter()
    for i, row in enumerate(rows):
        where = f"{source}, row {i}"
        prompt, response = _check_text(row, "prompt", where), _check_text(row, "response", where)
        if not response.strip():
            skipped.add("empty response")
            continue
        fitted = truncate(tok.encode(prompt), [tok.encode(response) + [tok.eos_id]], max_len, max_prompt_len)
        if fitted is None:
            skipped.add("empty prompt")
            continue
        out.append((fitted[0], fitted[1][0]))
    return out, skipped


def encode_pair_rows(rows, tok, block_size, max_prompt_len=None, source="preference data"):
    """[{'prompt', 'chosen', 'rejected'}] -> [(prompt_ids, chosen_ids, rejected_ids)], each response ending in EOS
    and truncated with the same prompt. Empty responses and identical chosen/rejected are skipped and counted."""
    max_len = block_size + 1
    max_prompt_len = max_prompt_len or max_len // 2
    out, skipped = [], SkipCounter()
    for i, row in enumerate(rows):
        where = f"{source}, row {i}"
        prompt = _check_text(row, "prompt", where)
        chosen, rejected = _check_text(row, "chosen", where), _check_text(row, "rejected", where)
        if not chosen.strip() or not rejected.strip():
            skipped.add("empty response")
            continue
        if chosen == rejected:
            skipped.add("chosen == rejected")
            continue
        fitted = truncate(tok.encode(prompt), [tok.encode(chosen) + [tok.eos_id], tok.encode(rejected) + [tok.eos_id]],
                          max_len, max_prompt_len)
        if fitted is None:
            skipped.add("empty prompt")
            continue
        p, (c, r) = fitted
        if c == r:
            skipped.add("chosen == rejected after truncation")
            continue
        out.append((p, c, r))
    return out, skipped


def collate(sequences, pad_id, length=None):
    """[(prompt_ids, response_ids)] -> right-padded tensors, each (B, T) with T = longest row - 1 (or `length`):
    idx (inputs), targets (inputs shifted by one), mask (1.0 on response and EOS targets only)."""
    T = length or max(len(p) + len(r) for p, r in sequences) - 1
    B = len(sequences)
    idx = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T))
    for b, (p, r) in enumerate(sequences):
        tokens = torch.tensor(p + r, dtype=torch.long)
        n = len(tokens) - 1
        idx[b, :n] = tokens[:-1]
        targets[b, :n] = tokens[1:]
        mask[b, len(p) - 1:n] = 1.0  # target t is token t+1: the first response token is target len(p)-1
    return idx, targets, mask


def collate_pairs(pairs, pad_id, length=None):
    """Preference pairs -> one batch of 2B rows, chosen first then rejected, padded to one length, so that each
    model needs a single forward per step (the 'concatenated forward')."""
    seqs = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
    return collate(seqs, pad_id, length)


# -----------------------------------------------------------------------------------------------------------
# Batch order

class BatchOrder:
    """A deterministic, resumable stream of row indices: epoch e is a permutation drawn from (seed, e), and
    `take(k)` continues where the last call stopped, across epochs. state_dict() goes into checkpoints."""

    def __init__(self, n, seed):
        if n == 0:
            raise UserError("no training rows left (all were skipped or the data is empty)")
        self.n, self.seed, self.epoch, self.pos = n, seed, 0, 0
        self._perm = self._permutation()

    def _permutation(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def take(self, k):
        out = []
        while len(out) < k:
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._perm = self._permutation()
            m = min(k - len(out), self.n - self.pos)
            out += self._perm[self.pos:self.pos + m]
            self.pos += m
        return out

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state):
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._perm = self._permutation()
