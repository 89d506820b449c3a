"""Real dataset formats: each published layout, written to a file as the hub has it, loads into the rows the
encoders take; the rows then go through encode_* and collate, and decoding the batch must give back the prompt
(rendered by hand here, not by render_chat) and exactly response + EOS under the mask. Malformed rows give one
line naming file, row and key, or counted skips."""

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data import SkipCounter, collate, collate_pairs, encode_pair_rows, encode_sft_rows
from configurator import UserError
from nanopo.formats import detect_format, load_rows, render_chat
from nanopo.tasks import AnswerTask, extract_final_number, gsm8k_answer


def _write(tmp_path, name, rows):
    """rows -> tmp_path/name, as JSON lines (UTF-8, not escaped) or parquet, by the name's extension."""
    path = tmp_path / name
    if name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _msg(role, content):
    return {"role": role, "content": content}


def _decoded(tok, idx, targets, mask):
    """Each batch row -> (prompt text, response text, ends with EOS): the prompt is the inputs before the first
    masked target, the response the masked targets."""
    out = []
    for b in range(idx.size(0)):
        first = int(mask[b].nonzero()[0])  # target `first` is the first response token, so inputs :first+1 = prompt
        response = targets[b][mask[b] == 1].tolist()
        out.append((tok.decode(idx[b, :first + 1].tolist()), tok.decode(response[:-1]), response[-1] == tok.eos_id))
    return out


def _check_pairs(rows, expected, tok):
    """rows equal `expected` [(prompt, chosen, rejected)], and survive encoding + collate_pairs unchanged."""
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == expected
    pairs, skipped = encode_pair_rows(rows, tok, block_size=512)
    assert skipped.total() == 0
    got = _decoded(tok, *collate_pairs(pairs, tok.pad_id))
    B = len(expected)
    assert got[:B] == [(p, c, True) for p, c, _ in expected]
    assert got[B:] == [(p, r, True) for p, _, r in expected]


def _check_sft(rows, expected, tok):
    assert [(r["prompt"], r["response"]) for r in rows] == expected
    seqs, skipped = encode_sft_rows(rows, tok, block_size=512)
    assert skipped.total() == 0
    assert _decoded(tok, *collate(seqs, tok.pad_id)) == [(p, r, True) for p, r in expected]


# -----------------------------------------------------------------------------------------------------------
# Well-formed data of every format

U = "<|user|>\n"
A = "<|assistant|>\n"


def test_trl_standard(tmp_path, byte_tok):
    expected = [("The sky is", " blue.", " green."),
                ("Café au lait, s'il vous plaît. Réponse :", " Voilà ☕", " Non."),
                ("日本の首都は", "東京です。", "大阪です。"),
                ("Q: 2+2?\nA:", " 4", " 5"),
                ("Emoji: ", "🙂👍", "🙃")]
    path = _write(tmp_path, "trl.jsonl", [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in expected])
    rows, skipped = load_rows(path)
    assert skipped.total() == 0
    _check_pairs(rows, expected, byte_tok)


def test_trl_conversational(tmp_path, byte_tok):
    data = [([_msg("system", ""), _msg("user", "What color is the sky?")], "It is blue.", "It is green."),
            ([_msg("system", "You are terse."), _msg("user", "2+2?")], "4", "22"),
            ([_msg("user", "Hi"), _msg("assistant", "Hello! How can I help?"), _msg("user", "Name a fruit.")],
             "Apple.", "Carrot."),
            ([_msg("user", "Traduis « bonjour » en japonais")], "こんにちは", "さようなら"),
            ([_msg("system", "  \n"), _msg("user", "Say yes.")], "Yes.", "No.")]
    path = _write(tmp_path, "conv.jsonl", [{"prompt": p, "chosen": [_msg("assistant", c)],
                                            "rejected": [_msg("assistant", r)]} for p, c, r in data])
    prompts = [U + "What color is the sky?\n" + A,  # the empty system message is dropped
               "<|system|>\nYou are terse.\n" + U + "2+2?\n" + A,
               U + "Hi\n" + A + "Hello! How can I help?\n" + U + "Name a fruit.\n" + A,
               U + "Traduis « bonjour » en japonais\n" + A,
               U + "Say yes.\n" + A]  # a whitespace-only system message too
    rows, _ = load_rows(path)
    _check_pairs(rows, [(p, c, r) for p, (_, c, r) in zip(prompts, data)], byte_tok)


def test_hh_rlhf(tmp_path, byte_tok):
    H, AS = "\n\nHuman: ", "\n\nAssistant:"
    data = [(H + "What is the capital of France?" + AS, " Paris.", " London."),
            (H + "Hi" + AS + " Hello!" + H + "Can you help me bake bread?" + AS, " Sure, start with flour.", " No."),
            # the answers start alike: the shared words stay in the answers, the prompt ends at the marker
            (H + "Is it raining?" + AS + " Let me check." + H + "Well?" + AS, " I think so.", " I think not."),
            (H + "¿Cómo estás?" + AS, " ¡Muy bien! 😊", " Mal."),
            # an answer with paragraphs of its own
            (H + "Explain in steps." + AS, " Step one.\n\nStep two.", " Nope."),
            # a chosen transcript that runs on for another turn: the prompt still ends at the last SHARED marker
            (H + "Thanks?" + AS, " Sure." + H + "Thanks" + AS + " You're welcome.", " No.")]
    path = _write(tmp_path, "hh.jsonl", [{"chosen": p + c, "rejected": p + r} for p, c, r in data])
    rows, _ = load_rows(path)
    _check_pairs(rows, data, byte_tok)


def _uf_row(question, good, bad, i):
    chosen = [_msg("user", question), _msg("assistant", good)]
    return {"prompt": question, "prompt_id": f"{i:064x}", "chosen": chosen,
            "rejected": [_msg("user", question), _msg("assistant", bad)], "messages": chosen,
            "score_chosen": 8.0, "score_rejected": 3.5}


def test_ultrafeedback_parquet(tmp_path, byte_tok):
    data = [("Write a haiku about rain.", "Soft rain on the roof\nwhispers", "Rain is wet."),
            ("Translate 'cat' to German.", "Katze", "Hund"),
            ("What is 7 * 6?", "42", "36"),
            ("Résume « Les Misérables ».", "Un roman de Victor Hugo…", "Je ne sais pas."),
            ("List two primes.\nOnly numbers.", "2, 3", "4, 6")]
    path = _write(tmp_path, "uf.parquet", [_uf_row(q, g, b, i) for i, (q, g, b) in enumerate(data)])
    rows, _ = load_rows(path)
    _check_pairs(rows, [(U + q + "\n" + A, g, b) for q, g, b in data], byte_tok)


def test_kto_and_pairs_as_kto(tmp_path):
    data = [("2+2=", "4", True), ("2+2=", "5", False), ("Capital of Italy?", " Rome", True),
            ("Capital of Italy?", " Paris", False), ("Grüß dich", "Hallo! 👋", True)]
    path = _write(tmp_path, "kto.jsonl", [{"prompt": p, "completion": c, "label": lab} for p, c, lab in data])
    rows, _ = load_rows(path, kind="kto")
    assert [(r["prompt"], r["completion"], r["label"]) for r in rows] == data
    # conversational kto: messages rendered with the chat template; turns before the completion's answer join
    # the prompt
    conv = [([_msg("user", "2+2?")], [_msg("assistant", "4")], True),
            ([_msg("system", ""), _msg("user", "2+2?")], [_msg("assistant", "5")], False),
            ([_msg("user", "Olá")], [_msg("assistant", "Oi! 😀")], True),
            ([_msg("user", "Help")], [_msg("assistant", "With?"), _msg("user", "Math"), _msg("assistant", "OK")], True),
            ([_msg("system", "Rude."), _msg("user", "Hi")], [_msg("assistant", "Go away.")], False)]
    path = _write(tmp_path, "kto_conv.jsonl", [{"prompt": p, "completion": c, "label": lab} for p, c, lab in conv])
    rows, _ = load_rows(path, kind="kto")
    assert [(r["prompt"], r["completion"], r["label"]) for r in rows] == [
        (U + "2+2?\n" + A, "4", True), (U + "2+2?\n" + A, "5", False), (U + "Olá\n" + A, "Oi! 😀", True),
        (U + "Help\n" + A + "With?\n" + U + "Math\n" + A, "OK", True),
        ("<|system|>\nRude.\n" + U + "Hi\n" + A, "Go away.", False)]
    # a pairs file asked for as kto: each pair gives a desirable and an undesirable row
    pairs = _write(tmp_path, "pairs.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"},
                                             {"prompt": "x", "chosen": "same", "rejected": "same"},
                                             {"prompt": "d", "chosen": "e", "rejected": "f"}])
    rows, skipped = load_rows(pairs, kind="kto")
    assert rows == [{"prompt": "a", "completion": "b", "label": True}, {"prompt": "a", "completion": "c", "label": False},
                    {"prompt": "d", "completion": "e", "label": True}, {"prompt": "d", "completion": "f", "label": False}]
    # a pair with the same answer twice would teach one text as both good and bad: skipped and counted
    assert skipped.reasons == {"chosen == rejected": 1}


def test_prompt_completion_standard_and_conversational(tmp_path, byte_tok):
    data = [("Once upon a time", ", there was a fox."), ("def add(a, b):", "\n    return a + b"),
            ("Ελληνικά:", " γειά σου"), ("1, 2, 3,", " 4"), ("Done?", " Yes.")]
    path = _write(tmp_path, "pc.jsonl", [{"prompt": p, "completion": c} for p, c in data])
    rows, _ = load_rows(path, kind="sft")
    _check_sft(rows, data, byte_tok)

    conv = [("Hi", "Hello!"), ("2+3?", "5"), ("Ünïcødé ✓", "Ωμέγα"), ("Bye", "Goodbye."), ("Why?", "Because.")]
    path = _write(tmp_path, "pc_conv.jsonl", [{"prompt": [_msg("system", ""), _msg("user", q)],
                                               "completion": [_msg("assistant", a)]} for q, a in conv])
    rows, _ = load_rows(path, kind="sft")
    _check_sft(rows, [(U + q + "\n" + A, a) for q, a in conv], byte_tok)


def test_messages(tmp_path, byte_tok):
    conversations = [
        [_msg("system", ""), _msg("user", "Hi"), _msg("assistant", "Hello!")],
        [_msg("system", "Be kind."), _msg("user", "Q1"), _msg("assistant", "A1"), _msg("user", "Q2"),
         _msg("assistant", "A2")],
        # a user turn after the last answer has nothing to train on: it is left out
        [_msg("user", "Tell me a joke"), _msg("assistant", "Why did the chicken…"), _msg("user", "Another?")],
        [_msg("user", "Ünïcødé ✓"), _msg("assistant", "Ωμέγα 🚀")],
        [_msg("user", "Count"), _msg("assistant", "1 2 3")]]
    expected = [(U + "Hi\n" + A, "Hello!"),
                ("<|system|>\nBe kind.\n" + U + "Q1\n" + A + "A1\n" + U + "Q2\n" + A, "A2"),
                (U + "Tell me a joke\n" + A, "Why did the chicken…"),
                (U + "Ünïcødé ✓\n" + A, "Ωμέγα 🚀"),
                (U + "Count\n" + A, "1 2 3")]
    path = _write(tmp_path, "messages.jsonl", [{"messages": m} for m in conversations])
    rows, _ = load_rows(path, kind="sft")
    _check_sft(rows, expected, byte_tok)


GSM8K = [("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many "
          "clips did Natalia sell altogether in April and May?",
          "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether "
          "in April and May.\n#### 72", "72"),
         ("A shop sells 1,000 pens a day for 2 days. How many pens?", "1,000 * 2 = <<1000*2=2000>>2,000\n#### 2,000",
          "2000"),
         ("It is 3 degrees and falls by 8. What is it now?", "3 - 8 = <<3-8=-5>>-5\n#### -5", "-5"),
         ("Tom has 5 apples and eats 2. How many are left?", "5 - 2 = <<5-2=3>>3\n#### 3", "3"),
         ("How many legs do 4 cats have?", "4 * 4 = <<4*4=16>>16\n#### 16", "16")]


def test_gsm8k(tmp_path, byte_tok):
    path = _write(tmp_path, "gsm8k.jsonl", [{"question": q, "answer": a} for q, a, _ in GSM8K])
    rows, _ = load_rows(path, kind="sft")
    _check_sft(rows, [(U + q + "\n" + A, a) for q, a, _ in GSM8K], byte_tok)
    assert [gsm8k_answer(r["response"]) for r in rows] == [n for _, _, n in GSM8K]


def test_pairs_as_sft_use_the_chosen_answer(tmp_path):
    path = _write(tmp_path, "p.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    assert load_rows(path, kind="sft")[0] == [{"prompt": "a", "response": "b"}]


def test_template_markers_are_plain_text_for_gpt2(gpt2_tok):
    tok = gpt2_tok
    text = render_chat([_msg("system", "Be brief."), _msg("user", "Hi <|endoftext|>")])
    ids = tok.encode(text)
    assert tok.eos_id not in ids and tok.decode(ids) == text


def test_render_chat():
    msgs = [_msg("system", ""), _msg("user", "a"), _msg("assistant", "b"), _msg("user", "c")]
    assert render_chat(msgs) == "<|user|>\na\n<|assistant|>\nb\n<|user|>\nc\n<|assistant|>\n"
    assert render_chat(msgs, add_generation_prompt=False) == "<|user|>\na\n<|assistant|>\nb\n<|user|>\nc\n"


# -----------------------------------------------------------------------------------------------------------
# Malformed rows: one line naming file, row and key; or counted skips

def _conv_pair(p, c, r):
    return {"prompt": [_msg("user", p)], "chosen": [_msg("assistant", c)], "rejected": [_msg("assistant", r)]}


GOOD = {
    "trl": [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(5)],
    "trl_conversational": [_conv_pair(f"p{i}", f"c{i}", f"r{i}") for i in range(5)],
    "hh": [{"chosen": f"\n\nHuman: q{i}\n\nAssistant: c", "rejected": f"\n\nHuman: q{i}\n\nAssistant: r"}
           for i in range(5)],
    "ultrafeedback": [_uf_row(f"q{i}", "good", "bad", i) for i in range(5)],
    "kto": [{"prompt": f"p{i}", "completion": f"c{i}", "label": i % 2 == 0} for i in range(5)],
    "prompt_completion": [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(5)],
    "messages": [{"messages": [_msg("user", f"u{i}"), _msg("assistant", f"a{i}")]} for i in range(5)],
    "gsm8k": [{"question": f"q{i}", "answer": f"so {i}\n#### {i}"} for i in range(5)],
}
KIND = {"kto": "kto", "prompt_completion": "sft", "messages": "sft", "gsm8k": "sft"}

# per format: two bad rows and the one-line problem each must be reported with
BAD = {
    "trl": [({"prompt": "p", "rejected": "r"}, "key 'chosen' missing"),
            ({"prompt": "p", "chosen": "c", "rejected": 3}, "key 'rejected' should be a string, found int")],
    "trl_conversational": [
        ({"prompt": [_msg("user", "p")], "chosen": [_msg("user", "c")], "rejected": [_msg("assistant", "r")]},
         "key 'chosen' does not end with an assistant message"),
        ({"prompt": "p", "chosen": [_msg("assistant", "c")], "rejected": [_msg("assistant", "r")]},
         "key 'prompt' should be a list of {'role', 'content'} string messages")],
    "hh": [({"chosen": "\n\nHuman: q\n\nAssistant: c", "rejected": "something else"},
            "keys 'chosen' and 'rejected' share no '\\n\\nAssistant:' turn"),
           ({"chosen": "\n\nHuman: q\n\nAssistant:  ", "rejected": "\n\nHuman: q\n\nAssistant: r"},
            "key 'chosen' is an empty response")],
    "ultrafeedback": [
        (dict(_uf_row("q", "good", "bad", 9), rejected=[_msg("user", "other q"), _msg("assistant", "bad")]),
         "key 'rejected' differs from 'chosen' before the last message"),
        (dict(_uf_row("q", "good", "bad", 9), chosen=None), "key 'chosen' missing")],
    "kto": [({"prompt": "p", "completion": "c", "label": "yes"}, "key 'label' should be a bool, found str"),
            ({"prompt": "p", "label": True}, "key 'completion' missing")],
    "prompt_completion": [({"prompt": "p", "completion": "   "}, "key 'completion' is an empty response"),
                          ({"prompt": ["p"], "completion": "c"},
                           "key 'prompt' should be a list of {'role', 'content'} string messages")],
    "messages": [({"messages": [_msg("system", "s"), _msg("user", "u")]}, "key 'messages' has no assistant message"),
                 ({"messages": [{"role": "user"}, _msg("assistant", "a")]},
                  "key 'messages' should be a list of {'role', 'content'} string messages")],
    "gsm8k": [({"question": "q", "answer": "the answer is 4"}, "key 'answer' has no final '#### N' answer"),
              ({"answer": "#### 4"}, "key 'question' missing")],
}


@pytest.mark.parametrize("fmt", list(GOOD))
def test_malformed_rows(tmp_path, fmt):
    (bad1, why1), (bad2, why2) = BAD[fmt]
    good = GOOD[fmt]
    path = _write(tmp_path, "x.jsonl", good[:2] + [bad1] + good[2:] + [bad2])  # bad rows at index 2 and 6
    kind = KIND.get(fmt, "pairs")
    with pytest.raises(UserError) as e:
        load_rows(path, kind=kind, dataset_format=fmt)
    assert str(e.value) == f"{path}, row 2: {why1}"
    rows, skipped = load_rows(path, kind=kind, dataset_format=fmt, skip_bad_rows=True)
    assert len(rows) == 5 and isinstance(skipped, SkipCounter)
    assert skipped.reasons == ({why1: 2} if why1 == why2 else {why1: 1, why2: 1})
    # the second bad row alone is reported as well (its own row index)
    path2 = _write(tmp_path, "y.jsonl", good + [bad2])
    with pytest.raises(UserError, match=f"^{path2}, row 5: "):
        load_rows(path2, kind=kind, dataset_format=fmt)


def test_errors_are_one_line(tmp_path):
    hh = _write(tmp_path, "hh.jsonl", GOOD["hh"] + BAD["hh"][:1])
    with pytest.raises(UserError) as e:
        load_rows(hh)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="does not exist"):
        load_rows(str(tmp_path / "missing.jsonl"))
    with pytest.raises(UserError, match="single split 'train'"):
        load_rows(hh, split="test")
    gsm = _write(tmp_path, "g.jsonl", GOOD["gsm8k"])
    with pytest.raises(UserError, match="cannot be used as pairs data"):
        load_rows(gsm, kind="pairs")
    with pytest.raises(UserError, match="unknown dataset_format 'alpaca'"):
        load_rows(gsm, kind="sft", dataset_format="alpaca")
    odd = _write(tmp_path, "odd.jsonl", [{"instruction": "i", "output": "o"}] * 5)
    with pytest.raises(UserError) as e:
        load_rows(odd, kind="sft")
    assert "['instruction', 'output']" in str(e.value) and "\n" not in str(e.value)


# -----------------------------------------------------------------------------------------------------------
# Format detection and answer extraction

def test_detect_format():
    assert detect_format(["prompt", "chosen", "rejected"]) == "trl"
    assert detect_format(["prompt", "chosen", "rejected"], {"prompt": [_msg("user", "x")]}) == "trl_conversational"
    assert detect_format(["chosen", "rejected"]) == "hh"
    assert detect_format(["prompt", "prompt_id", "chosen", "rejected", "messages", "score_chosen",
                          "score_rejected"]) == "ultrafeedback"
    assert detect_format(["prompt", "completion", "label"]) == "kto"
    assert detect_format(["prompt", "completion"]) == "prompt_completion"
    assert detect_format(["messages"]) == "messages"
    assert detect_format(["question", "answer"]) == "gsm8k"
    # the first row's types decide between layouts with the same columns
    strings = {"prompt": "q", "chosen": "a", "rejected": "b", "score_chosen": 9.0, "score_rejected": 1.0}
    assert detect_format(list(strings), strings) == "trl"
    conversations = {"prompt": "q", "chosen": [_msg("user", "q"), _msg("assistant", "a")],
                     "rejected": [_msg("user", "q"), _msg("assistant", "b")]}
    assert detect_format(list(conversations), conversations) == "ultrafeedback"
    with pytest.raises(UserError, match=r"\['input', 'text'\]"):
        detect_format(["text", "input"])


def test_gsm8k_answer_and_final_number():
    assert [gsm8k_answer(a) for _, a, _ in GSM8K] == ["72", "2000", "-5", "3", "16"]
    assert gsm8k_answer("the answer is 4") is None
    assert extract_final_number("So she sold 72 clips.") == "72"
    assert extract_final_number("It costs $1,250.50 in total") == "1250.5"
    assert extract_final_number("18.00") == "18"
    # one spelling per value, and a hyphen between numbers is not a minus sign
    assert [extract_final_number(f"#### {a}") for a in ("2.50", "007", "-0", "-3.10", ".5")] == \
        ["2.5", "7", "0", "-3.1", "0.5"]
    assert extract_final_number("pages 3-4") == "4" and extract_final_number("x = -4") == "-4"
    task = AnswerTask([], [{"prompt": "q", "response": "so\n#### 2.5"}])
    assert task.is_correct("q", "#### 2.50") and not task.is_correct("q", "The answer is .25")
    assert extract_final_number("3 + 4 = 7\n#### 7\nextra 9") == "7"  # the '####' answer wins over later numbers
    assert extract_final_number("I get 12 ####") == "12"  # an empty '####' falls back to the last number
    assert extract_final_number("no idea") is None


def test_common_prefix_len_equals_a_character_loop():
    """HH's prompt is the transcripts' common start; the bisection that finds it against the obvious loop."""
    from nanopo.formats import _common_prefix_len
    rng = random.Random(0)
    for _ in range(5000):
        a, b = ("".join(rng.choice("ab\n") for _ in range(rng.randint(0, 12))) for _ in range(2))
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        assert _common_prefix_len(a, b) == n, (a, b)
