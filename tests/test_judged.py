"""Judged pairs (dpo.py --pairs=judged) and online rounds (scripts/online_dpo.py): the hidden
judge's verdicts follow Bradley-Terry, ties and empty answers are handled and counted, the
trainer's rows hold no reference answer, KTO gets thumbs up/down, ranks build the same pairs under
torchrun, rounds resume between and within, and the frontier point scripts/online_dpo.py ends on
(sampled reward, KL to the SFT model) matches exact sums."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from data import Tokenizer, encode_pair_rows
from nanopo.tasks import AdditionTask, bradley_terry, judged_pairs
from test_ddp import assert_same_losses, run
from test_dpo_options import SFT, run_script

TASK = AdditionTask(n_digits=2, n_eval=100, seed=1234)


def fake_generate(offsets):
    """A stand-in model: sample k of prompt 'a+b=' is the sum + offsets[k] (a string; None = empty answer)."""
    calls = []

    def generate(prompts, temperature):
        k = len(calls) % len(offsets)
        calls.append(temperature)
        return ["" if offsets[k] is None else str(sum(TASK.parse(p)) + offsets[k]) for p in prompts]
    return generate


def binomial_ok(hits, n, p, sigmas=4.0):
    return abs(hits - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1


@pytest.mark.parametrize("tau", [0.5, 1.0, 4.0])
def test_judge_prefers_by_bradley_terry(tau):
    # every prompt's two samples: one off by 1 (reward -log 2), one off by 10 (-log 11)
    rows, counts = judged_pairs(TASK, fake_generate([1, 10]), 4000, 2, 1.0, tau, seed=0)
    p = 1 / (1 + math.exp(-(math.log(11) - math.log(2)) / tau))  # sigmoid((r1 - r2) / tau), by hand
    near = sum(int(r["chosen"]) - sum(TASK.parse(r["prompt"])) == 1 for r in rows)
    assert counts["pairs"] == len(rows) == 4000 and counts["ties"] == 0
    assert binomial_ok(near, len(rows), p), (near / len(rows), p)
    assert bradley_terry(-1.0, -1.0, tau) == 0.5 and bradley_terry(0.0, -1e9, tau) == 1.0  # finite at any gap


def test_each_carry_slips_on_its_own():
    import random
    rng = random.Random(0)
    # 47 + 85: the units carry (7 + 5 = 12) and the tens carry (4 + 8 + 1 = 13) slip independently, by hand
    assert AdditionTask.each_carry_slip(47, 85, 0.0, rng) == "132"
    assert AdditionTask.each_carry_slip(47, 85, 1.0, rng) == AdditionTask.no_carry_answer(47, 85) == "22"
    assert AdditionTask.each_carry_slip(99, 1, 1.0, rng) == "90"
    assert AdditionTask.each_carry_slip(99, 1, 0.0, rng) == "100"
    draws = [AdditionTask.each_carry_slip(47, 85, 0.3, rng) for _ in range(4000)]
    for answer, p in {"132": 0.7 * 0.7, "122": 0.3 * 0.7, "32": 0.7 * 0.3, "22": 0.3 * 0.3}.items():
        assert binomial_ok(draws.count(answer), len(draws), p), (answer, draws.count(answer) / len(draws), p)
    rows, n_wrong = AdditionTask(n_digits=2, n_eval=100).sft_rows(0.0, seed=1, slip="each")
    assert n_wrong == 0 and all(r["response"] == str(sum(AdditionTask.parse(r["prompt"]))) for r in rows)
    with pytest.raises(Exception, match="unknown slip 'some'"):
        TASK.sft_rows(0.5, seed=1, slip="some")


def test_digits_reward_counts_wrong_places_by_hand():
    task = AdditionTask(n_digits=3, n_eval=10, reward="digits")
    prompt = "567+565="  # 1132
    for answer, reward in [("1132", 0), ("1122", -1), ("132", -1), ("22", -3), ("11320", -4), ("2132", -1),
                           ("", -task.max_new_tokens), ("12a", -task.max_new_tokens), ("1²", -task.max_new_tokens)]:
        assert task.reward(prompt, answer) == reward, answer
    assert TASK.reward("47+85=", "122") == -math.log(11) and TASK.reward("47+85=", "x") < TASK.reward("47+85=", "9999")
    with pytest.raises(Exception, match="unknown judge reward"):
        AdditionTask(reward="vibes")


def test_ties_are_coin_flips_and_counted():
    rows, counts = judged_pairs(TASK, fake_generate([1, -1]), 2000, 2, 1.0, 0.1, seed=1)
    assert counts["ties"] == 2000  # 1 above and 1 below the sum: the same reward
    above = sum(int(r["chosen"]) > sum(TASK.parse(r["prompt"])) for r in rows)
    assert binomial_ok(above, 2000, 0.5)


def test_identical_samples_give_no_pair_and_empty_answers_are_ranked_and_encoded():
    rows, counts = judged_pairs(TASK, fake_generate([3, 3]), 50, 2, 1.0, 1.0, seed=2)
    assert rows == [] and counts["no two distinct samples"] == 50
    rows, counts = judged_pairs(TASK, fake_generate([None, 2]), 500, 2, 1.0, 1.0, seed=3)
    assert counts["empty samples"] == 500 and len(rows) == 500
    assert all(r["rejected"] == "" for r in rows)  # the floor loses to any number here: sigmoid(> 14) rounds to 1
    tok = Tokenizer("byte")
    pairs, skipped = encode_pair_rows(rows, tok, 32, allow_empty=True)
    assert len(pairs) == 500 and all(r == [tok.eos_id] for _, _, r in pairs)  # EOS alone
    assert encode_pair_rows(rows, tok, 32)[1].reasons == {"empty response": 500}  # datasets still skip them


def test_rows_hold_no_reference_answer():
    # the model never writes the sum: then neither may any row (the judge knows it and shows only verdicts)
    rows, counts = judged_pairs(TASK, fake_generate([1, 2, 5, -3]), 300, 4, 1.0, 1.0, seed=4)
    assert rows and all(set(r) == {"prompt", "chosen", "rejected"} for r in rows)
    truths = {r["prompt"]: str(sum(TASK.parse(r["prompt"]))) for r in rows}
    assert all(truths[r["prompt"]] not in (r["chosen"], r["rejected"]) for r in rows)
    assert counts["chosen exactly right (hidden)"] == 0


def test_kto_gets_thumbs_up_and_down():
    rows, counts = judged_pairs(TASK, fake_generate([0, 30]), 3000, 2, 1.0, 1.0, seed=5, unpaired=True)
    assert len(rows) == counts["examples"] == 6000 and set(rows[0]) == {"prompt", "completion", "label"}
    typical = (0.0 - math.log(31)) / 2  # the mean reward of all samples
    for offset, reward in ((0, 0.0), (30, -math.log(31))):
        labels = [r["label"] for r in rows if int(r["completion"]) - sum(TASK.parse(r["prompt"])) == offset]
        assert binomial_ok(sum(labels), len(labels), bradley_terry(reward, typical, 1.0))


def test_judged_pairs_need_two_samples_and_the_task():
    from configurator import UserError
    with pytest.raises(UserError, match="n_samples >= 2"):
        judged_pairs(TASK, fake_generate([1, 2]), 10, 1, 1.0, 1.0, seed=0)
    with pytest.raises(UserError, match="needs the embedded task"):
        judged_pairs(object(), fake_generate([1, 2]), 10, 2, 1.0, 1.0, seed=0)


@pytest.fixture(scope="module")
def sft_ckpt(tmp_path_factory, repo_root):
    out = tmp_path_factory.mktemp("sft")
    run_script(repo_root, "sft.py", SFT + [f"--out_dir={out}"])
    return str(out / "ckpt.pt")


JUDGED = ["--pairs=judged", "--n_samples=3", "--sample_temperature=1.5", "--n_pairs=64", "--batch_size=16",
          "--max_iters=4", "--log_interval=1", "--learning_rate=1e-3", "--min_lr=1e-3"]


def test_dpo_trains_on_judged_pairs(sft_ckpt, repo_root, tmp_path):
    g = run_script(repo_root, "dpo.py", JUDGED + [f"--sft_ckpt={sft_ckpt}", f"--out_dir={tmp_path}",
                                                  "--eval_interval=4"])
    with open(tmp_path / "pairs.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert rows and all(set(r) == {"prompt", "chosen", "rejected"} for r in rows)
    with open(tmp_path / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    train = [r for r in records if "loss" in r]
    assert abs(train[0]["loss"] - math.log(2)) < 1e-6 and train[-1]["loss"] < train[0]["loss"]
    evals = [r for r in records if "task_reward" in r]
    assert [r["iter"] for r in evals] == [0, 4]  # the judge's mean reward of the greedy answers, held out
    assert g["sources"]["pairs"] == len(rows)


def test_kto_trains_on_thumbs(sft_ckpt, repo_root, tmp_path):
    g = run_script(repo_root, "dpo.py", JUDGED + ["--loss_type=kto", f"--sft_ckpt={sft_ckpt}",
                                                  f"--out_dir={tmp_path}", "--eval_interval=4"])
    assert g["sources"]["examples"] == len(g["train_data"]) and 0 < g["sources"]["thumbs_up"] < len(g["train_data"])


def test_two_ranks_train_on_the_same_judged_pairs(sft_ckpt, repo_root, script_env, tmp_path):
    """Every rank samples and judges the pairs itself (same seed, same weights, checked by a hash across ranks):
    2 processes log what 1 process with twice the accumulation logs."""
    for name, nproc in (("one", 1), ("two", 2)):
        run(["dpo.py", *JUDGED, "--max_iters=6", "--eval_interval=6", "--gradient_accumulation_steps=2",
             "--batch_size=8", f"--sft_ckpt={sft_ckpt}", f"--out_dir={tmp_path / name}"], repo_root, script_env, nproc)
    assert_same_losses(tmp_path / "one", tmp_path / "two", ["loss", "rewards/margins"])


def online(repo_root, env, out_dir, sft_ckpt, *args):
    cmd = [sys.executable, "-m", "scripts.online_dpo", f"--sft_ckpt={sft_ckpt}", f"--out_dir={out_dir}", "--rounds=2",
           "--n_pairs=64", "--max_iters=8",
           "--dpo_args=--n_samples=3 --sample_temperature=1.5 --batch_size=16 --log_interval=1 --learning_rate=1e-3 "
           "--min_lr=1e-3 --n_eval=50", *args]
    proc = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def first_loss(round_dir):
    with open(os.path.join(round_dir, "metrics.jsonl")) as f:
        return next(r["loss"] for r in map(json.loads, f) if "loss" in r)


def test_online_rounds_their_reference_and_resume(sft_ckpt, repo_root, script_env, tmp_path):
    out = online(repo_root, script_env, tmp_path / "sft_ref", sft_ckpt)
    last = out.strip().splitlines()[-1]
    assert "ONLINE done: 2 round(s)" in last and "sampled (T 1, 4 x 100 prompts)" in last and "KL to SFT" in last
    r1, r2 = tmp_path / "sft_ref" / "round1", tmp_path / "sft_ref" / "round2"
    # out_dir/summary.json holds what the last line says (scripts/seeds.py reads it), the KL measured against
    # the SFT model, not round 1's policy that round 2's own config names as its start
    with open(tmp_path / "sft_ref" / "summary.json") as f:
        summary = json.load(f)
    results = summary["results"]
    assert summary["last_line"] == last and summary["ckpt"] == str(r2 / "ckpt.pt")
    assert f"reward {results['sampled_reward']:.3f} ± {results['sampled_reward_stderr']:.3f}" in last
    assert f"KL to SFT {results['kl']:.3f} ± {results['kl_stderr']:.3f}" in last
    assert f"task_accuracy {results['task_accuracy']:.1%}" in last
    from scripts.compare import frontier_point
    to_round1 = frontier_point(str(r2 / "ckpt.pt"), 100, sft_path=str(r1 / "ckpt.pt"))
    assert abs(to_round1["kl"] - results["kl"]) > 1e-3
    round_walls = [json.load(open(r / "summary.json"))["wall_s"] for r in (r1, r2)]
    assert summary["round_wall_s"] == round_walls and summary["wall_s"] >= sum(round_walls)
    # round 2 starts from round 1's policy; its reference stays the SFT model, so its first loss is not ln 2
    assert torch.load(r2 / "ckpt.pt", weights_only=True)["config"]["sft_ckpt"] == str(r1 / "ckpt.pt")
    assert abs(first_loss(r1) - math.log(2)) < 1e-6 and abs(first_loss(r2) - math.log(2)) > 1e-4
    online(repo_root, script_env, tmp_path / "prev_ref", sft_ckpt, "--reference=previous")
    assert abs(first_loss(tmp_path / "prev_ref" / "round2") - math.log(2)) < 1e-6  # reference = its start

    # between rounds: the same command again keeps both finished rounds
    again = online(repo_root, script_env, tmp_path / "sft_ref", sft_ckpt)
    assert again.count("finished earlier") == 2
    # within a round: round 2 cut back to its iter-2 checkpoint resumes to the same weights, bit for bit
    resumed = tmp_path / "resumed"
    online(repo_root, script_env, resumed, sft_ckpt, "--dpo_args=--n_samples=3 --sample_temperature=1.5 "
           "--batch_size=16 --log_interval=1 --learning_rate=1e-3 --min_lr=1e-3 --n_eval=50 --checkpoint_interval=2 "
           "--keep_last=3")
    full = torch.load(resumed / "round2" / "ckpt.pt", weights_only=True)["model"]
    shutil.copy(resumed / "round2" / "ckpt_0000002.pt", resumed / "round2" / "ckpt.pt")
    out = online(repo_root, script_env, resumed, sft_ckpt, "--dpo_args=--n_samples=3 --sample_temperature=1.5 "
                 "--batch_size=16 --log_interval=1 --learning_rate=1e-3 --min_lr=1e-3 --n_eval=50 "
                 "--checkpoint_interval=2 --keep_last=3")
    assert "round 1/2: finished earlier" in out and "--init_from=resume" in out
    again = torch.load(resumed / "round2" / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(full[k], again[k]) for k in full)


def test_sampled_kl_and_reward_match_exact_sums(tiny_config):
    """tasks.sampled_kl (scripts/online_dpo.py's and the notebooks' frontier point) against
    enumeration: with max_new_tokens=1 every sample is one token (EOS: the empty answer), so the
    expected log-ratio is the exact KL(p || q) = sum_v p(v) log(p(v) / q(v)) and the expected reward
    sum_v p(v) r(v), both summed in float64 over the two models' next-token distributions. 4,000
    samples of one prompt must land within 4 standard errors."""
    from nanopo.tasks import sampled_kl
    from model import GPT
    torch.manual_seed(0)
    policy, reference = GPT(tiny_config).double().eval(), GPT(tiny_config).double().eval()
    with torch.no_grad():  # make the policy favour digit tokens, so rewards and accuracy are not all floor
        policy.lm_head.weight[ord("0"):ord("9") + 1] *= 40
    tok, task = Tokenizer("byte"), AdditionTask(n_digits=1, n_eval=10, seed=0)
    task.eval_problems = [(3, 4)] * 4000
    with torch.no_grad():
        x = torch.tensor([tok.encode("3+4=")])
        logp, logq = (m(x)[0, -1].log_softmax(-1) for m in (policy, reference))  # (V,) each
    p = logp.exp()
    answers = ["" if v == tok.eos_id else tok.decode([v]) for v in range(tiny_config.vocab_size)]
    rewards = torch.tensor([task.reward("3+4=", y) for y in answers], dtype=torch.float64)
    exact_kl, exact_reward, p_right = (p * (logp - logq)).sum().item(), (p * rewards).sum().item(), p[ord("7")].item()
    assert 0.05 < p[ord("0"):ord("9") + 1].sum() < 0.95 and exact_kl > 0.1  # a test that can tell them apart
    got = sampled_kl(policy, reference, task, tok, n_prompts=4000, max_new_tokens=1, seed=3)
    assert abs(got["kl"] - exact_kl) < 4 * got["kl_stderr"]
    assert abs(got["sampled_reward"] - exact_reward) < 4 * got["sampled_reward_stderr"]
    assert binomial_ok(round(got["sampled_accuracy"] * 4000), 4000, p_right)
    same = sampled_kl(reference, reference, task, tok, n_prompts=50, max_new_tokens=1)
    assert same["kl"] == 0 and same["kl_stderr"] == 0
