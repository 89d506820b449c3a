"""GPT-2 weights in (GPT.from_hf_gpt2) and out (scripts/export_hf.py). transformers'
GPT2LMHeadModel is an independent implementation of the same network, so equal logits check the
weight mapping (names, Conv1D transposes, tying) and the architecture details (tanh-GELU, LayerNorm
eps, attention scaling) at once."""

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from nanopo.checkpoint import save_checkpoint  # noqa: E402

from scripts.export_hf import export  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402


def _perturb(model, seed):
    """Noise in every parameter: a fresh init has zero biases and unit LayerNorm weights, which would hide a bias
    or a LayerNorm copied to the wrong place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def _tiny_hf():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    return _perturb(transformers.GPT2LMHeadModel(config), seed=1).eval()


def _max_diff(a, b):
    return (a - b).abs().max().item()


def test_from_hf_gpt2_gives_the_same_logits():
    hf = _tiny_hf()
    ours = GPT.from_hf_gpt2(hf).eval()
    assert ours.config.block_size == 16 and ours.config.vocab_size == 100
    assert ours.lm_head.weight is ours.transformer.wte.weight  # still tied after loading
    idx = torch.randint(0, 100, (3, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = hf(input_ids=idx).logits
        got = ours(idx)
        assert _max_diff(got, want) <= 1e-5
        # a cropped position table computes the same for sequences that fit it
        short = GPT.from_hf_gpt2(hf, block_size=8).eval()
        assert short.transformer.wpe.weight.shape == (8, 32)
        assert _max_diff(short(idx[:, :8]), hf(input_ids=idx[:, :8]).logits) <= 1e-5


def test_from_hf_gpt2_rejects_another_architecture():
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=8,
                                     bos_token_id=0, eos_token_id=0, activation_function="relu")
    with pytest.raises(ValueError, match="activation"):
        GPT.from_hf_gpt2(transformers.GPT2LMHeadModel(config))


@pytest.mark.parametrize("bias", [True, False])
def test_export_then_reload_with_transformers(tmp_path, bias):
    torch.manual_seed(3)
    config = GPTConfig(block_size=16, vocab_size=258, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=bias)
    ours = _perturb(GPT(config), seed=4).eval()
    ckpt_path, out_dir = str(tmp_path / "ckpt.pt"), str(tmp_path / "hf")
    save_checkpoint(ckpt_path, ours, config={}, tokenizer="byte")
    export(ckpt_path, out_dir)

    assert os.path.isfile(os.path.join(out_dir, "model.safetensors"))
    with open(os.path.join(out_dir, "config.json")) as f:
        saved = json.load(f)
    assert (saved["n_positions"], saved["vocab_size"], saved["tie_word_embeddings"]) == (16, 258, True)
    assert (saved["eos_token_id"], saved["pad_token_id"]) == (256, 257)  # the byte tokenizer's

    hf = transformers.GPT2LMHeadModel.from_pretrained(out_dir).eval()
    idx = torch.randint(0, 258, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = ours(idx)
        assert _max_diff(hf(input_ids=idx).logits, want) <= 1e-5
        # and back again, loading the folder by path
        back = GPT.from_hf_gpt2(out_dir).eval()
        assert _max_diff(back(idx), want) <= 1e-5
