"""Tests for data.py: masking and padding of collated batches, truncation, tokenizers, the addition task and
the preference pairs built from it, and the resumable batch order. Expected values come from plain Python
(UTF-8 bytes, integer arithmetic, hand-written cases), not from the code under test."""

import math

import pytest
import torch

from data import BatchOrder, Tokenizer, collate, collate_pairs, encode_pair_rows, encode_sft_rows, truncate
from configurator import UserError
from nanopo.tasks import AdditionTask

EOS, PAD = 256, 257  # the byte tokenizer's special ids


def utf8(text):
    """The byte tokenizer's ids for `text`, computed without the tokenizer."""
    return list(text.encode("utf-8"))


# ---------------------------------------------------------------- masking and padding

ROWS = [{"prompt": "12+34=", "response": "46"},
        {"prompt": "Say hi:", "response": " héllo ✓"},   # multi-byte characters: 2 and 3 bytes
        {"prompt": "Q", "response": "a much longer answer"}]


def test_mask_covers_exactly_response_and_eos(byte_tok):
    data, skipped = encode_sft_rows(ROWS, byte_tok, block_size=64)
    assert skipped.total() == 0
    idx, targets, mask = collate(data, byte_tok.pad_id)
    longest = max(len(utf8(r["prompt"] + r["response"])) + 1 for r in ROWS)  # + EOS
    assert idx.shape == targets.shape == mask.shape == (len(ROWS), longest - 1)
    for b, row in enumerate(ROWS):
        p, r = utf8(row["prompt"]), utf8(row["response"])
        # the targets under the mask are the response's bytes then EOS, nothing else
        assert targets[b][mask[b] == 1].tolist() == r + [EOS]
        assert byte_tok.decode(targets[b][mask[b] == 1].tolist()[:-1]) == row["response"]
        # the inputs before the first masked target are the prompt
        first = int(mask[b].nonzero()[0])
        assert first == len(p) - 1  # target t is token t + 1: the last prompt token predicts the response
        assert idx[b, :len(p)].tolist() == p
        assert byte_tok.decode(idx[b, :len(p)].tolist()) == row["prompt"]
        # targets are the inputs shifted by one over the row's real tokens
        n = len(p) + len(r)  # real input positions: every token except the final EOS
        assert idx[b, :n].tolist() == p + r
        assert targets[b, :n].tolist() == p[1:] + r + [EOS]
        assert mask[b].sum().item() == len(r) + 1


def test_padding_is_right_padding_and_never_masked(byte_tok):
    data, _ = encode_sft_rows(ROWS, byte_tok, block_size=64)
    idx, targets, mask = collate(data, byte_tok.pad_id)
    for b, row in enumerate(ROWS):
        n = len(utf8(row["prompt"] + row["response"]))
        assert (idx[b, n:] == PAD).all() and (targets[b, n:] == PAD).all()
        assert (mask[b, n:] == 0).all()
        assert (idx[b, :n] != PAD).all()  # no padding on the left or in between
    # an explicit length pads further, with the same rule
    idx2, targets2, mask2 = collate(data, byte_tok.pad_id, length=idx.size(1) + 5)
    assert torch.equal(idx2[:, :idx.size(1)], idx) and (idx2[:, idx.size(1):] == PAD).all()
    assert torch.equal(mask2[:, :idx.size(1)], mask) and (mask2[:, idx.size(1):] == 0).all()


def test_collate_pairs_chosen_first_then_rejected_one_length(byte_tok):
    rows = [{"prompt": "1+1=", "chosen": "2", "rejected": "11"},
            {"prompt": "99+99=", "chosen": "198", "rejected": "88"}]
    pairs, skipped = encode_pair_rows(rows, byte_tok, block_size=64)
    assert skipped.total() == 0
    idx, targets, mask = collate_pairs(pairs, byte_tok.pad_id)
    B = len(rows)
    longest = max(len(utf8(r["prompt"] + r[k])) + 1 for r in rows for k in ("chosen", "rejected"))
    assert idx.shape == (2 * B, longest - 1)
    for b, row in enumerate(rows):
        for offset, key in ((0, "chosen"), (B, "rejected")):
            assert targets[offset + b][mask[offset + b] == 1].tolist() == utf8(row[key]) + [EOS]
            assert idx[offset + b, :len(utf8(row["prompt"]))].tolist() == utf8(row["prompt"])


# ---------------------------------------------------------------- truncation

def test_truncation_cuts_prompt_from_left_first(byte_tok):
    # block_size 9 -> rows of at most 10 tokens; max_prompt_len defaults to 10 // 2 = 5
    rows = [{"prompt": "abcdefgh", "response": "xyz"}]
    (p, r), = encode_sft_rows(rows, byte_tok, block_size=9)[0]
    assert p == utf8("defgh")          # the prompt's end is kept
    assert r == utf8("xyz") + [EOS]    # the response is whole: 5 + 4 <= 10


def test_truncation_then_cuts_response_tail(byte_tok):
    rows = [{"prompt": "abcdefgh", "response": "0123456789"}]
    (p, r), = encode_sft_rows(rows, byte_tok, block_size=9)[0]
    assert p == utf8("defgh")
    assert r == utf8("01234")          # 10 - 5 tokens; the EOS is cut with the tail
    # a short prompt is not cut: the response gets the room
    (p, r), = encode_sft_rows([{"prompt": "ab", "response": "0123456789"}], byte_tok, block_size=9)[0]
    assert p == utf8("ab") and r == utf8("01234567")


def test_truncation_fits_rows_that_fit_untouched(byte_tok):
    # 9 + 1 = 10 tokens: exactly max_len, so even a prompt longer than max_prompt_len stays whole
    (p, r), = encode_sft_rows([{"prompt": "abcdefgh", "response": "x"}], byte_tok, block_size=9)[0]
    assert p == utf8("abcdefgh") and r == utf8("x") + [EOS]


def test_truncation_never_leaves_zero_response_tokens(byte_tok):
    # max_prompt_len >= the row length must not swallow the whole response
    (p, r), = encode_sft_rows([{"prompt": "abcdefghijkl", "response": "xyz"}], byte_tok, block_size=9,
                              max_prompt_len=50)[0]
    assert len(r) >= 1 and len(p) + len(r) == 10
    assert r == utf8("x") and p == utf8("defghijkl")  # max_len - 1 prompt tokens at most
    out = truncate(utf8("abcdefghijkl"), [utf8("xy") + [EOS], utf8("z") + [EOS]], max_len=6, max_prompt_len=6)
    assert out is not None and all(len(resp) >= 1 for resp in out[1])


def test_skipped_rows_are_counted_with_reason(byte_tok):
    rows = [{"prompt": "a", "response": ""}, {"prompt": "b", "response": "  \n"}, {"prompt": "", "response": "x"},
            {"prompt": "c", "response": "ok"}]
    data, skipped = encode_sft_rows(rows, byte_tok, block_size=16)
    assert len(data) == 1 and data[0] == (utf8("c"), utf8("ok") + [EOS])
    assert skipped.reasons == {"empty response": 2, "empty prompt": 1}
    assert skipped.total() == 3


def test_pair_rows_skip_identical_and_empty(byte_tok):
    rows = [{"prompt": "p", "chosen": "same", "rejected": "same"},
            {"prompt": "p", "chosen": "", "rejected": "no"},
            {"prompt": "p", "chosen": "abcX", "rejected": "abcY"},   # equal once the tails are cut (below)
            {"prompt": "p", "chosen": "yes", "rejected": "no"}]
    pairs, skipped = encode_pair_rows(rows, byte_tok, block_size=3)  # rows of 4 tokens: 1 prompt + 3
    assert skipped.reasons == {"chosen == rejected": 1, "empty response": 1,
                               "chosen == rejected after truncation": 1}
    assert pairs == [(utf8("p"), utf8("yes"), utf8("no") + [EOS])]


def test_missing_or_wrongly_typed_key_is_a_user_error(byte_tok):
    with pytest.raises(UserError, match="row 1: missing key 'response'"):
        encode_sft_rows([{"prompt": "a", "response": "b"}, {"prompt": "a"}], byte_tok, 16)
    with pytest.raises(UserError, match="'rejected' should be a string"):
        encode_pair_rows([{"prompt": "a", "chosen": "b", "rejected": 3}], byte_tok, 16)


# ---------------------------------------------------------------- tokenizers

def test_byte_tokenizer_round_trips_unicode(byte_tok):
    text = "héllo wörld ✓ 日本語 🙂 <|endoftext|>\n\t"
    ids = byte_tok.encode(text)
    assert ids == utf8(text)  # one token per UTF-8 byte; the special token's text stays plain text
    assert byte_tok.decode(ids) == text
    assert (byte_tok.eos_id, byte_tok.pad_id, byte_tok.n_vocab) == (256, 257, 258)
    assert byte_tok.decode(utf8("hi") + [PAD, PAD]) == "hi"  # padding is dropped


def test_gpt2_tokenizer(gpt2_tok):
    tok = gpt2_tok
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.eos_id == tok.pad_id == 50256 and tok.n_vocab == 50257
    assert tok.decode([15496, 995]) == "Hello world"


def test_unknown_tokenizer_is_a_user_error():
    with pytest.raises(UserError, match="unknown tokenizer 'bpe'"):
        Tokenizer("bpe")


# ---------------------------------------------------------------- the addition task

def has_carry(a, b):
    """Whether any column of a + b carries, by school arithmetic on the decimal digits."""
    carry = 0
    while a or b:
        carry = (a % 10 + b % 10 + carry) >= 10
        if carry:
            return True
        a, b = a // 10, b // 10
    return False


def test_addition_split_is_disjoint_and_complete():
    task = AdditionTask(n_digits=2, n_eval=1000, seed=1234)
    every = {(a, b) for a in range(10, 100) for b in range(10, 100)}
    held_out, train = set(task.eval_problems), set(task.train_problems)
    assert len(held_out) >= 500 and len(held_out) == len(task.eval_problems)
    assert not held_out & train
    assert held_out | train == every
    # the split depends on the task seed only
    assert AdditionTask(2, 1000, 1234).eval_problems == task.eval_problems
    assert AdditionTask(2, 1000, 99).eval_problems != task.eval_problems


def test_no_carry_answer_and_verifier():
    assert AdditionTask.no_carry_answer(47, 85) == "22"   # 7+5 -> 2, 4+8 -> 2
    assert AdditionTask.no_carry_answer(15, 12) == "27"   # no carry: the true sum
    assert AdditionTask.no_carry_answer(55, 45) == "90"   # 5+5 -> 0, 5+4 -> 9
    assert AdditionTask.no_carry_answer(91, 19) == "0"    # 1+9 -> 0, 9+1 -> 0
    task = AdditionTask(2, 100, 0)
    assert task.prompt(47, 85) == "47+85=" and task.parse("47+85=") == (47, 85)
    assert task.is_correct("47+85=", "132") and task.is_correct("47+85=", " 132\n")
    assert not task.is_correct("47+85=", "22") and not task.is_correct("47+85=", "1320")
    assert not task.is_correct("47+85=", "")


def test_sft_rows_wrong_fraction_is_slip_times_carry():
    task = AdditionTask(2, 1000, 1234)
    slip = 0.6
    rows, n_wrong = task.sft_rows(slip, seed=1)
    assert len(rows) == len(task.train_problems)
    wrong = 0
    for row, (a, b) in zip(rows, task.train_problems):
        assert row["prompt"] == f"{a}+{b}="
        if row["response"] != str(a + b):
            wrong += 1
            assert has_carry(a, b)  # a slip on a carry-free problem is still right
            digits = "".join(str((int(x) + int(y)) % 10) for x, y in zip(str(a), str(b)))
            assert row["response"] == str(int(digits))
    assert n_wrong == wrong
    # P(carry) for two 2-digit numbers: 1 - P(no carry in units) P(no carry in tens) = 1 - (55/100)(36/81)
    p_carry = 1 - 0.55 * 36 / 81
    expected = slip * p_carry
    sd = math.sqrt(expected * (1 - expected) / len(rows))
    assert abs(wrong / len(rows) - expected) < 5 * sd
    assert task.sft_rows(0.0, seed=1)[1] == 0


def test_build_pairs_three_sources():
    """A fake model: greedy is wrong when a % 3 == 0; otherwise the second sample is wrong when a % 3 == 1;
    otherwise every completion is right (or blank), and the pair falls back to a corruption."""
    task = AdditionTask(2, 1000, 1234)
    calls = []

    def generate_fn(prompts, temperature):
        calls.append(temperature)
        k = len(calls) - 1  # 0: the greedy call, then one call per sample
        out = []
        for prompt in prompts:
            a, b = task.parse(prompt)
            if temperature == 0.0:
                out.append(str(a + b + 1) if a % 3 == 0 else str(a + b))
            elif a % 3 == 1 and k == 2:
                out.append(f" {a + b + 10}\n")
            else:
                out.append(" " if a % 2 else str(a + b))  # blank samples are not negatives either
        return out

    rows, counts = task.build_pairs(generate_fn, n_prompts=300, n_samples=2, temperature=0.7, seed=3)
    assert calls == [0.0, 0.7, 0.7]
    assert len(rows) == 300 and len({r["prompt"] for r in rows}) == 300
    expected = {"greedy": 0, "sampled": 0, "corruption": 0}
    train = set(task.train_problems)
    for row in rows:
        a, b = task.parse(row["prompt"])
        assert (a, b) in train
        assert row["chosen"] == str(a + b) and task.is_correct(row["prompt"], row["chosen"])
        assert not task.is_correct(row["prompt"], row["rejected"])
        if a % 3 == 0:
            expected["greedy"] += 1
            assert row["rejected"] == str(a + b + 1)
        elif a % 3 == 1:
            expected["sampled"] += 1
            assert row["rejected"] == str(a + b + 10)  # stripped
        else:
            expected["corruption"] += 1
            c, r = row["chosen"], row["rejected"]
            assert len(r) == len(c) and sum(x != y for x, y in zip(c, r)) == 1 and r[0] != "0"
    assert {k: n for k, n in counts.items() if n} == expected and min(expected.values()) > 50


def test_build_pairs_without_a_model_uses_the_slip():
    task = AdditionTask(2, 1000, 1234)
    rows, counts = task.build_pairs(None, n_prompts=200, n_samples=2, temperature=1.0, seed=0)
    n_carry = 0
    for row in rows:
        a, b = task.parse(row["prompt"])
        assert row["chosen"] == str(a + b) and not task.is_correct(row["prompt"], row["rejected"])
        if has_carry(a, b):  # the slip is wrong exactly when there is a carry
            n_carry += 1
            assert row["rejected"] == str(int("".join(str((int(x) + int(y)) % 10) for x, y in zip(str(a), str(b)))))
    assert counts["slip"] == n_carry and counts["corruption"] == len(rows) - n_carry


# ---------------------------------------------------------------- batch order

def test_batch_order_is_a_permutation_per_epoch():
    order = BatchOrder(10, seed=5)
    stream = order.take(3) + order.take(3) + order.take(3) + order.take(3) + order.take(18)  # 3 epochs
    epochs = [stream[i:i + 10] for i in range(0, 30, 10)]
    for e in epochs:
        assert sorted(e) == list(range(10))
    assert epochs[0] != epochs[1]  # reshuffled every epoch
    assert order.state_dict() == {"epoch": 2, "pos": 10, "n": 10, "seed": 5}
    assert BatchOrder(10, seed=6).take(10) != epochs[0]


def test_batch_order_resumes_identically():
    first = BatchOrder(7, seed=1)
    first.take(5)
    state = first.state_dict()
    rest = first.take(30)
    resumed = BatchOrder(7, seed=1)
    resumed.load_state_dict(dict(state))
    assert resumed.take(30) == rest
    # a fresh stream of the same seed replays the whole sequence
    assert BatchOrder(7, seed=1).take(35)[5:] == rest


def test_batch_order_of_nothing_is_a_user_error():
    with pytest.raises(UserError):
        BatchOrder(0, seed=1)


def test_batch_order_refuses_another_dataset_on_resume():
    state = BatchOrder(10, seed=5).state_dict()
    with pytest.raises(UserError, match="over 10 rows with seed 5"):
        BatchOrder(11, seed=5).load_state_dict(state)


def test_cut_rows_are_counted_by_how(byte_tok):
    """Rows cut to fit block_size are counted per row and per way (prompt from the left, response
    tail); rows that fit are not; `shortest` is the fewest tokens a row needed whole."""
    rows = [{"prompt": "ab", "response": "xy"},              # 2 + 3 = 5 tokens: fits in 10
            {"prompt": "abcdefgh", "response": "xyz"},       # 12: the prompt is cut to its last 5
            {"prompt": "ab", "response": "0123456789"},      # 13: the response is cut
            {"prompt": "abcdefgh", "response": "0123456789"}]  # 19: both
    data, counter = encode_sft_rows(rows, byte_tok, block_size=9)
    assert len(data) == 4 and counter.total() == 0
    assert counter.rows_cut == 3
    assert counter.cuts == {"prompt cut from the left": 2, "response cut": 2}
    assert counter.truncated() == "3 rows (2 prompt cut from the left, 2 response cut)"
    assert counter.shortest == 5
    whole, counter = encode_sft_rows(rows[:1], byte_tok, block_size=9)
    assert counter.truncated() == "none" and counter.rows_cut == 0


def test_pairs_count_a_cut_row_once(byte_tok):
    rows = [{"prompt": "p", "chosen": "abcdefgh", "rejected": "xy"}]  # 1 + 9: chosen cut at block_size 5
    pairs, counter = encode_pair_rows(rows, byte_tok, block_size=5)
    assert counter.rows_cut == 1 and counter.cuts == {"response cut": 1} and counter.shortest == 10


def test_a_block_size_that_fits_no_row_stops_with_one_line(byte_tok):
    from data import check_rows_fit
    rows, _ = AdditionTask(2, 1000, 1234).sft_rows(0.6, 1, "every")
    # the shortest row, counted here by hand: prompt + response + EOS, one byte token per character
    shortest = min(len(r["prompt"]) + len(r["response"]) + 1 for r in rows)
    data, counter = encode_sft_rows(rows, byte_tok, block_size=2)
    with pytest.raises(UserError, match=rf"block_size=2 fits no row whole \(every one of {len(rows)} "
                                        rf"was cut\); the shortest needs {shortest} tokens"):
        check_rows_fit(data, counter, 2, "embedded task")
    # one row that fits whole is enough
    data, counter = encode_sft_rows(rows, byte_tok, block_size=shortest - 1)
    check_rows_fit(data, counter, shortest - 1, "embedded task")
    assert 0 < counter.rows_cut < len(data)
