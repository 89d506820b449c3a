"""dpo.py's options end to end, run in-process (runpy) on a tiny SFT checkpoint: every --loss_type trains, the
reference-free losses allocate one model only, and the precomputed reference and prefix sharing log the same
losses as the plain live-reference run."""

import gc
import json
import math
import os
import runpy
import sys
import warnings

import pytest
import torch

from nanopo import kto
from model import GPT

SFT = ["--n_layer=1", "--n_head=2", "--n_embd=48", "--max_iters=120", "--batch_size=32", "--learning_rate=3e-3",
       "--warmup_iters=10", "--eval_interval=120", "--log_interval=40", "--n_eval=100"]
DPO = ["--max_iters=6", "--batch_size=16", "--eval_interval=6", "--log_interval=1", "--n_pairs=96", "--n_samples=1",
       "--learning_rate=1e-3", "--min_lr=1e-3"]


def run_script(repo_root, script, args):
    """Run a script as `python script args` would, in this process; returns its globals."""
    argv, cwd = sys.argv, os.getcwd()
    sys.argv = [script] + args
    os.chdir(repo_root)
    try:
        return runpy.run_path(os.path.join(repo_root, script), run_name="__main__")
    finally:
        sys.argv = argv
        os.chdir(cwd)


def losses(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


@pytest.fixture(scope="module")
def sft_ckpt(tmp_path_factory, repo_root):
    out = tmp_path_factory.mktemp("sft")
    run_script(repo_root, "sft.py", SFT + [f"--out_dir={out}"])
    return str(out / "ckpt.pt")


def dpo(repo_root, sft_ckpt, out_dir, *extra):
    return run_script(repo_root, "dpo.py", DPO + [f"--sft_ckpt={sft_ckpt}", f"--out_dir={out_dir}", *extra])


LN2 = math.log(2)
# the first step's loss, where the policy is its reference (beta = 1, dpo.py's default), in closed form
AT_REFERENCE = {"dpo": LN2, "dpo_norm": LN2, "robust": LN2, "aot": LN2, "aot_unpaired": LN2, "nca": 2 * LN2,
                "bco": 2 * LN2, "sppo_hard": 0.5, "apo_zero": 1.0, "apo_down": 1.0, "discopop": (1 + LN2) / 2,
                "exo": math.log(0.5) - 0.5 * math.log(1e-3 * (1 - 1e-3)), "kto": 0.5}


@pytest.mark.parametrize("loss_type", ["dpo", "ipo", "hinge", "simpo", "orpo", "kto", "sft", "dpo_norm", "robust",
                                       "exo", "nca", "bco", "sppo_hard", "aot", "aot_unpaired", "apo_zero",
                                       "apo_down", "discopop"])
def test_every_loss_type_trains(loss_type, repo_root, sft_ckpt, tmp_path):
    extra = ["--beta=2.0"] if loss_type == "simpo" else []
    dpo(repo_root, sft_ckpt, tmp_path, f"--loss_type={loss_type}", *extra)
    values = losses(tmp_path)
    assert len(values) == 6 and all(math.isfinite(v) for v in values)
    assert values[-1] < values[0], values  # six steps at a high learning rate lower every one of these losses
    if loss_type in AT_REFERENCE:  # (kto: unit weights give 1/2)
        assert abs(values[0] - AT_REFERENCE[loss_type]) < 1e-6, values[0]


def records(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "loss" in r]


def test_a_weighted_combination_logs_every_term(repo_root, sft_ckpt, tmp_path):
    dpo(repo_root, sft_ckpt, tmp_path, "--loss_type=dpo+bco+sft", "--loss_weights=0.8,0.2,1.0")
    logged = records(tmp_path)
    assert len(logged) == 6
    for r in logged:  # the loss is the weighted sum of the terms, each logged under its own name
        assert r["loss"] == pytest.approx(0.8 * r["dpo/loss"] + 0.2 * r["bco/loss"] + 1.0 * r["sft/loss"], abs=1e-6)
        assert r["sft/loss"] == r["sft/nll_loss"] and r["rewards/margins"] == r["dpo/rewards/margins"]
    assert logged[0]["dpo/loss"] == pytest.approx(LN2, abs=1e-6) and logged[0]["bco/loss"] == pytest.approx(2 * LN2)
    assert logged[0]["bco/delta"] == 0.0 and logged[-1]["bco/delta"] != 0.0  # BCO's running mean moved
    assert logged[-1]["dpo/loss"] < logged[0]["dpo/loss"]


def test_wpo_weights_each_pair(repo_root, sft_ckpt, tmp_path):
    dpo(repo_root, sft_ckpt, tmp_path / "wpo", "--use_weighting=True")
    dpo(repo_root, sft_ckpt, tmp_path / "plain")
    logged, plain = records(tmp_path / "wpo"), losses(tmp_path / "plain")
    # every pair's loss is ln 2 at the start, times its weight min(1, ...): the step's loss is ln 2 times the
    # mean weight (1 for this barely trained model: it finds both answers as likely as its own samples)
    assert logged[0]["loss"] == pytest.approx(LN2 * logged[0]["wpo_weight"], abs=1e-6)
    # as DPO pushes the rejected answers down, the pairs drift off-policy and weigh less: other steps
    assert min(r["wpo_weight"] for r in logged) < 0.95 and abs(logged[-1]["loss"] - plain[-1]) > 1e-4
    assert logged[-1]["loss"] < logged[0]["loss"]


def live_parameters():
    """Total size of the GPT parameters alive in this process."""
    gc.collect()
    seen, total = set(), 0
    with warnings.catch_warnings():  # isinstance() on every live object touches deprecated torch aliases
        warnings.simplefilter("ignore")
        gpts = [obj for obj in gc.get_objects() if isinstance(obj, GPT)]
    for obj in gpts:
        for p in obj.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


@pytest.mark.parametrize("args", [["--loss_type=simpo"], ["--loss_type=orpo"], ["--loss_type=dpo", "--reference_free=True"],
                                  ["--loss_type=dpo"]], ids=["simpo", "orpo", "reference_free", "dpo"])
def test_reference_free_losses_allocate_one_model(args, repo_root, sft_ckpt, tmp_path):
    gc.collect()
    before = live_parameters()
    g = dpo(repo_root, sft_ckpt, tmp_path, *args)
    n_policy = sum(p.numel() for p in g["policy"].parameters())
    models = (live_parameters() - before) / n_policy
    expected = 2 if args == ["--loss_type=dpo"] else 1  # the control: plain DPO does hold a reference
    assert models == expected
    assert (g["reference"] is None) == (expected == 1)
    del g
    gc.collect()


def test_precomputed_reference_and_prefix_sharing_equal_the_live_reference(repo_root, sft_ckpt, tmp_path):
    """Also with LD-DPO, whose discount both layouts and the precomputed table must apply alike."""
    ld = ["--ld_alpha=0.5"]
    runs = {"live": [], "precomputed": ["--precompute_ref=True"], "prefix": ["--prefix_sharing=True"],
            "both": ["--precompute_ref=True", "--prefix_sharing=True"], "ld_live": ld,
            "ld_both": ld + ["--precompute_ref=True", "--prefix_sharing=True"]}
    logged = {}
    for name, extra in runs.items():
        g = dpo(repo_root, sft_ckpt, tmp_path / name, *extra)
        logged[name] = losses(tmp_path / name)
        if "--precompute_ref=True" in extra:
            assert g["reference"] is None  # freed after the precomputation
    assert logged["live"][-1] < logged["live"][0] - 0.05  # training moved: equality is not trivial
    assert abs(logged["ld_live"][0] - LN2) < 1e-6 and abs(logged["ld_live"][-1] - logged["live"][-1]) > 1e-3
    for name, same_as in (("precomputed", "live"), ("prefix", "live"), ("both", "live"), ("ld_both", "ld_live")):
        assert max(abs(a - b) for a, b in zip(logged[same_as], logged[name])) <= 1e-6, (name, logged[name])


def test_tr_dpo_moves_the_reference_every_n_steps(repo_root, sft_ckpt, tmp_path):
    """--ref_sync_steps=2: the first two steps are plain DPO's, the third is not (its reference has moved);
    the final reference is neither the SFT model nor the policy."""
    plain = dpo(repo_root, sft_ckpt, tmp_path / "plain")
    g = dpo(repo_root, sft_ckpt, tmp_path / "tr", "--ref_sync_steps=2", "--ref_mixup_alpha=0.5")
    a, b = losses(tmp_path / "plain"), losses(tmp_path / "tr")
    assert a[:2] == b[:2] and abs(a[2] - b[2]) > 1e-4
    sft = torch.load(sft_ckpt, weights_only=True)["model"]
    reference, policy = g["reference"].state_dict(), g["policy"].state_dict()
    assert all(not torch.equal(reference[k], sft[k]) and not torch.equal(reference[k], policy[k]) for k in
               ("lm_head.weight", "transformer.h.0.mlp.c_fc.weight"))
    assert g["reference_sync"].syncs == 3  # after steps 2, 4 and 6
    assert not any(p.requires_grad for p in g["reference"].parameters())
    del plain


def test_kto_kl_uses_mismatched_pairs(repo_root, sft_ckpt, tmp_path):
    g = dpo(repo_root, sft_ckpt, tmp_path, "--loss_type=kto", "--max_iters=1")
    rows = [(p, y) for p, y, _ in g["train_data"][:4]]
    # the KL inputs pair prompt i with completion (i + 1) % n, never its own
    mismatched = kto.mismatched(rows, 32)
    assert [p for p, _ in mismatched] == [p for p, _ in rows]
    assert [y for _, y in mismatched] == [y for _, y in rows[1:] + rows[:1]]
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        kl = [r["kl"] for r in map(json.loads, f) if "kl" in r]
    assert kl and kl[0] == 0.0  # step 0: policy = reference, so the estimate is exactly 0


def test_reference_is_frozen_in_the_script(repo_root, sft_ckpt, tmp_path):
    g = dpo(repo_root, sft_ckpt, tmp_path)
    ckpt = torch.load(sft_ckpt, weights_only=True)["model"]
    ref = g["reference"].state_dict()
    assert all(not p.requires_grad for p in g["reference"].parameters())
    assert all(torch.equal(ref[k], ckpt[k]) for k in ckpt)  # bit-identical to the SFT weights after training
    policy = g["policy"].state_dict()
    assert any(not torch.equal(policy[k], ckpt[k]) for k in ckpt)  # while the policy moved
