"""Tests for checkpoints in common.py: a strict save/load round trip that reproduces the model's outputs exactly,
state dicts of wrapped models (torch.compile's '_orig_mod.', DDP's 'module.'), the errors a user gets for a
checkpoint that does not fit, and weights_only loading."""

import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanopo import checkpoint
from nanopo import runtime
from configurator import UserError
from model import GPT


class Wrapper(nn.Module):
    """Holds the model as `.module`, which is how DDP names it: its state dict keys gain a 'module.' prefix."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def outputs(model):
    idx = torch.arange(24).view(2, 12) % 258
    with torch.no_grad():
        return model(idx)


@pytest.fixture
def saved(tmp_path, tiny_model):
    path = str(tmp_path / "run" / "ckpt.pt")
    checkpoint.save_checkpoint(path, tiny_model, {"lr": 0.1, "name": "x"}, "byte", iter_num=7, task_accuracy=0.5)
    return path


def test_round_trip_is_exact(saved, tiny_model):
    ckpt = checkpoint.load_checkpoint(saved, tokenizer="byte")
    assert ckpt["iter_num"] == 7 and ckpt["task_accuracy"] == 0.5 and ckpt["tokenizer"] == "byte"
    assert ckpt["config"] == {"lr": 0.1, "name": "x"}
    assert ckpt["model_args"]["n_layer"] == tiny_model.config.n_layer
    restored = checkpoint.model_from_checkpoint(ckpt, saved).eval()
    assert restored.config == tiny_model.config
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(restored.state_dict()[k], v), k
    assert torch.equal(outputs(restored), outputs(tiny_model))
    assert restored.lm_head.weight is restored.transformer.wte.weight  # the tie survives a load
    # overrides change the built model's config, not its weights
    assert checkpoint.model_from_checkpoint(ckpt, saved, dropout=0.3).config.dropout == 0.3


def test_save_is_atomic_and_leaves_no_temporary_file(saved):
    assert os.listdir(os.path.dirname(saved)) == ["ckpt.pt"]


def test_checkpoint_loads_with_weights_only(saved):
    ckpt = torch.load(saved, map_location="cpu", weights_only=True)  # no pickled code needed to read it
    assert set(ckpt) >= {"format_version", "model", "model_args", "config", "tokenizer"}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's own imports
def test_prefixed_state_dicts_load_strictly(tiny_model, tiny_config):
    state = tiny_model.state_dict()
    for prefix in ("_orig_mod.", "module.", "module._orig_mod."):
        fresh = GPT(tiny_config).eval()
        checkpoint.load_state_strict(fresh, {prefix + k: v for k, v in state.items()})
        assert torch.equal(outputs(fresh), outputs(tiny_model)), prefix
    # the real wrappers' key names: a DDP-style .module container, and torch.compile (no compiling happens
    # until the first call, so listing its state dict is cheap)
    wrapped = Wrapper(tiny_model).state_dict()
    assert set(wrapped) == {"module." + k for k in state}
    compiled = torch.compile(tiny_model).state_dict()
    assert set(compiled) == {"_orig_mod." + k for k in state}
    for sd in (wrapped, compiled):
        fresh = GPT(tiny_config).eval()
        checkpoint.load_state_strict(fresh, sd)
        assert torch.equal(outputs(fresh), outputs(tiny_model))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's own imports
def test_saving_a_wrapped_model_stores_plain_keys(tmp_path, tiny_model):
    path = str(tmp_path / "ckpt.pt")
    checkpoint.save_checkpoint(path, Wrapper(torch.compile(tiny_model)), {}, "byte")
    assert set(checkpoint.load_checkpoint(path)["model"]) == set(tiny_model.state_dict())


def test_missing_or_unexpected_key_is_named(tiny_model, tiny_config):
    state = dict(tiny_model.state_dict())
    del state["transformer.h.1.mlp.c_fc.bias"]
    with pytest.raises(UserError, match="missing keys.*transformer.h.1.mlp.c_fc.bias"):
        checkpoint.load_state_strict(GPT(tiny_config), state, "ck.pt")
    state = dict(tiny_model.state_dict(), **{"transformer.h.0.attn.bias": torch.zeros(1)})
    with pytest.raises(UserError, match="unexpected keys.*transformer.h.0.attn.bias"):
        checkpoint.load_state_strict(GPT(tiny_config), state, "ck.pt")
    state = dict(tiny_model.state_dict())
    state["transformer.wpe.weight"] = torch.zeros(5, tiny_config.n_embd)
    with pytest.raises(UserError, match="'transformer.wpe.weight' has shape \\(5, 32\\)"):
        checkpoint.load_state_strict(GPT(tiny_config), state, "ck.pt")


def test_model_args_that_do_not_fit_are_a_user_error(saved):
    ckpt = checkpoint.load_checkpoint(saved)
    ckpt["model_args"]["n_layer"] = 1  # one block fewer than the weights hold
    with pytest.raises(UserError, match="unexpected keys.*transformer.h.1"):
        checkpoint.model_from_checkpoint(ckpt, saved)
    ckpt["model_args"]["n_layers"] = 1
    with pytest.raises(UserError, match="model_args"):
        checkpoint.model_from_checkpoint(ckpt, saved)


def test_tokenizer_mismatch_is_an_error(saved):
    with pytest.raises(UserError, match="tokenizer 'byte'.*'gpt2'"):
        checkpoint.load_checkpoint(saved, tokenizer="gpt2")


def test_unreadable_or_foreign_files_are_user_errors(tmp_path, saved):
    with pytest.raises(UserError, match="does not exist"):
        checkpoint.load_checkpoint(str(tmp_path / "none.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="could not be read"):
        checkpoint.load_checkpoint(str(junk))
    foreign = str(tmp_path / "foreign.pt")
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(UserError, match="not a checkpoint of this code"):
        checkpoint.load_checkpoint(foreign)
    old = checkpoint.load_checkpoint(saved)
    old["format_version"] = 0
    torch.save(old, foreign)
    with pytest.raises(UserError, match="format 0"):
        checkpoint.load_checkpoint(foreign)


class Payload:
    """An arbitrary object: unpickling it means running code, which weights_only refuses."""


def test_weights_only_refuses_pickled_objects(tmp_path, saved):
    ckpt = checkpoint.load_checkpoint(saved)
    ckpt["extra"] = Payload()
    path = str(tmp_path / "pickled.pt")
    torch.save(ckpt, path)
    with pytest.raises(UserError, match="could not be read"):
        checkpoint.load_checkpoint(path)


def test_non_finite_weights_are_not_saved(tmp_path, tiny_model):
    with torch.no_grad():
        tiny_model.transformer.ln_f.bias[0] = float("nan")
    path = str(tmp_path / "ckpt.pt")
    with pytest.raises(UserError, match="transformer.ln_f.bias"):
        checkpoint.save_checkpoint(path, tiny_model, {}, "byte")
    assert not os.path.exists(path)


def test_training_checkpoint_is_weights_only_loadable(tmp_path, tiny_model):
    """The resume state (optimizer, data order, RNG states of torch/numpy/python) must also load with
    weights_only, i.e. hold tensors and plain containers only."""
    from data import BatchOrder
    opt = runtime.configure_optimizer(tiny_model, 0.1, 1e-3, (0.9, 0.99), "cpu")
    logits = tiny_model(torch.zeros(1, 4, dtype=torch.long))
    F.cross_entropy(logits.view(-1, logits.size(-1)), torch.ones(4, dtype=torch.long)).backward()
    opt.step()
    order = BatchOrder(10, 1)
    order.take(3)
    cfg = {"out_dir": str(tmp_path), "keep_last": 1}
    checkpoint.save_run(cfg, 5, tiny_model, opt, order, torch.amp.GradScaler("cpu", enabled=False), "byte",
                        task_accuracy=0.25)
    ckpt = checkpoint.load_checkpoint(str(tmp_path / "ckpt.pt"), "byte")
    assert ckpt["iter_num"] == 5 and ckpt["data_order"] == {"epoch": 0, "pos": 3, "n": 10, "seed": 1}
    assert ckpt["task_accuracy"] == 0.25
