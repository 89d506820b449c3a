"""Each published dataset format, as a local file of >= 5 rows, trains for 2 steps through the real scripts
(sft.py or dpo.py, in-process, tiny model): the run ends, logs finite losses, and evaluates on held-out rows."""

import json
import math
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_dpo_options import run_script

TINY = ["--max_iters=2", "--batch_size=4", "--eval_interval=2", "--log_interval=1", "--n_eval=5"]
MODEL = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=128"]


def msg(role, content):
    return {"role": role, "content": content}


def write(path, rows):
    if str(path).endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


QA = [("What is 2+2?", "4", "5"), ("Capital of France?", "Paris", "Rome"), ("Ünïcødé ✓?", "Ωμέγα", "Alpha"),
      ("Say hi", "Hello!", "Go away."), ("Colour of the sky?", "Blue", "Green"), ("3*3?", "9", "6")]
H, AS = "\n\nHuman: ", "\n\nAssistant:"

FORMATS = {
    "trl": ("pairs.jsonl", [{"prompt": q, "chosen": " " + c, "rejected": " " + r} for q, c, r in QA]),
    "trl_conversational": ("conv.jsonl", [{"prompt": [msg("system", ""), msg("user", q)],
                                           "chosen": [msg("assistant", c)], "rejected": [msg("assistant", r)]}
                                          for q, c, r in QA]),
    "hh": ("hh.jsonl", [{"chosen": H + "Hi" + AS + " Hello." + H + q + AS + " " + c,
                         "rejected": H + "Hi" + AS + " Hello." + H + q + AS + " " + r} for q, c, r in QA]),
    "ultrafeedback": ("uf.parquet", [{"prompt": q, "chosen": [msg("user", q), msg("assistant", c)],
                                      "rejected": [msg("user", q), msg("assistant", r)], "score_chosen": 8.0,
                                      "score_rejected": 2.0} for q, c, r in QA]),
    "kto": ("kto.jsonl", [{"prompt": q, "completion": a, "label": good} for q, c, r in QA
                          for a, good in ((c, True), (r, False))]),
    "prompt_completion": ("pc.jsonl", [{"prompt": q, "completion": " " + c} for q, c, _ in QA]),
    "messages": ("messages.jsonl", [{"messages": [msg("system", ""), msg("user", q), msg("assistant", c)]}
                                    for q, c, _ in QA]),
    "gsm8k": ("gsm8k.jsonl", [{"question": f"Tom has {n} apples and buys {n + 1} more. How many now?",
                               "answer": f"{n} + {n + 1} = <<{n}+{n + 1}={2 * n + 1}>>{2 * n + 1}\n#### {2 * n + 1}"}
                              for n in range(1, 8)]),
}


def records(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def check_run(out_dir, eval_key):
    logged = records(out_dir)
    train = [r for r in logged if "loss" in r]
    assert [r["iter"] for r in train] == [0, 1] and all(math.isfinite(r["loss"]) for r in train)
    evals = [r for r in logged if eval_key in r]
    assert [r["iter"] for r in evals] == [0, 2] and all(math.isfinite(r[eval_key]) for r in evals)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    return {fmt: write(root / name, rows) for fmt, (name, rows) in FORMATS.items()}


@pytest.fixture(scope="module")
def sft_ckpt(tmp_path_factory, repo_root, files):
    out = tmp_path_factory.mktemp("sft_pc")
    run_script(repo_root, "sft.py", TINY + MODEL + [f"--dataset={files['prompt_completion']}",
                                                    f"--eval_dataset={files['prompt_completion']}",
                                                    f"--out_dir={out}"])
    check_run(out, "eval_loss")
    return str(out / "ckpt.pt")


@pytest.mark.parametrize("fmt", ["messages", "hh", "gsm8k"])
def test_sft_on_each_format(fmt, files, repo_root, tmp_path):
    g = run_script(repo_root, "sft.py", TINY + MODEL + [f"--dataset={files[fmt]}", f"--eval_dataset={files[fmt]}",
                                                        f"--out_dir={tmp_path}"])
    check_run(tmp_path, "eval_loss")
    if fmt == "gsm8k":  # solutions with a final answer also give a held-out task accuracy
        check_run(tmp_path, "task_accuracy")
        assert len(g["task"].eval_prompts) == 5


def test_sft_without_held_out_rows_says_so(files, repo_root, tmp_path, capsys):
    """A local file has one split: with no --eval_dataset there is nothing held out. The run trains, logs no
    empty evaluation lines and its last line says there was no held-out evaluation."""
    run_script(repo_root, "sft.py", TINY + MODEL + [f"--dataset={files['messages']}", f"--out_dir={tmp_path}"])
    assert all("loss" in r for r in records(tmp_path)) and len(records(tmp_path)) == 2
    assert "SFT done: no held-out evaluation" in capsys.readouterr().out


def test_sft_eval_loss_is_per_token_whatever_the_batch_size(files, repo_root, tmp_path):
    """eval_loss is the NLL per response token over all held-out rows: batches of 2 rows (whose token counts
    differ) give what one batch of every row gives."""
    losses = []
    for bs in (2, 100):
        run_script(repo_root, "sft.py", MODEL + ["--max_iters=0", f"--batch_size={bs}", f"--dataset={files['hh']}",
                                                 f"--eval_dataset={files['hh']}", f"--out_dir={tmp_path / str(bs)}"])
        losses.append(records(tmp_path / str(bs))[0]["eval_loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


@pytest.mark.parametrize("fmt", ["trl", "trl_conversational", "hh", "ultrafeedback"])
def test_dpo_on_each_pairs_format(fmt, files, sft_ckpt, repo_root, tmp_path):
    g = run_script(repo_root, "dpo.py", TINY + [f"--dataset={files[fmt]}", f"--eval_dataset={files[fmt]}",
                                                f"--sft_ckpt={sft_ckpt}", f"--out_dir={tmp_path}"])
    check_run(tmp_path, "eval_rewards/accuracies")
    assert abs(records(tmp_path)[1]["loss"] - math.log(2)) < 1e-6  # the first training line: policy = reference
    assert len(g["train_data"]) == len(QA)


def test_kto_on_unpaired_rows(files, sft_ckpt, repo_root, tmp_path):
    g = run_script(repo_root, "dpo.py", TINY + ["--loss_type=kto", f"--dataset={files['kto']}",
                                                f"--sft_ckpt={sft_ckpt}", f"--out_dir={tmp_path}"])
    train = [r for r in records(tmp_path) if "loss" in r]
    assert abs(train[0]["loss"] - 0.5) < 1e-6 and all(math.isfinite(r["loss"]) for r in train)
    assert sorted(label for _, _, label in g["train_data"]) == [False] * len(QA) + [True] * len(QA)


def test_kto_mismatched_pairs_fit_block_size_and_held_out_rows_give_eval_loss(sft_ckpt, repo_root, tmp_path):
    """KTO's KL term pairs prompt i with completion i+1: a 60-token prompt beside a 121-token completion (181 >
    block_size 128) must be cut to fit as the matched rows were. Held-out KTO rows give eval_loss."""
    rows = [{"prompt": "Q" * 60, "completion": " yes", "label": True},
            {"prompt": "Q?", "completion": " " + "a" * 120, "label": False}] * 2
    path = write(tmp_path / "long.jsonl", rows)
    run_script(repo_root, "dpo.py", TINY + ["--loss_type=kto", f"--dataset={path}", f"--eval_dataset={path}",
                                            f"--sft_ckpt={sft_ckpt}", f"--out_dir={tmp_path / 'out'}"])
    check_run(tmp_path / "out", "eval_loss")
    assert records(tmp_path / "out")[0]["eval_loss"] == pytest.approx(0.5, abs=1e-6)  # policy = reference


def test_dpo_on_gsm8k_builds_on_policy_pairs(files, repo_root, tmp_path):
    # an SFT model of the gsm8k format, then DPO whose pairs are its own wrong answers
    sft_dir = tmp_path / "sft"
    run_script(repo_root, "sft.py", TINY + MODEL + [f"--dataset={files['gsm8k']}", f"--eval_dataset={files['gsm8k']}",
                                                    f"--out_dir={sft_dir}"])
    g = run_script(repo_root, "dpo.py", TINY + [f"--dataset={files['gsm8k']}", f"--eval_dataset={files['gsm8k']}",
                                                "--n_samples=0", f"--sft_ckpt={sft_dir / 'ckpt.pt'}",
                                                f"--out_dir={tmp_path / 'dpo'}"])
    check_run(tmp_path / "dpo", "task_accuracy")
    # a random tiny model gets every problem wrong: each prompt got a pair, rejected = its own greedy answer
    assert g["sources"]["greedy"] == len(g["rows"]) == 7
    solutions = {row["answer"] for row in FORMATS["gsm8k"][1]}
    assert all(r["chosen"] in solutions and r["rejected"] not in solutions for r in g["rows"])
