"""Tokenised datasets are cached on disk: a second run over the same rows reads the token ids back instead of
tokenising again, and any change to the rows, tokenizer or block size misses the cache."""

import os

from data import Tokenizer, encode_pair_rows
from nanopo.formats import cached_encode

ROWS = [{"prompt": "Is the sky blue?", "chosen": " Yes.", "rejected": " No."},
        {"prompt": "2+2=", "chosen": "4", "rejected": "5"},
        {"prompt": "x", "chosen": "same", "rejected": "same"}]  # skipped and counted


class CountingTokenizer(Tokenizer):
    def __init__(self):
        super().__init__("byte")
        self.calls = 0

    def encode(self, text):
        self.calls += 1
        return super().encode(text)


def test_second_encoding_reads_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOPO_CACHE", str(tmp_path))
    tok = CountingTokenizer()
    first, skipped = cached_encode(encode_pair_rows, ROWS, tok, 32, "rows.jsonl")
    calls = tok.calls
    assert calls > 0 and len(os.listdir(tmp_path)) == 1
    second, skipped2 = cached_encode(encode_pair_rows, ROWS, tok, 32, "rows.jsonl")
    assert tok.calls == calls  # nothing tokenised the second time
    assert second == first == encode_pair_rows(ROWS, Tokenizer("byte"), 32)[0]
    assert skipped2.reasons == skipped.reasons == {"chosen == rejected": 1}


def test_changes_miss_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOPO_CACHE", str(tmp_path))
    tok = CountingTokenizer()
    cached_encode(encode_pair_rows, ROWS, tok, 32, "rows.jsonl")
    for rows, block_size in ((ROWS[:2] + [{"prompt": "x", "chosen": "a", "rejected": "b"}], 32), (ROWS, 16)):
        before = tok.calls
        out, _ = cached_encode(encode_pair_rows, rows, tok, block_size, "rows.jsonl")
        assert tok.calls > before
        assert out == encode_pair_rows(rows, Tokenizer("byte"), block_size)[0]
    assert len(os.listdir(tmp_path)) == 3


def test_a_corrupt_cache_file_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOPO_CACHE", str(tmp_path))
    tok = CountingTokenizer()
    first, _ = cached_encode(encode_pair_rows, ROWS, tok, 32, "rows.jsonl")
    (path,) = [tmp_path / f for f in os.listdir(tmp_path)]
    path.write_bytes(b"not a checkpoint")
    again, _ = cached_encode(encode_pair_rows, ROWS, tok, 32, "rows.jsonl")
    assert again == first
