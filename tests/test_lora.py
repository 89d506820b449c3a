"""LoRA (lora.py) and activation checkpointing (model.Block): LoRA at step 0 is the base model; the adapters-off
reference equals a frozen deep copy's log-probs exactly; DPO starts at ln 2; a step changes the adapters and
nothing else; merged weights give the adapter model's logits (and export / sample take them); adapters resume
exactly; checkpointed gradients equal plain ones, with and without LoRA, in one process and under DDP; and the
scripts train with LoRA in memory for one model, every reference mode and loss included."""

import collections
import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nanopo import checkpoint
from configurator import check_config
from configurator import UserError
from logprobs import concatenated_logps
from nanopo.lora import AdaptersOff, LoRALinear, adapters_off, apply_lora, lora_settings, merge_lora
from losses import dpo_loss
from model import GPT, GPTConfig, set_grad_checkpoint
from nanopo.runtime import configure_optimizer
from test_ddp import assert_same_losses, records
from test_dpo_options import DPO, SFT, dpo, live_parameters, losses, run_script
from test_dpo_options import sft_ckpt  # noqa: F401  (a fixture: the tiny SFT run the in-process DPO runs start from)
from test_resume import DPO_ARGS, SFT_TINY, assert_same_final_state, assert_same_metrics, prepare_resume
from test_resume import run_script as run_subprocess
from test_resume import sft_full  # noqa: F401  (a fixture: the tiny SFT run that DPO_ARGS start from)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUT = dict(pad_id=257, block_size=32, device="cpu")
ADAPTED = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def pairs(seed=0, n=4):
    """Random preference pairs (prompt, chosen, rejected) of byte tokens, responses ending in EOS (256)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda k: torch.randint(0, 256, (k,), generator=g).tolist()  # noqa: E731
    return [(rand(4 + i), rand(2 + i) + [256], rand(5 - i % 3) + [256]) for i in range(n)]


def randomise_adapters(model, std=0.3, seed=1):
    """Non-zero B (and fresh A), so the adapters change the model's output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("lora_A", "lora_B")):
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model


def idx(seed=5):
    return torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- LoRA in one process

def test_lora_at_step_zero_is_the_base_model(tiny_model, tiny_config):
    before = tiny_model(idx())
    apply_lora(tiny_model, rank=4, alpha=8.0)
    assert torch.equal(tiny_model(idx()), before)  # B = 0: exactly the base model, not just close
    trained = {n: p for n, p in tiny_model.named_parameters() if p.requires_grad}
    # only the adapters train: r * (in + out) numbers per adapted layer, counted here by hand
    C, r, L = tiny_config.n_embd, 4, tiny_config.n_layer
    assert all(n.endswith(("lora_A", "lora_B")) for n in trained)
    assert sum(p.numel() for p in trained.values()) == L * r * ((C + 3 * C) + (C + C) + (C + 4 * C) + (4 * C + C))
    assert all(torch.count_nonzero(p) == 0 for n, p in trained.items() if n.endswith("lora_B"))
    assert all(torch.count_nonzero(p) > 0 for n, p in trained.items() if n.endswith("lora_A"))
    # the base weights keep their names: a plain checkpoint's keys are all still there
    assert set(GPT(tiny_config).state_dict()) <= set(tiny_model.state_dict())
    assert lora_settings(tiny_model) == {"rank": 4, "alpha": 8.0, "targets": ",".join(ADAPTED)}


def test_lora_forward_is_the_formula(tiny_model):
    """y = W x + b + (alpha / r) B A x, computed here in float64 by hand for one layer."""
    apply_lora(tiny_model, rank=3, alpha=6.0, targets="mlp.c_fc")
    randomise_adapters(tiny_model)
    layer = tiny_model.transformer.h[0].mlp.c_fc
    assert isinstance(layer, LoRALinear) and not isinstance(tiny_model.transformer.h[0].attn.c_attn, LoRALinear)
    x = torch.randn(5, layer.in_features)
    W, b, A, B = (t.detach().double() for t in (layer.weight, layer.bias, layer.lora_A, layer.lora_B))
    expected = x.double() @ W.T + b + (6.0 / 3) * (x.double() @ A.T @ B.T)
    torch.testing.assert_close(layer(x).double(), expected, rtol=0, atol=1e-5)
    with adapters_off(tiny_model):
        torch.testing.assert_close(layer(x).double(), x.double() @ W.T + b, rtol=0, atol=1e-5)
    assert layer.enabled  # switched back on when the block ends


def test_adapters_off_reference_equals_a_frozen_deep_copy(tiny_model):
    reference = copy.deepcopy(tiny_model).requires_grad_(False)  # dpo.py's full fine-tuning reference
    policy = randomise_adapters(apply_lora(tiny_model, rank=4, alpha=8.0))
    batch = pairs()
    with torch.no_grad():
        copy_logps = concatenated_logps(reference, batch, **LAYOUT)[:2]
        off_logps = concatenated_logps(AdaptersOff(policy), batch, **LAYOUT)[:2]
        on_logps = concatenated_logps(policy, batch, **LAYOUT)[:2]
    for a, b, c in zip(copy_logps, off_logps, on_logps):
        assert torch.equal(a, b)  # exactly, bit for bit
        assert (a - c).abs().max() > 1e-3  # while the adapters do change the policy
    with torch.no_grad():  # and the switch does not stick
        assert all(torch.equal(a, b) for a, b in zip(on_logps, concatenated_logps(policy, batch, **LAYOUT)[:2]))


def test_dpo_starts_at_ln2_with_zero_rewards(tiny_model):
    policy = apply_lora(tiny_model, rank=4, alpha=8.0)
    batch = pairs()
    pc, pr, _, _ = concatenated_logps(policy, batch, **LAYOUT)
    with torch.no_grad():
        rc, rr, _, _ = concatenated_logps(AdaptersOff(policy), batch, **LAYOUT)
    loss, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert torch.count_nonzero(chosen_rewards) == 0 and torch.count_nonzero(rejected_rewards) == 0


def test_a_step_changes_the_adapters_and_nothing_else(tiny_model):
    policy = apply_lora(tiny_model, rank=4, alpha=8.0)
    base = {n: p.detach().clone() for n, p in policy.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    optimizer = configure_optimizer(policy, 0.1, 1e-2, (0.9, 0.99), "cpu")  # weight decay on: it must not reach W
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == \
        {id(p) for p in policy.parameters() if p.requires_grad}
    for step in range(2):  # step 1: B moves (A's gradient is 0 while B = 0); step 2: A too
        pc, pr, _, _ = concatenated_logps(policy, pairs(step), **LAYOUT)
        with torch.no_grad():
            rc, rr, _, _ = concatenated_logps(AdaptersOff(policy), pairs(step), **LAYOUT)
        dpo_loss(pc, pr, rc, rr, beta=0.5)[0].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    after = dict(policy.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in base.items())  # the base weights: bit-identical
    assert all(not torch.equal(after[n], p) for n, p in adapters.items())  # every adapter moved
    assert all(p.grad is None for n, p in after.items() if n in base)
    assert not any(optimizer.state[p] for n, p in after.items() if n in base)  # no Adam state for them


def test_merge_gives_the_adapter_models_logits(tiny_model, tiny_config):
    policy = randomise_adapters(apply_lora(tiny_model, rank=4, alpha=8.0))
    with torch.no_grad():
        adapter_logits = policy(idx())
        base_logits = GPT(tiny_config).eval().requires_grad_(False)
        base_logits.load_state_dict({k: v for k, v in policy.state_dict().items() if "lora_" not in k})
        base_logits = base_logits(idx())
        layer = policy.transformer.h[1].attn.c_proj
        expected_w = layer.weight.double() + 2.0 * layer.lora_B.double() @ layer.lora_A.double()  # float64, by hand
    merged = merge_lora(copy.deepcopy(policy)).eval()
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert set(merged.state_dict()) == set(GPT(tiny_config).state_dict())  # the plain GPT-2 layout
    assert all(p.requires_grad for p in merged.parameters())
    torch.testing.assert_close(merged.transformer.h[1].attn.c_proj.weight.double(), expected_w, rtol=0, atol=1e-6)
    with torch.no_grad():
        merged_logits = merged(idx())
    assert (merged_logits - adapter_logits).abs().max() <= 1e-5
    assert (base_logits - adapter_logits).abs().max() > 1e-2  # the adapters matter: the comparison can fail


def test_a_lora_checkpoint_loads_merged_and_exports(tmp_path, tiny_model):
    policy = randomise_adapters(apply_lora(tiny_model, rank=4, alpha=8.0, targets="attn.c_attn,mlp.c_proj"))
    path = str(tmp_path / "ckpt.pt")
    checkpoint.save_checkpoint(path, policy, {}, "byte")
    ckpt = checkpoint.load_checkpoint(path)
    assert ckpt["lora"] == {"rank": 4, "alpha": 8.0, "targets": "attn.c_attn,mlp.c_proj"}
    assert any(k.endswith("lora_A") for k in ckpt["model"])  # saved as it trains: base and adapters apart
    # what sample.py and scripts/export_hf.py get
    loaded = checkpoint.model_from_checkpoint(ckpt, path).eval()
    assert not any(isinstance(m, LoRALinear) for m in loaded.modules())
    with torch.no_grad():
        expected = policy(idx())
        assert (loaded(idx()) - expected).abs().max() <= 1e-5
    transformers = pytest.importorskip("transformers")  # noqa: F841
    from scripts.export_hf import export
    hf = export(path, str(tmp_path / "hf"))
    with torch.no_grad():
        assert (hf(idx()).logits - expected).abs().max() <= 1e-5


def test_bad_lora_settings_are_one_line_errors(tiny_model):
    with pytest.raises(UserError, match="lora_targets='attn.q'.*attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj"):
        apply_lora(tiny_model, 4, 8.0, targets="attn.q")
    for key, value in (("lora_rank", -1), ("lora_alpha", 0.0), ("lora_dropout", 1.0)):
        with pytest.raises(UserError, match=f"{key}={value!r} makes no sense"):
            check_config({key: value})


def test_flops_count_frozen_weights_at_four_per_token(tiny_model, tiny_config):
    C, L, T = tiny_config.n_embd, tiny_config.n_layer, 10
    n = tiny_model.get_num_params()
    attention = 12 * L * C * T  # 12 * L * H * Q * T with H * Q = C
    assert tiny_model.flops_per_token(T) == 6 * n + attention
    apply_lora(tiny_model, rank=2, alpha=4.0)
    n_lora = sum(p.numel() for p in tiny_model.parameters() if p.requires_grad)
    # the frozen n parameters: forward 2 and the input's gradient 2; the adapters 6, as any trained weight
    assert tiny_model.flops_per_token(T) == 4 * n + 6 * n_lora + attention
    assert tiny_model.flops_per_token(T, train=False) == 2 * (n + n_lora) + attention / 3


def test_the_memory_benchmark_counts_what_the_model_holds(tiny_model, tiny_config):
    """bench/memory.py predicts memory from parameter counts: its adapter count is the model's, and
    its parts add up as the docstring says (20 bytes per parameter for full fine-tuning with a
    copied reference)."""
    from bench import memory as bench_memory
    apply_lora(tiny_model, rank=4, alpha=8.0)
    counted = sum(p.numel() for p in tiny_model.parameters() if p.requires_grad)
    assert bench_memory.lora_parameter_count(tiny_config.n_layer, tiny_config.n_embd, 4) == counted
    shape = dict(n_layer=2, n_embd=32, vocab_size=258)
    parts, peak = bench_memory.predict("full", shape, 1000, tokens=10, rank=4)
    assert parts["weights"] + parts["reference"] + parts["gradients"] + parts["adamw"] == 20 * 1000
    assert parts["activations"] == 4 * 10 * (2 * 16 * 32 + 3 * 258)
    ckpt, _ = bench_memory.predict("lora_ckpt", shape, 1000, tokens=10, rank=4)
    assert ckpt["activations"] == 4 * 10 * (2 * 32 + 16 * 32 + 3 * 258) and ckpt["reference"] == 0
    assert peak == 20 * 1000 + parts["activations"]  # AdamW's state is alive during every later step's backward


# ---------------------------------------------------------------- activation checkpointing

def block_calls(model):
    """A list that gains one entry per forward of a block's attention (a recomputation counts again)."""
    calls = []
    for block in model.transformer.h:
        block.attn.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_checkpointed_gradients_equal_plain_ones(lora):
    """float32, dropout on in the model (and in the adapters): checkpointing must restore the RNG so the
    recomputed blocks draw the same masks. Gradients agree within 1e-6, and the blocks really ran twice."""
    grads = {}
    for grad_checkpoint in (False, True):
        torch.manual_seed(0)
        policy = GPT(GPTConfig(block_size=32, vocab_size=258, n_layer=3, n_head=2, n_embd=32, dropout=0.1))
        reference = copy.deepcopy(policy).eval().requires_grad_(False)
        if lora:
            reference = AdaptersOff(randomise_adapters(apply_lora(policy, rank=4, alpha=8.0, dropout=0.1), std=0.1))
        set_grad_checkpoint(policy, grad_checkpoint)
        calls = block_calls(policy)
        torch.manual_seed(1)
        pc, pr, _, _ = concatenated_logps(policy, pairs(), **LAYOUT)
        with torch.no_grad():
            rc, rr, _, _ = concatenated_logps(reference, pairs(), **LAYOUT)
        forward_calls = len(calls)
        dpo_loss(pc, pr, rc, rr, beta=0.5)[0].backward()
        assert len(calls) - forward_calls == (3 if grad_checkpoint else 0)  # one recomputation per block
        grads[grad_checkpoint] = {n: p.grad for n, p in policy.named_parameters() if p.requires_grad}
    assert grads[False].keys() == grads[True].keys() and len(grads[False]) == (24 if lora else 4 + 12 * 3)
    for name, g in grads[False].items():
        assert g.abs().max() > 0, name  # (reentrant checkpointing gives frozen-embedding LoRA no gradient at all)
        assert (grads[True][name] - g).abs().max() <= 1e-6, name


class OpCounter(TorchDispatchMode):
    """Counts the aten ops run while it is active, by name ('addmm', 'native_layer_norm', ...)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.__name__.split(".")[0]] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mask", [False, True], ids=["causal", "packed"])
def test_selective_checkpointing_recomputes_no_matmul(mask):
    """float64, dropout 0.1, causal or prefix-shared (masked) attention: --grad_checkpoint=selective gives the plain
    gradients (the recomputed dropout masks are the same ones), its backward runs exactly the plain backward's
    matmuls and attention kernels (none is made again, unlike full checkpointing: 4 more per block), and it makes
    LayerNorm (2 per block) and GELU (1) again, whose outputs it therefore did not keep."""
    from data import collate_prefix_shared
    batch = collate_prefix_shared(pairs(), pad_id=257)
    grads, ops = {}, {}
    for mode in (False, True, "selective"):
        torch.manual_seed(0)
        policy = GPT(GPTConfig(block_size=32, vocab_size=258, n_layer=3, n_head=2, n_embd=32, dropout=0.1)).double()
        set_grad_checkpoint(policy, mode)
        torch.manual_seed(1)
        logits = policy(batch["idx"], pos=batch["pos"], attn_mask=batch["attn_mask"] if mask else None)
        loss = (logits.log_softmax(-1) * torch.randn(logits.shape, dtype=torch.float64)).sum()
        with OpCounter() as counter:
            loss.backward()
        grads[mode], ops[mode] = {n: p.grad for n, p in policy.named_parameters()}, counter.ops
    heavy = lambda o: {k: v for k, v in o.items() if "mm" in k or "attention" in k}  # noqa: E731
    assert heavy(ops["selective"]) == heavy(ops[False]) and sum(heavy(ops[False]).values()) > 0
    assert ops[True]["addmm"] - ops[False].get("addmm", 0) == 4 * 3  # full: the 4 projections of 3 blocks again
    assert ops["selective"]["native_layer_norm"] == 2 * 3 and ops["selective"]["gelu"] == 3
    assert ops[False].get("native_layer_norm", 0) == 0 and ops[False].get("gelu", 0) == 0
    for name, g in grads[False].items():
        assert g.abs().max() > 0, name
        assert (grads["selective"][name] - g).abs().max() <= 1e-12, name
        assert (grads[True][name] - g).abs().max() <= 1e-12, name
    with pytest.raises(ValueError, match="grad_checkpoint: expected False, True or 'selective', got 'some'"):
        set_grad_checkpoint(policy, "some")


def test_checkpointed_gradients_equal_plain_ones_under_ddp(tmp_path, script_env):
    out = tmp_path / "grads.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(REPO, "tests", "ddp_checkpoint_grads.py"), str(out)], cwd=tmp_path,
                          env=script_env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results) == {"full", "lora", "full_selective", "lora_selective"}
    for kind, r in results.items():
        assert r["ranks_agree"], kind  # DDP averaged the checkpointed gradients over the ranks
        assert r["grad_norm"] > 1e-3 and r["max_abs_diff"] <= 1e-6, (kind, r)
    assert results["lora"]["n_tensors"] == results["lora_selective"]["n_tensors"] == 2 * 4 * 2  # A, B x 4 x 2 blocks


# ---------------------------------------------------------------- the scripts

def lora_dpo(repo_root, sft_ckpt, out_dir, *extra):  # noqa: F811  (the path, not the fixture)
    return dpo(repo_root, sft_ckpt, out_dir, "--lora_rank=4", *extra)


def test_lora_dpo_holds_one_model_and_keeps_the_base_weights(repo_root, sft_ckpt, tmp_path, capsys):  # noqa: F811
    before = live_parameters()
    g = lora_dpo(repo_root, sft_ckpt, tmp_path)
    assert live_parameters() - before == sum(p.numel() for p in g["policy"].parameters())  # one model, no copy
    assert isinstance(g["reference"], AdaptersOff) and g["reference"].model is g["policy"]
    assert "1 model(s) in memory" in capsys.readouterr().out
    with open(tmp_path / "metrics.jsonl") as f:
        first = [r for r in map(json.loads, f) if "loss" in r][0]
    assert first["iter"] == 0 and first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0
    logged = losses(tmp_path)
    assert logged[-1] < logged[0] - 0.05  # it learns
    sft, saved = torch.load(sft_ckpt, weights_only=True), torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert all(torch.equal(saved["model"][k], v) for k, v in sft["model"].items())  # the base never moved
    assert saved["lora"]["rank"] == 4 and {k for k in saved["model"] if "lora_" in k}


def test_lora_with_precomputed_reference_and_prefix_sharing_logs_the_same_losses(repo_root, tmp_path,
                                                                                  sft_ckpt):  # noqa: F811
    logged = {}
    for name, extra in {"live": [], "both": ["--precompute_ref=True", "--prefix_sharing=True"],
                        "checkpointed": ["--grad_checkpoint=True"]}.items():
        lora_dpo(repo_root, sft_ckpt, tmp_path / name, *extra)
        logged[name] = losses(tmp_path / name)
    for name in ("both", "checkpointed"):
        assert max(abs(a - b) for a, b in zip(logged["live"], logged[name])) <= 1e-6, (name, logged[name])


@pytest.mark.parametrize("loss_type", ["ipo", "kto", "orpo"])
def test_every_kind_of_loss_trains_with_lora(loss_type, repo_root, sft_ckpt, tmp_path):  # noqa: F811
    lora_dpo(repo_root, sft_ckpt, tmp_path, f"--loss_type={loss_type}")
    logged = losses(tmp_path)
    assert len(logged) == 6 and logged[-1] < logged[0]
    if loss_type == "kto":  # the reference (adapters off) equals the policy at step 0: loss 1/2, KL estimate 0
        assert logged[0] == pytest.approx(0.5, abs=1e-6)
        with open(tmp_path / "metrics.jsonl") as f:
            assert [r["kl"] for r in map(json.loads, f) if "kl" in r][0] == 0.0


def test_lora_sft_checkpoint_feeds_dpo_merged(repo_root, tmp_path, script_env):
    """A LoRA SFT run's adapters are merged into the base weights DPO starts from, so the reference is the SFT
    model itself (with a deep copy, or as the base under DPO's own new adapters): step 0 is ln 2 either way.
    sample.py reads the LoRA checkpoints too."""
    sft_dir = tmp_path / "sft"
    run_script(repo_root, "sft.py", SFT + ["--lora_rank=8", "--learning_rate=1e-2", f"--out_dir={sft_dir}"])
    sft_path = str(sft_dir / "ckpt.pt")
    merged = checkpoint.model_from_checkpoint(checkpoint.load_checkpoint(sft_path), sft_path)
    for name, extra in (("full", []), ("lora", ["--lora_rank=4"])):
        g = run_script(repo_root, "dpo.py", DPO + ["--max_iters=1", f"--sft_ckpt={sft_path}",
                                                   f"--out_dir={tmp_path / name}", *extra])
        with torch.no_grad():  # the reference is the merged SFT model (LoRA: the policy, a step on, adapters off)
            assert torch.equal(g["reference"](idx()), merged.eval()(idx()))
        assert losses(tmp_path / name)[0] == pytest.approx(math.log(2), abs=1e-6)
    proc = subprocess.run([sys.executable, "sample.py", f"--ckpt={tmp_path / 'lora' / 'ckpt.pt'}",
                           "--prompts=12+34=", "--max_new_tokens=4"], cwd=repo_root, env=script_env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and f"reference ({sft_path})" in proc.stdout, proc.stderr[-2000:]


def test_lora_dpo_resume_is_exact(sft_full, tmp_path, script_env):  # noqa: F811
    """Adapters with dropout: the resumed run must restore them, their Adam state and the RNG. Resumed without
    --lora_rank: the adapters' shape comes from the run's checkpoint; a conflicting one is a one-line error."""
    args = DPO_ARGS + [f"--sft_ckpt={sft_full / 'ckpt.pt'}", "--learning_rate=1e-3", "--lora_dropout=0.1"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run_subprocess("dpo.py", args + ["--lora_rank=4", "--lora_alpha=4", f"--out_dir={full}"], tmp_path, script_env)
    prepare_resume(full, resumed, 2)
    out = run_subprocess("dpo.py", args + [f"--out_dir={resumed}", "--init_from=resume"], tmp_path, script_env)
    assert "from iter 2" in out and "LoRA rank 4" in out
    assert_same_metrics(full, resumed)
    assert_same_final_state(full, resumed)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "dpo.py"), *args, "--lora_rank=2", "--init_from=resume",
                           f"--out_dir={resumed}"], cwd=tmp_path, env=script_env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "has lora_rank=4, but this run sets lora_rank=2" in proc.stderr.strip().splitlines()[-1]


def test_lora_sft_resume_is_exact(tmp_path, script_env):
    args = SFT_TINY + ["--max_iters=6", "--eval_interval=100", "--checkpoint_interval=2", "--keep_last=10",
                       "--lora_rank=4", "--lora_dropout=0.1", "--dropout=0.1", "--grad_checkpoint=True"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run_subprocess("sft.py", args + [f"--out_dir={full}"], tmp_path, script_env)
    prepare_resume(full, resumed, 2)
    run_subprocess("sft.py", args + [f"--out_dir={resumed}", "--init_from=resume"], tmp_path, script_env)
    assert_same_metrics(full, resumed)
    assert_same_final_state(full, resumed)


TINY_DPO = ["--batch_size=8", "--max_iters=6", "--eval_interval=100", "--log_interval=1", "--n_pairs=40",
            "--n_samples=1", "--learning_rate=1e-3", "--gradient_accumulation_steps=2", "--lora_rank=4"]


@pytest.fixture(scope="module")
def lora_one_process(sft_full, tmp_path_factory, script_env):  # noqa: F811
    """A LoRA DPO run in one process, two micro-batches per step, without checkpointing."""
    out = tmp_path_factory.mktemp("lora_one")
    run_subprocess("dpo.py", TINY_DPO + [f"--sft_ckpt={sft_full / 'ckpt.pt'}", f"--out_dir={out}"], out, script_env)
    return out


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_lora_with_checkpointing_on_two_processes_equals_one(parallel, lora_one_process, tmp_path, script_env,
                                                            sft_full):  # noqa: F811
    one, two = lora_one_process, tmp_path / "two"
    run_subprocess("dpo.py", TINY_DPO + [f"--sft_ckpt={sft_full / 'ckpt.pt'}", f"--out_dir={two}",
                                         "--grad_checkpoint=True", f"--fsdp={parallel == 'fsdp'}"], tmp_path,
                   script_env, torchrun=True)
    assert_same_losses(one, two, ["loss", "grad_norm"])  # relative 1e-5
    for a, b in zip(records(one, "loss"), records(two, "loss")):  # rewards pass 0: absolute
        assert abs(a["rewards/margins"] - b["rewards/margins"]) <= 1e-5, (a, b)
    a = torch.load(one / "ckpt.pt", weights_only=True)
    b = torch.load(two / "ckpt.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys() and b["lora"] == a["lora"]  # FSDP gathers plain, full tensors
    assert max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"]) < 1e-5
