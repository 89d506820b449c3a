"""
Datasets as people publish them: loading a Hugging Face hub dataset or a local .jsonl/.json/.parquet file, the
published row layouts (TRL, HH-RLHF, UltraFeedback, KTO, prompt/completion, messages, GSM8K), the one chat
template, and the on-disk cache of tokenised rows.

load_rows() turns each row of a published layout into the plain dicts data.py's encoders take: pairs
{'prompt', 'chosen', 'rejected'}, sft {'prompt', 'response'} or kto {'prompt', 'completion', 'label'}.
Conversations become text through ONE chat template (render_chat), so SFT, preference training and sampling
all see prompts written the same way.
"""

import codecs
import hashlib
import json
import os

import torch

from data import SkipCounter
from configurator import UserError
from nanopo.tasks import gsm8k_answer

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
        raise UserError(f"{path_or_name} holds '{fmt}' rows ({holds}), which cannot be used as {kind} data"
                        + (": use --loss_type=kto" if holds == "kto" else ""))
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


def write_jsonl(path, rows):
    """Rows (dicts) as a .jsonl file, one JSON object a line, its folder made if need be: what a run was taught."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


# -----------------------------------------------------------------------------------------------------------
# The token cache

TOKEN_CACHE_VERSION = 2  # bump when encoding or truncation changes, so old cached token ids are not reused


def token_cache_dir():
    return os.environ.get("NANOPO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "nanopo")


def cached_encode(encode, rows, tok, block_size, source, use_cache=True, allow_empty=False):
    """encode(rows, tok, block_size, source=source, allow_empty=...) (encode_sft_rows or encode_pair_rows), its
    result kept on disk
    under token_cache_dir() ($NANOPO_CACHE, else ~/.cache/nanopo) and keyed by a hash of the rows' text, the
    tokenizer and the block size: a second run over the same data reads the token ids back instead of
    tokenising again (hashing text is far cheaper than BPE). Returns (encoded rows, SkipCounter)."""
    if not use_cache:
        return encode(rows, tok, block_size, source=source, allow_empty=allow_empty)
    h = hashlib.sha256(json.dumps([encode.__name__, tok.name, block_size, TOKEN_CACHE_VERSION, allow_empty]).encode())
    for row in rows:
        h.update(json.dumps(row, sort_keys=True).encode())
    path = os.path.join(token_cache_dir(), h.hexdigest()[:32] + ".pt")
    if os.path.exists(path):
        try:
            saved = torch.load(path, weights_only=True)
            skipped = SkipCounter()
            skipped.reasons = dict(saved["skipped"])
            skipped.cuts = dict(saved["cuts"])
            skipped.rows_cut = saved["rows_cut"]
            skipped.shortest = saved["shortest"]
            return [tuple(r) for r in saved["rows"]], skipped
        except Exception:
            pass  # unreadable (a foreign or cut-short file): tokenise again and rewrite it
    out, skipped = encode(rows, tok, block_size, source=source, allow_empty=allow_empty)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp.{os.getpid()}"
        torch.save({"rows": out, "skipped": skipped.reasons, "cuts": skipped.cuts,
                    "rows_cut": skipped.rows_cut, "shortest": skipped.shortest}, tmp)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache folder: the run goes on without the cache
    return out, skipped
