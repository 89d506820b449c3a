"""
Everything between text and tensors: tokenisation (tiktoken), the embedded default task, preference pairs built
from the SFT model's own mistakes, masking, right padding, truncation, and a resumable batch order.

The masking rule, used by SFT and every preference loss alike: a row is [prompt | response | EOS]; the model
reads it shifted by one (inputs = tokens[:-1], targets = tokens[1:]) and the mask is 1 exactly on the targets
that are response tokens or the EOS, never on prompt or padding.
"""

import codecs
import hashlib
import json
import os
import random
from decimal import Decimal, InvalidOperation

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
        self.eval_prompts = [self.prompt(a, b) for a, b in self.eval_problems]  # what evaluation asks
        self.max_new_tokens = n_digits + 3  # the longest answer plus EOS, with room for a wrong longer one

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
        generate_fn(prompts, temperature) -> completions (strings). Without a model to sample
        (generate_fn=None, one-stage ORPO from scratch) the rejected answer is the demonstrations' slip where it is
        wrong, else a corruption. Returns (rows, counts by source)."""
        rng = random.Random(seed)
        problems = rng.sample(self.train_problems, min(n_prompts, len(self.train_problems)))
        prompts = [self.prompt(a, b) for a, b in problems]
        if generate_fn is not None:
            outputs = [("greedy", generate_fn(prompts, 0.0))]
            outputs += [("sampled", generate_fn(prompts, temperature)) for _ in range(n_samples)]
        else:
            outputs = [("slip", [self.no_carry_answer(a, b) for a, b in problems])]
        rows, counts = [], {"greedy": 0, "sampled": 0, "slip": 0, "corruption": 0}
        for i, (prompt, (a, b)) in enumerate(zip(prompts, problems)):
            chosen = self.answer(a, b)
            source, rejected = next(((src, out[i].strip()) for src, out in outputs
                                     if out[i].strip() and out[i].strip() != chosen), ("corruption", None))
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
        # at most max_len - 1 prompt tokens, so every response keeps at least one token
        prompt_ids = prompt_ids[-min(max_prompt_len, max_len - 1):]
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

    def add_all(self, other):
        for reason, n in other.reasons.items():
            self.reasons[reason] = self.reasons.get(reason, 0) + n

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


TOKEN_CACHE_VERSION = 1  # bump when encoding or truncation changes, so old cached token ids are not reused


def token_cache_dir():
    return os.environ.get("NANOPO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "nanopo")


def cached_encode(encode, rows, tok, block_size, source, use_cache=True):
    """encode(rows, tok, block_size, source=source) (encode_sft_rows or encode_pair_rows), its result kept on disk
    under token_cache_dir() ($NANOPO_CACHE, else ~/.cache/nanopo) and keyed by a hash of the rows' text, the
    tokenizer and the block size: a second run over the same data reads the token ids back instead of
    tokenising again (hashing text is far cheaper than BPE). Returns (encoded rows, SkipCounter)."""
    if not use_cache:
        return encode(rows, tok, block_size, source=source)
    h = hashlib.sha256(json.dumps([encode.__name__, tok.name, block_size, TOKEN_CACHE_VERSION]).encode())
    for row in rows:
        h.update(json.dumps(row, sort_keys=True).encode())
    path = os.path.join(token_cache_dir(), h.hexdigest()[:32] + ".pt")
    if os.path.exists(path):
        try:
            saved = torch.load(path, weights_only=True)
            skipped = SkipCounter()
            skipped.reasons = dict(saved["skipped"])
            return [tuple(r) for r in saved["rows"]], skipped
        except Exception:
            pass  # unreadable (a foreign or cut-short file): tokenise again and rewrite it
    out, skipped = encode(rows, tok, block_size, source=source)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp.{os.getpid()}"
        torch.save({"rows": out, "skipped": skipped.reasons}, tmp)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache folder: the run goes on without the cache
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
        return {"epoch": self.epoch, "pos": self.pos, "n": self.n, "seed": self.seed}

    def load_state_dict(self, state):
        if (state.get("n", self.n), state.get("seed", self.seed)) != (self.n, self.seed):
            raise UserError(f"the checkpoint's data order is over {state.get('n')} rows with seed {state.get('seed')}, "
                            f"this run has {self.n} rows with seed {self.seed}: resume with the same data and seed")
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._perm = self._permutation()


# -----------------------------------------------------------------------------------------------------------
# Prefix sharing
#
# Chosen and rejected share their prompt. The concatenated forward runs it twice (rows [prompt|chosen] and
# [prompt|rejected]); prefix sharing packs each pair into ONE row [prompt | chosen | rejected] and uses an
# attention mask and position ids that make every token see exactly what it sees in its plain row. The
# log-probs are the same (up to float rounding); the prompt's compute is paid once.

_PROMPT, _CHOSEN, _REJECTED, _PAD = 0, 1, 2, 3  # segment ids of the packed row's columns


def collate_prefix_shared(pairs, pad_id, length=None):
    """Preference pairs [(prompt, chosen, rejected)] -> one packed, right-padded row per pair (a dict of tensors).

    Layout, for prompt p0 p1 p2, chosen c0 c1 E, rejected r0 E (E = EOS; P=3, C=3, R=2, one pad column):

        column         0   1   2   3   4   5   6
        idx            p0  p1  p2  c0  c1  r0  pad
        pos            0   1   2   3   4   3   0     rejected positions restart at P, as in its plain row
        targets        p1  p2  c0  c1  E   E   pad
        chosen_mask    0   0   1   1   1   0   0     c0, c1, E
        rejected_mask  0   0   0   0   0   1   0     E; r0 comes from first_index/first_target (below)

    A response's last token (E) is only ever a target, never an input, so a row holds P + C + R - 2 columns.
    r0 has no column of its own: in the plain rejected row it is predicted by the last prompt token, and here
    the column before r0 is c1 (the chosen branch). But the last prompt column (P-1) attends to the prompt only,
    so its logits are the same for both branches: it predicts c0 (targets) AND r0 (first_target). A second
    gather at first_index = P-1 reads r0's log-prob; prefix_shared_logps does both.

    attn_mask[b, 0, query, key], True = may attend (x):

                   p0  p1  p2  c0  c1  r0  pad
            p0     x
            p1     x   x
            p2     x   x   x
            c0     x   x   x   x
            c1     x   x   x   x   x
            r0     x   x   x           x         the rejected branch never sees the chosen tokens
            pad                            x     padding sees only itself: no empty softmax row (NaN)

    Returns idx, targets, pos (B, T) long; attn_mask (B, 1, T, T) bool; chosen_mask, rejected_mask (B, T) float;
    first_index, first_target (B,) long. T = longest packed row, or `length`."""
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
        segment[b, :P], segment[b, P:P + C - 1], segment[b, P + C - 1:n] = _PROMPT, _CHOSEN, _REJECTED
        chosen_mask[b, P - 1:P + C - 1] = 1.0   # column P-1 predicts c0, ..., column P+C-2 predicts E
        rejected_mask[b, P + C - 1:n] = 1.0     # r1 .. E; r0 is the second gather
        first_index[b], first_target[b] = P - 1, r[0]
    q, k = segment[:, :, None], segment[:, None, :]  # (B, T, 1) query, (B, 1, T) key segments
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    attn_mask = causal & (q != _PAD) & (k != _PAD) & ~((q == _REJECTED) & (k == _CHOSEN))
    attn_mask = attn_mask | torch.eye(T, dtype=torch.bool)  # real rows have their diagonal already; pads need it
    return {"idx": idx, "targets": targets, "pos": pos, "attn_mask": attn_mask[:, None],
            "chosen_mask": chosen_mask, "rejected_mask": rejected_mask,
            "first_index": first_index, "first_target": first_target}


def prefix_shared_logps(logits, batch):
    """Logits (B, T, V) of a collate_prefix_shared batch -> (chosen_logps, rejected_logps, chosen_n, rejected_n),
    each (B,) float32: summed response log-probs and token counts, as the concatenated forward gives them."""
    from losses import sequence_logprobs  # imported here so data.py loads without the model code
    from model import logprobs_from_logits
    token_logps = logprobs_from_logits(logits, batch["targets"])  # (B, T) float32
    chosen_logps, chosen_n = sequence_logprobs(token_logps, batch["chosen_mask"])
    rejected_logps, rejected_n = sequence_logprobs(token_logps, batch["rejected_mask"])
    # the first rejected token: a second gather from the last prompt column, whose logits both branches share
    first_logits = logits[torch.arange(logits.size(0), device=logits.device), batch["first_index"]]  # (B, V)
    first_logps = logprobs_from_logits(first_logits[:, None], batch["first_target"][:, None])[:, 0]  # (B,)
    return chosen_logps, rejected_logps + first_logps, chosen_n, rejected_n + 1


# -----------------------------------------------------------------------------------------------------------
# Real datasets
#
# load_rows() reads a Hugging Face hub dataset or a local .jsonl/.json/.parquet file and turns each row of a
# published layout into the plain dicts the encoders above take: pairs {'prompt', 'chosen', 'rejected'},
# sft {'prompt', 'response'} or kto {'prompt', 'completion', 'label'}. Conversations become text through ONE
# chat template (render_chat), so SFT, preference training and sampling all see prompts written the same way.

import re


def render_chat(messages, add_generation_prompt=True):
    """Render [{'role', 'content'}] messages as plain text, the one chat template of this code base:

        <|system|>
        You are terse.
        <|user|>
        What is 2+2?
        <|assistant|>
        4
        <|user|>
        And 3+3?
        <|assistant|>

    Each message is '<|role|>\\n' + content + '\\n'; with add_generation_prompt a final '<|assistant|>\\n' invites
    the answer, which is trained as content + EOS. The markers are plain text, not special tokens, so the byte and
    gpt2 tokenizers both encode them (as a few ordinary tokens). System messages with empty content are dropped."""
    parts = [f"<|{m['role']}|>\n{m['content']}\n" for m in messages
             if not (m["role"] == "system" and not m["content"].strip())]
    if add_generation_prompt:
        parts.append("<|assistant|>\n")
    return "".join(parts)


# 1,234 / -3 / 2.50 / .5; a sentence's final '.' is left out, and a '-' only signs a number that follows no
# word or digit ('3-4' ends in 4, not -4)
_NUMBER = re.compile(r"(?:(?<![\w.])-)?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")


def _clean_number(s):
    """'1,234' -> '1234', '18.00' -> '18', '2.50' -> '2.5', '007' -> '7', '-0' -> '0': one spelling per value,
    so answers compare as strings."""
    try:
        value = Decimal(s.replace(",", ""))
    except InvalidOperation:
        return s
    return "0" if value == 0 else format(value.normalize(), "f")


def gsm8k_answer(text):
    """The final answer of a GSM8K solution ('... #### 1,234' -> '1234'), or None when there is no '#### N'."""
    if "####" not in text:
        return None
    m = _NUMBER.search(text.split("####")[-1])
    return _clean_number(m.group()) if m else None


def extract_final_number(completion):
    """The number a completion answers with, for grading: the one after '####' when there is one, else the last
    number in the text; None when it has no number."""
    answer = gsm8k_answer(completion)
    if answer is not None:
        return answer
    numbers = _NUMBER.findall(completion)
    return _clean_number(numbers[-1]) if numbers else None


class _BadRow(Exception):
    """One row does not fit its format; the message names the key (load_rows adds the file and row)."""


def _get(row, key):
    if row.get(key) is None:  # a key absent from some rows of a file is read as None by `datasets`
        raise _BadRow(f"key '{key}' missing")
    return row[key]


def _text(row, key):
    value = _get(row, key)
    if not isinstance(value, str):
        raise _BadRow(f"key '{key}' should be a string, found {type(value).__name__}")
    return value


def _response(text, key):
    if not text.strip():
        raise _BadRow(f"key '{key}' is an empty response")
    return text


def _messages(row, key):
    value = _get(row, key)
    if not isinstance(value, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value):
        raise _BadRow(f"key '{key}' should be a list of {{'role', 'content'}} string messages")
    return [{"role": m["role"], "content": m["content"]} for m in value]  # drop extra fields


def _split_answer(messages, key):
    """A conversation ending in the assistant's answer -> (earlier messages, answer text)."""
    if not messages or messages[-1]["role"] != "assistant":
        raise _BadRow(f"key '{key}' does not end with an assistant message")
    return messages[:-1], _response(messages[-1]["content"], key)


def _prompt_and_answer(row, prompt_key, answer_key):
    """prompt + answer, standard (two strings, used verbatim) or conversational (message lists, rendered)."""
    if isinstance(row.get(prompt_key), list):
        prompt = _messages(row, prompt_key)
        before, answer = _split_answer(_messages(row, answer_key), answer_key)
        return render_chat(prompt + before), answer
    return _text(row, prompt_key), _response(_text(row, answer_key), answer_key)


def _pair_from_conversations(prompt, chosen, rejected):
    """prompt messages + chosen/rejected conversations that end in the answer -> a pair of strings."""
    chosen_before, chosen_answer = _split_answer(chosen, "chosen")
    rejected_before, rejected_answer = _split_answer(rejected, "rejected")
    if chosen_before != rejected_before:
        raise _BadRow("key 'rejected' differs from 'chosen' before the last message")
    return {"prompt": render_chat(prompt + chosen_before), "chosen": chosen_answer, "rejected": rejected_answer}


def _row_trl(row):
    # {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}
    return {"prompt": _text(row, "prompt"), "chosen": _response(_text(row, "chosen"), "chosen"),
            "rejected": _response(_text(row, "rejected"), "rejected")}


def _row_trl_conversational(row):
    # {"prompt": [{"role": "user", ...}], "chosen": [{"role": "assistant", ...}], "rejected": [...]}
    return _pair_from_conversations(_messages(row, "prompt"), _messages(row, "chosen"), _messages(row, "rejected"))


_HH_ASSISTANT = "\n\nAssistant:"


def _common_prefix_len(a, b):
    """Length of the longest common start of two strings, by bisection over slice comparisons (which run in C):
    a Python loop per character took ~40 s over HH-RLHF's 160k training rows, this under half a second."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _row_hh(row):
    # Anthropic HH-RLHF: two whole transcripts "\n\nHuman: ...\n\nAssistant: ..." that differ in the last answer.
    # The prompt is their common start, cut just after its last "\n\nAssistant:" (the two answers may begin with
    # the same words, which must stay in the answers).
    chosen, rejected = _text(row, "chosen"), _text(row, "rejected")
    n = _common_prefix_len(chosen, rejected)
    cut = chosen.rfind(_HH_ASSISTANT, 0, n)  # the last marker lying wholly inside the common start
    if cut < 0:
        raise _BadRow("keys 'chosen' and 'rejected' share no '\\n\\nAssistant:' turn")
    cut += len(_HH_ASSISTANT)
    return {"prompt": chosen[:cut], "chosen": _response(chosen[cut:], "chosen"),
            "rejected": _response(rejected[cut:], "rejected")}


def _row_ultrafeedback(row):
    # HuggingFaceH4/ultrafeedback_binarized: "prompt" a string, "chosen"/"rejected" whole conversations
    # [user, assistant] (plus score_chosen / score_rejected). The conversation before the answer is the prompt;
    # if a conversation holds only the answer, the prompt string becomes the user turn.
    chosen, rejected = _messages(row, "chosen"), _messages(row, "rejected")
    prompt = [] if len(chosen) > 1 else [{"role": "user", "content": _text(row, "prompt")}]
    return _pair_from_conversations(prompt, chosen, rejected)


def _row_kto(row):
    # {"prompt": ..., "completion": ..., "label": true}: one answer, labelled desirable or not
    prompt, completion = _prompt_and_answer(row, "prompt", "completion")
    label = _get(row, "label")
    if not isinstance(label, bool):
        raise _BadRow(f"key 'label' should be a bool, found {type(label).__name__}")
    return {"prompt": prompt, "completion": completion, "label": label}


def _row_prompt_completion(row):
    prompt, response = _prompt_and_answer(row, "prompt", "completion")
    return {"prompt": prompt, "response": response}


def _row_messages(row):
    # {"messages": [...]}: the last assistant message is the response, everything before it the prompt
    messages = _messages(row, "messages")
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise _BadRow("key 'messages' has no assistant message")
    return {"prompt": render_chat(messages[:last]), "response": _response(messages[last]["content"], "messages")}


def _row_gsm8k(row):
    # {"question": ..., "answer": "<worked solution>\n#### 72"}: the question as a user turn, the solution as the
    # response (gsm8k_answer reads its final number back)
    question, answer = _text(row, "question"), _response(_text(row, "answer"), "answer")
    if gsm8k_answer(answer) is None:
        raise _BadRow("key 'answer' has no final '#### N' answer")
    return {"prompt": render_chat([{"role": "user", "content": question}]), "response": answer}


# format name -> (what kind of rows it holds, row reader)
DATASET_FORMATS = {
    "trl": ("pairs", _row_trl),
    "trl_conversational": ("pairs", _row_trl_conversational),
    "hh": ("pairs", _row_hh),
    "ultrafeedback": ("pairs", _row_ultrafeedback),
    "kto": ("kto", _row_kto),
    "prompt_completion": ("sft", _row_prompt_completion),
    "messages": ("sft", _row_messages),
    "gsm8k": ("sft", _row_gsm8k),
}


def detect_format(column_names, first_row=None):
    """The format a dataset's columns announce. Pairs come in layouts with the same columns, so `first_row` (when
    given) decides by its types: chosen a string -> trl (hh without a prompt column); chosen a list of messages
    -> trl_conversational when the prompt is one too, else ultrafeedback (whole conversations in chosen)."""
    cols = set(column_names)
    if {"prompt", "completion", "label"} <= cols:
        return "kto"
    if {"chosen", "rejected"} <= cols:
        conversational_prompt = first_row is not None and isinstance(first_row.get("prompt"), list)
        if conversational_prompt or (first_row is not None and isinstance(first_row.get("chosen"), list)):
            return "trl_conversational" if conversational_prompt else "ultrafeedback"
        if first_row is None and "score_chosen" in cols:
            return "ultrafeedback"
        return "trl" if "prompt" in cols else "hh"
    if {"prompt", "completion"} <= cols:
        return "prompt_completion"
    if "messages" in cols:
        return "messages"
    if {"question", "answer"} <= cols:
        return "gsm8k"
    raise UserError(f"cannot tell the dataset format from its columns {sorted(cols)}: expected e.g. prompt/chosen/"
                    f"rejected, chosen/rejected, prompt/completion[/label], messages or question/answer; "
                    f"name one with dataset_format= ({', '.join(DATASET_FORMATS)})")


_LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _check_text_file(path, chunk_size=1 << 20):
    """Name an empty or non-UTF-8 JSON file in one line here; the JSON reader would fail later with a traceback
    (a bad byte surfaces only when a row is read) or a bare StopIteration (an empty file)."""
    if os.path.getsize(path) == 0:
        raise UserError(f"data file {path} is empty")
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with open(path, "rb") as f:
        while True:
            chunk, held = f.read(chunk_size), len(decoder.getstate()[0])  # held: a split character's start
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:  # e.start counts from the held bytes, then the chunk
                raise UserError(f"data file {path} is not UTF-8 text: invalid byte at offset "
                                f"{offset - held + e.start}") from None
            if not chunk:
                return
            offset += len(chunk)


def _load_dataset(path_or_name, split):
    """A local file (its one split is 'train'), a local folder, or a hub name ('owner/name' or
    'owner/name:config') -> a `datasets.Dataset`."""
    import datasets  # imported here: the embedded task never needs it, and it takes a second to import
    ext = os.path.splitext(path_or_name)[1].lower()
    try:
        if os.path.isfile(path_or_name) or ext in _LOCAL_BUILDERS:
            if not os.path.isfile(path_or_name):
                raise UserError(f"data file {path_or_name} does not exist")
            if ext not in _LOCAL_BUILDERS:
                raise UserError(f"data file {path_or_name}: expected a .jsonl, .json or .parquet file")
            if split != "train":
                raise UserError(f"data file {path_or_name} has a single split 'train', not '{split}': "
                                "give held-out rows as a file of their own")
            if ext != ".parquet":
                _check_text_file(path_or_name)
            # a local file loads in moments: no progress bar, and no logged error beside our one line on stderr
            bars, level = not datasets.are_progress_bars_disabled(), datasets.logging.get_verbosity()
            datasets.disable_progress_bars()
            datasets.logging.set_verbosity(datasets.logging.CRITICAL)
            try:
                return datasets.load_dataset(_LOCAL_BUILDERS[ext], data_files=path_or_name, split="train")
            finally:
                datasets.logging.set_verbosity(level)
                if bars:
                    datasets.enable_progress_bars()
        if os.path.isdir(path_or_name):
            return datasets.load_dataset(path_or_name, split=split)
        name, _, config = path_or_name.partition(":")
        return datasets.load_dataset(name, config or None, split=split)
    except UserError:
        raise
    except Exception as e:  # network, missing split or config, unreadable file: one line, not a traceback
        cause = e.__cause__ or e
        detail = (str(cause).strip().splitlines() or [""])[0][:200]
        raise UserError(f"could not load dataset {path_or_name} (split '{split}'): "
                        f"{type(cause).__name__}: {detail}") from None


def load_rows(path_or_name, split="train", kind="pairs", dataset_format=None, skip_bad_rows=False):
    """Load a dataset as rows of one kind: 'pairs' {'prompt', 'chosen', 'rejected'}, 'sft' {'prompt', 'response'}
    or 'kto' {'prompt', 'completion', 'label'}, all strings but the bool label. The format comes from the columns
    (detect_format) unless named. A pairs dataset also loads as 'sft' (the chosen answer is the response) and as
    'kto' (chosen -> label True, rejected -> label False). A row that does not fit its format is a UserError naming
    file, row (0-based) and key, or with skip_bad_rows a skip counted by reason. Returns (rows, SkipCounter)."""
    if kind not in ("pairs", "sft", "kto"):
        raise UserError(f"unknown kind '{kind}': expected 'pairs', 'sft' or 'kto'")
    ds = _load_dataset(path_or_name, split)
    fmt = dataset_format or detect_format(ds.column_names, ds[0] if len(ds) else None)
    if fmt not in DATASET_FORMATS:
        raise UserError(f"unknown dataset_format '{fmt}': expected one of {', '.join(DATASET_FORMATS)}")
    holds, read_row = DATASET_FORMATS[fmt]
    if holds != kind and holds != "pairs":
        raise UserError(f"{path_or_name} holds '{fmt}' rows ({holds}), which cannot be used as {kind} data")
    rows, skipped = [], SkipCounter()
    for i, row in enumerate(ds):
        try:
            r = read_row(row)
        except _BadRow as e:
            if not skip_bad_rows:
                raise UserError(f"{path_or_name}, row {i}: {e}") from None
            skipped.add(str(e))
            continue
        if holds == kind:
            rows.append(r)
        elif kind == "sft":
            rows.append({"prompt": r["prompt"], "response": r["chosen"]})
        elif r["chosen"] == r["rejected"]:  # as pairs these are skipped: not one answer good and the same bad
            skipped.add("chosen == rejected")
        else:  # pairs as unpaired kto rows
            rows.append({"prompt": r["prompt"], "completion": r["chosen"], "label": True})
            rows.append({"prompt": r["prompt"], "completion": r["rejected"], "label": False})
    return rows, skipped


class AnswerTask:
    """A task whose rows carry a reference answer that can be checked by its final number, as GSM8K's do
    ('... #### 42'): the same interface as AdditionTask (eval_prompts, is_correct, build_pairs), so sft.py and
    dpo.py evaluate held-out task_accuracy and build on-policy pairs for it the same way.
    train_rows / eval_rows: SFT rows {'prompt', 'response'} (load_rows(..., kind='sft'))."""

    def __init__(self, train_rows, eval_rows, n_eval=None, max_new_tokens=256):
        self.train_rows = [r for r in train_rows if gsm8k_answer(r["response"]) is not None]
        self.answers = {r["prompt"]: gsm8k_answer(r["response"]) for r in eval_rows[:n_eval]
                        if gsm8k_answer(r["response"]) is not None}
        self.answers.update({r["prompt"]: gsm8k_answer(r["response"]) for r in self.train_rows})
        self.eval_prompts = [r["prompt"] for r in eval_rows[:n_eval] if gsm8k_answer(r["response"]) is not None]
        if not self.eval_prompts:
            raise UserError("no held-out row has a final answer ('#### N') to check completions against")
        self.max_new_tokens = max_new_tokens

    def is_correct(self, prompt, completion):
        return extract_final_number(completion) == self.answers[prompt]

    def build_pairs(self, generate_fn, n_prompts, n_samples, temperature, seed):
        """On-policy pairs: chosen = the reference solution; rejected = the model's greedy completion when its
        final number is wrong, else the first wrong one of n_samples samples. A prompt the model always gets
        right gets no pair (there is no safe way to corrupt a worked solution); it is counted as 'all correct'."""
        rng = random.Random(seed)
        rows_in = rng.sample(self.train_rows, min(n_prompts, len(self.train_rows)))
        prompts = [r["prompt"] for r in rows_in]
        if generate_fn is None:
            raise UserError("pairs for a dataset of solutions are sampled from the SFT model: use init_from='sft'")
        outputs = [("greedy", generate_fn(prompts, 0.0))]
        outputs += [("sampled", generate_fn(prompts, temperature)) for _ in range(n_samples)]
        rows, counts = [], {"greedy": 0, "sampled": 0, "all correct": 0}
        for i, r in enumerate(rows_in):
            wrong = next(((src, out[i]) for src, out in outputs
                          if out[i].strip() and not self.is_correct(r["prompt"], out[i])), None)
            if wrong is None:
                counts["all correct"] += 1
                continue
            counts[wrong[0]] += 1
            rows.append({"prompt": r["prompt"], "chosen": r["response"], "rejected": wrong[1]})
        return rows, counts


def dataset_kind(path_or_name, split="train", dataset_format=None):
    """What a dataset holds, from its format: 'pairs', 'sft' or 'kto'."""
    ds = _load_dataset(path_or_name, split)
    fmt = dataset_format or detect_format(ds.column_names, ds[0] if len(ds) else None)
    if fmt not in DATASET_FORMATS:
        raise UserError(f"unknown dataset_format '{fmt}': expected one of {', '.join(DATASET_FORMATS)}")
    return DATASET_FORMATS[fmt][0]


def load_splits(dataset, kind, dataset_format, train_split, eval_dataset, eval_split, skip_bad_rows):
    """Training and held-out rows for sft.py / dpo.py: (train_rows, eval_rows, report). Held-out rows come from
    eval_dataset (a file of its own: local files have one split), else from dataset's eval_split; '' skips them."""
    fmt = dataset_format or None
    train_rows, skipped = load_rows(dataset, train_split, kind, fmt, skip_bad_rows)
    eval_rows, eval_skipped = [], SkipCounter()
    if eval_dataset or eval_split:
        source, split = (eval_dataset, "train") if eval_dataset else (dataset, eval_split)
        eval_rows, eval_skipped = load_rows(source, split, kind, fmt, skip_bad_rows)
    report = (f"{dataset}: {len(train_rows)} training rows (skipped: {skipped}), "
              f"{len(eval_rows)} held-out rows (skipped: {eval_skipped})")
    return train_rows, eval_rows, report
