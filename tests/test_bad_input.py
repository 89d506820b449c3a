"""Bad input ends a run with ONE line on stderr that names the problem (exit code != 0, no traceback), or is
skipped and counted. Part one runs the real scripts as subprocesses (what a user sees); part two calls the
loading and checking functions in-process, where a subprocess would only add seconds.

The subprocesses run concurrently (a few at a time) from one fixture, so the file stays within its time budget."""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from nanopo import checkpoint
import configurator
from nanopo import runtime
from configurator import apply_overrides
from data import BatchOrder, encode_pair_rows, encode_sft_rows
from configurator import UserError
from nanopo.formats import load_rows
from model import GPT, GPTConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(block_size=32, vocab_size=258, n_layer=1, n_head=2, n_embd=32, dropout=0.0, bias=True)
SFT_TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--batch_size=8", "--n_eval=50", "--max_iters=1",
            "--device=cpu"]
TASK_CONFIG = {"n_digits": 2, "n_eval": 50, "task_seed": 1234}

# (id, script, arguments ({d}: the fixture's folder), what the one line must contain)
SCRIPT_CASES = [
    ("zero_batch_size", "sft.py", ["--batch_size=0"], "batch_size=0 makes no sense"),
    ("negative_beta", "dpo.py", ["--beta=-0.1"], "beta=-0.1 makes no sense"),
    ("unknown_loss_type", "dpo.py", ["--loss_type=dpoo"], "unknown loss_type 'dpoo'"),
    ("rpo_alpha_with_kto", "dpo.py", ["--loss_type=kto", "--rpo_alpha=1.0"],
     "rpo_alpha applies to every loss but orpo, sft and kto, not 'kto' (it adds an NLL term"),
    ("label_smoothing_with_ipo", "dpo.py", ["--loss_type=ipo", "--label_smoothing=0.1"],
     "label_smoothing applies to dpo, robust, exo, aot and aot_unpaired, not 'ipo'"),
    ("kto_micro_batch_of_one", "dpo.py", ["--loss_type=kto", "--batch_size=1"], "micro-batches of >= 2 rows"),
    ("no_cuda", "sft.py", ["--device=cuda"], "no CUDA GPU"),
    ("no_mps", "sft.py", ["--device=mps"], "no Apple GPU (MPS)"),
    ("unknown_config_key", "sft.py", ["--batchsize=8"], "did you mean 'batch_size'"),
    ("config_file_raises", "sft.py", ["{d}/raises.py"], "ZeroDivisionError"),
    ("resume_without_checkpoint", "sft.py", SFT_TINY + ["--init_from=resume", "--out_dir={d}/empty"],
     "does not exist (nothing to resume"),
    ("truncated_sft_ckpt", "dpo.py", ["--sft_ckpt={d}/half.pt"], "could not be read"),
    ("sft_ckpt_of_other_shape", "dpo.py", ["--sft_ckpt={d}/wrong_shape.pt"], "has shape (258, 64)"),
    ("resume_other_tokenizer", "sft.py", SFT_TINY + ["--init_from=resume", "--out_dir={d}/run", "--tokenizer=gpt2"],
     "has tokenizer='byte', but this run sets tokenizer='gpt2'"),
    ("resume_other_architecture", "sft.py", SFT_TINY[:2] + SFT_TINY[3:] + ["--n_embd=64", "--init_from=resume",
                                                                          "--out_dir={d}/run"], "but this run sets n_embd=64"),
    ("dpo_resume_of_sft_run", "dpo.py", ["--init_from=resume", "--out_dir={d}/run"], "not written by dpo.py"),
    # data files: the loader's own error and progress output must not reach the user beside the one line
    ("dataset_not_utf8", "sft.py", ["--dataset={d}/not_utf8.jsonl", "--eval_split="],
     "not_utf8.jsonl is not UTF-8 text: invalid byte at offset 51"),
    ("dataset_truncated_json", "dpo.py", ["--dataset={d}/truncated.jsonl", "--init_from=scratch", "--loss_type=orpo"],
     "JSON parse error"),
    ("compile_not_bool", "dpo.py", ["--compile=yes"], "compile='yes' makes no sense"),
    # a block_size that fits no row whole: every row would be cut (the shortest of the embedded task's
    # 7,100 training rows is '10+92=' '2' EOS, 8 tokens; test_data counts it independently)
    ("block_size_fits_no_row", "sft.py", ["--block_size=2"],
     "embedded task: block_size=2 fits no row whole (every one of 7100 was cut); the shortest needs 8 "
     "tokens (prompt + response + EOS): use --block_size=7 or more"),
    ("dataset_rows_all_too_long", "dpo.py", ["--dataset={d}/long_pairs.jsonl", "--init_from=scratch",
                                             "--loss_type=orpo", "--block_size=6"],
     "long_pairs.jsonl: block_size=6 fits no row whole (every one of 2 was cut); the shortest needs 9 "
     "tokens"),
    ("kto_precompute_ref", "dpo.py", ["--loss_type=kto", "--precompute_ref=True"],
     "precompute_ref applies to every loss but simpo, orpo, sft and kto, not 'kto' (kto's KL term pairs "
     "completions across each batch"),
    ("simpo_reference_free", "dpo.py", ["--loss_type=simpo", "--reference_free=True"],
     "reference_free applies to dpo, dpo_norm, ipo, hinge, robust, exo, discopop and aot, not 'simpo'"),
    # the loss family's options (losses.LOSS_OPTIONS); more of them in-process below
    ("trl_loss_name", "dpo.py", ["--loss_type=sigmoid"], "unknown loss_type 'sigmoid' (TRL's 'sigmoid' is our 'dpo')"),
    ("loss_weights_do_not_fit", "dpo.py", ["--loss_type=dpo+bco+sft", "--loss_weights=0.8,0.2"],
     "loss_weights='0.8,0.2' has 2 weight(s) for the 3 loss(es) of 'dpo+bco+sft'"),
    ("ld_alpha_with_an_sft_term", "dpo.py", ["--loss_type=dpo+sft", "--ld_alpha=0.5"],
     "ld_alpha applies to every loss but dpo_norm, ipo, simpo, orpo, sft and kto, not 'dpo+sft'"),
    ("ref_sync_with_precompute_ref", "dpo.py", ["--ref_sync_steps=10", "--precompute_ref=True"],
     "ref_sync_steps moves the reference during training: with precompute_ref there is no reference model to move"),
    ("use_weighting_with_aot", "dpo.py", ["--loss_type=aot", "--use_weighting=True"],
     "use_weighting applies to every loss but aot, aot_unpaired, simpo, orpo, sft and kto, not 'aot' (WPO weights"),
    # offline (the tests set HF_HUB_OFFLINE): transformers cannot fetch the weights, and says so in one line
    ("gpt2_weights_offline", "sft.py", ["--init_from=gpt2", "--tokenizer=gpt2", "--max_iters=1"], "could not load GPT-2"),
]


def write_training_checkpoint(out_dir, **model_kw):
    """A checkpoint with everything resume needs, as sft.py would write it for a TINY model."""
    model = GPT(GPTConfig(**dict(TINY, **model_kw)))
    optimizer = runtime.configure_optimizer(model, 0.1, 1e-3, (0.9, 0.99), "cpu")
    checkpoint.save_checkpoint(os.path.join(out_dir, "ckpt.pt"), model, dict(TASK_CONFIG, out_dir=str(out_dir)),
                           "byte", iter_num=1, optimizer=optimizer.state_dict(),
                           data_order=BatchOrder(10, 1).state_dict(), rng=checkpoint.rng_state())


def make_files(d):
    """The bad inputs the script cases point at, all under folder d."""
    with open(d / "raises.py", "w") as f:
        f.write("batch_size = 4\nmax_iters = 1 // 0\n")
    os.makedirs(d / "empty")
    os.makedirs(d / "run")
    write_training_checkpoint(d / "run")
    with open(d / "run" / "ckpt.pt", "rb") as f:
        data = f.read()
    with open(d / "half.pt", "wb") as f:
        f.write(data[:len(data) // 2])
    (d / "not_utf8.jsonl").write_bytes(b'{"prompt": "1+1=", "completion": "2"}\n{"prompt": "a\xff", "completion": "3"}\n')
    (d / "truncated.jsonl").write_text('{"prompt": "1+1=", "chosen": "2", "rejected": "3"}\n{"prompt": "1+1=", "chos')
    # "12+30=" + "42" + EOS: 9 tokens; "100+200=" + "3000" + EOS (the longer answer counts): 13
    (d / "long_pairs.jsonl").write_text('{"prompt": "12+30=", "chosen": "42", "rejected": "41"}\n'
                                        '{"prompt": "100+200=", "chosen": "300", "rejected": "3000"}\n')
    # model_args of one shape, weights of another (n_embd 32 vs 64)
    ckpt = checkpoint.load_checkpoint(str(d / "run" / "ckpt.pt"))
    ckpt["model"] = GPT(GPTConfig(**dict(TINY, n_embd=64))).state_dict()
    torch.save(ckpt, d / "wrong_shape.pt")


@pytest.fixture(scope="module")
def script_results(request, tmp_path_factory, script_env):
    """Start every selected script case (3 at a time) at once; each test then waits for its own."""
    d = tmp_path_factory.mktemp("bad_input")
    make_files(d)

    def run(case):
        _, script, args, _ = case
        return subprocess.run([sys.executable, os.path.join(REPO, script)] + [a.format(d=d) for a in args],
                              cwd=d, env=script_env, capture_output=True, text=True, timeout=120)

    pool = ThreadPoolExecutor(max_workers=3)
    selected = {item.callspec.params["case"][0] for item in request.session.items
                if getattr(item, "originalname", None) == "test_script_reports_one_line"}
    futures = {case[0]: pool.submit(run, case) for case in SCRIPT_CASES if case[0] in selected}
    yield futures
    pool.shutdown(wait=True)


@pytest.mark.parametrize("case", SCRIPT_CASES, ids=[c[0] for c in SCRIPT_CASES])
def test_script_reports_one_line(case, script_results):
    proc = script_results[case[0]].result()
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0, proc.stdout[-1000:]
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: ") and case[3] in lines[0], lines[0]


# -----------------------------------------------------------------------------------------------------------
# In-process: the same promise from the functions the scripts call

def one_line_error(fn, *args, match, **kwargs):
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and match in message, message
    return message


BAD_CONFIGS = [
    ({"learning_rate": 0.0}, "learning_rate=0.0"),
    ({"learning_rate": float("nan")}, "learning_rate=nan"),
    ({"max_iters": -1}, "max_iters=-1"),
    ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps=0"),
    ({"label_smoothing": 0.5}, "label_smoothing=0.5"),
    ({"dropout": 1.0}, "dropout=1.0"),
    ({"eval_interval": 0}, "eval_interval=0"),
    ({"log_interval": -2}, "log_interval=-2"),
    ({"block_size": 1}, "block_size=1"),
    ({"beta2": 1.0}, "beta2=1.0"),
    ({"n_embd": 30, "n_head": 4}, "n_embd=30 is not divisible by n_head=4"),
    ({"dtype": "float64"}, "dtype='float64'"),
    ({"desirable_weight": 0.0}, "desirable_weight=0.0"),
    ({"discopop_tau": 2.0}, "discopop_tau=2.0"),
    ({"ld_alpha": 1.5}, "ld_alpha=1.5"),
    ({"ref_mixup_alpha": 0.0}, "ref_mixup_alpha=0.0"),
    ({"ref_sync_steps": -1}, "ref_sync_steps=-1"),
    ({"f_alpha_divergence_coef": 0.0}, "f_alpha_divergence_coef=0.0"),
]


@pytest.mark.parametrize("cfg, match", BAD_CONFIGS, ids=[m.split("=")[0].split()[0] for _, m in BAD_CONFIGS])
def test_check_config_rejects(cfg, match):
    good = {"batch_size": 8, "max_iters": 0, "learning_rate": 1e-3, "n_embd": 32, "n_head": 2, "beta": 0.1,
            "label_smoothing": 0.0, "dropout": 0.0, "dtype": "auto"}
    configurator.check_config(good)  # the baseline passes, so each failure below is the one key's doing
    one_line_error(configurator.check_config, dict(good, **cfg), match=match)


@pytest.mark.parametrize("argv, match", [
    (["--max_iters=ten"], "argument '--max_iters=ten': 'max_iters' expects int, got str 'ten'"),
    (["--max_iters"], "argument '--max_iters': expected --key=value"),
    (["--compile=1"], "'compile' expects bool, got 1"),
    (["missing_config.py"], "config file 'missing_config.py': No such file or directory"),
], ids=["ill_typed", "no_equals", "int_for_bool", "missing_config_file"])
def test_bad_overrides_exit_with_one_line(argv, match):
    settings = {"max_iters": 10, "compile": False, "out_dir": "out"}
    with pytest.raises(SystemExit) as info:  # sys.exit("error: ..."): Python prints the line, exit status 1
        apply_overrides(dict(settings), argv)
    message = str(info.value.code)
    assert message.startswith("error: ") and "\n" not in message and match in message, message


def dpo_config(*argv):
    """dpo.py's settings with argv applied, as the script has them when it checks them (configurator.defaults
    set, so options 'in use when set' are recognised)."""
    from test_configs import script_defaults
    return apply_overrides(script_defaults(os.path.join(REPO, "dpo.py")), list(argv))


@pytest.mark.parametrize("argv, match", [
    (["--loss_type=dpo+dpo"], "loss_type 'dpo+dpo' names a loss twice"),
    (["--loss_type=dpo+kto"], "kto learns from unpaired examples, it cannot join pairwise losses"),
    (["--loss_type=dpo+bco", "--loss_weights=1,x"], "loss_weights='1,x': expected numbers separated by commas"),
    (["--loss_type=dpo+bco", "--loss_weights=1,-1"], "weights must be finite, >= 0 and not all 0"),
    (["--loss_type=nca", "--label_smoothing=0.1"], "label_smoothing applies to dpo, robust, exo, aot and aot_unpaired"),
    (["--loss_type=dpo", "--discopop_tau=0.1"], "discopop_tau applies to discopop only, not 'dpo'"),
    (["--loss_type=dpo", "--bco_running_delta=False"], "bco_running_delta applies to bco only, not 'dpo'"),
    (["--loss_type=nca", "--f_divergence_type=js"], "f_divergence_type applies to dpo, dpo_norm, ipo, hinge"),
    (["--f_divergence_type=js_divergence"], "unknown f_divergence_type 'js_divergence' (TRL's 'js_divergence' is our"),
    (["--f_alpha_divergence_coef=0.3"], "f_alpha_divergence_coef applies to f_divergence_type='alpha' only"),
    (["--loss_type=ipo", "--ld_alpha=0.5"], "ld_alpha applies to every loss but dpo_norm, ipo"),
    (["--ld_alpha=0.5", "--rpo_alpha=1.0"], "ld_alpha with rpo_alpha: RPO's NLL would read the length-discounted"),
    (["--loss_type=simpo", "--ref_sync_steps=5"], "ref_sync_steps applies to every loss but simpo, orpo and sft"),
    (["--ref_sync_steps=5", "--reference_free=True"], "with reference_free there is no reference model to move"),
    (["--ref_mixup_alpha=0.5"], "ref_mixup_alpha applies only with ref_sync_steps > 0 (TR-DPO)"),
    (["--loss_type=sft", "--use_weighting=True"], "use_weighting applies to every loss but"),
], ids=lambda v: "_".join(a.split("=")[0].lstrip("-") for a in v) if isinstance(v, list) else None)
def test_loss_options_that_do_not_apply(argv, match):
    from losses import check_loss_options
    one_line_error(check_loss_options, dpo_config(*argv), match=match)


def test_loss_options_that_apply_pass():
    """The control: the same options where they apply raise nothing."""
    from losses import check_loss_options
    for argv in (["--loss_type=dpo+bco+sft", "--loss_weights=0.8,0.2,1.0", "--label_smoothing=0.1"],
                 ["--loss_type=discopop", "--discopop_tau=0.1", "--use_weighting=True", "--ld_alpha=0.5"],
                 ["--f_divergence_type=alpha", "--f_alpha_divergence_coef=0.3", "--ref_sync_steps=5",
                  "--ref_mixup_alpha=0.5"], ["--loss_type=bco", "--bco_running_delta=False"],
                 ["--loss_type=aot_unpaired", "--label_smoothing=0.1", "--precompute_ref=True"]):
        check_loss_options(dpo_config(*argv))


def test_text_file_as_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_text("this is not a checkpoint\n")
    one_line_error(checkpoint.load_checkpoint, str(path), match="could not be read: empty, cut short or not a")


def test_empty_checkpoint_file(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"")  # torch.load's error here has no message at all
    one_line_error(checkpoint.load_checkpoint, str(tmp_path / "ckpt.pt"), match="could not be read")


def test_gradient_accumulation_not_divisible_by_world_size():
    # what 2 processes under torchrun see (the scripts ask right after set-up, before any work)
    one_line_error(runtime.micro_batches, 5, 3, 2,
                   match="batch_size=5 x gradient_accumulation_steps=3 cannot be split evenly over 2 processes")
    # an even batch_size is shared out instead: no error from the split
    assert runtime.micro_batches(4, 3, 2) == (3, 2) and runtime.micro_batches(4, 2, 2) == (1, 4)


def test_unknown_device():
    one_line_error(runtime.setup, "cdua", "float32", 1, match="unknown device 'cdua'")


@pytest.fixture
def tiny_ckpt(tmp_path):
    write_training_checkpoint(tmp_path)
    return str(tmp_path / "ckpt.pt")


def test_checkpoint_of_another_format(tiny_ckpt):
    ckpt = torch.load(tiny_ckpt, weights_only=True)
    ckpt["format_version"] = 99
    torch.save(ckpt, tiny_ckpt)
    one_line_error(checkpoint.load_checkpoint, tiny_ckpt, match="has format 99, expected 1")


def test_state_dict_without_model_args(tiny_ckpt):
    torch.save(GPT(GPTConfig(**TINY)).state_dict(), tiny_ckpt)  # a bare state dict, not a checkpoint
    one_line_error(checkpoint.load_checkpoint, tiny_ckpt, match="is not a checkpoint of this code")


def test_checkpoint_with_missing_layers(tiny_ckpt):
    ckpt = checkpoint.load_checkpoint(tiny_ckpt)
    ckpt["model_args"]["n_layer"] = 2  # the weights hold one block
    one_line_error(checkpoint.model_from_checkpoint, ckpt, tiny_ckpt, match="missing keys ['transformer.h.1.attn.c_attn")


def test_checkpoint_without_training_state_cannot_resume(tiny_ckpt):
    ckpt = checkpoint.load_checkpoint(tiny_ckpt)
    del ckpt["optimizer"]  # e.g. a checkpoint converted from GPT-2 weights
    model = GPT(GPTConfig(**TINY))
    one_line_error(checkpoint.resume, tiny_ckpt, ckpt, model, None, None, None, runtime.SINGLE_PROCESS_CPU, 10,
                   match="has no 'optimizer'")


# -- rows: each bad row is named (source, row, key), or skipped and counted

@pytest.mark.parametrize("row, match", [
    ({"prompt": "1+1=", "chosen": "2"}, "row 1: missing key 'rejected'"),
    ({"prompt": "1+1=", "chosen": 2, "rejected": "3"}, "row 1: key 'chosen' should be a string, found int"),
    ({"prompt": None, "chosen": "2", "rejected": "3"}, "row 1: key 'prompt' should be a string, found NoneType"),
], ids=["missing_key", "int_response", "none_prompt"])
def test_bad_pair_row(byte_tok, row, match):
    good = {"prompt": "1+1=", "chosen": "2", "rejected": "3"}
    one_line_error(encode_pair_rows, [good, row], byte_tok, 32, source="pairs.jsonl", match=f"pairs.jsonl, {match}")


def test_bad_sft_row(byte_tok):
    one_line_error(encode_sft_rows, [{"prompt": "1+1=", "response": ["2"]}], byte_tok, 32,
                   match="key 'response' should be a string, found list")


def test_skipped_pairs_are_counted(byte_tok):
    rows = [{"prompt": "1+1=", "chosen": "2", "rejected": "3"},
            {"prompt": "1+1=", "chosen": "2", "rejected": "2"},          # no preference
            {"prompt": "1+1=", "chosen": "  ", "rejected": "3"},         # empty answer
            {"prompt": "", "chosen": "2", "rejected": "3"},              # empty prompt
            # block_size 8 = 9 tokens: the prompt keeps its last 4, the answers 5 each: "abcde" both
            {"prompt": "a long prompt=", "chosen": "abcdefX", "rejected": "abcdefY"}]
    out, skipped = encode_pair_rows(rows, byte_tok, block_size=8)
    assert out == [(byte_tok.encode("1+1="), byte_tok.encode("2") + [256], byte_tok.encode("3") + [256])]
    assert skipped.reasons == {"chosen == rejected": 1, "empty response": 1, "empty prompt": 1,
                               "chosen == rejected after truncation": 1}


def test_long_prompt_is_truncated_from_the_left(byte_tok):
    prompt = "x" * 50 + "12+34="
    out, skipped = encode_sft_rows([{"prompt": prompt, "response": "46"}], byte_tok, block_size=16)
    (p, r), = out
    assert skipped.total() == 0
    assert len(p) + len(r) <= 17 and r == byte_tok.encode("46") + [256]
    assert p == byte_tok.encode(prompt)[-len(p):] and byte_tok.decode(p).endswith("12+34=")


def test_lone_surrogates_encode_as_replacement_characters(byte_tok):
    # text decoded from invalid UTF-8 with errors='surrogateescape' holds lone surrogates: the byte tokenizer
    # encodes each as U+FFFD (EF BF BD) rather than failing
    text = b"a\xffb".decode("utf-8", errors="surrogateescape")
    assert byte_tok.encode(text) == [97, 0xEF, 0xBF, 0xBD, 98]


# -- data files (data.load_rows)

@pytest.mark.parametrize("content, match", [
    (b"", "is empty"),
    (b'{"prompt": "1+1=", "chosen": "2", "rejected": "3"}\n{"prompt": "a\xff\xfe", "chosen": "2", "rejected": "3"}\n',
     "is not UTF-8 text: invalid byte at offset 64"),  # = the index of \xff in these bytes
    (b'{"prompt": "1+1=", "chosen": "2", "rejected": "3"}\n{"prompt": "1+1=", "chosen": "2", "rej', "JSON"),
    (b'{"prompt": "1+1=", "chosen": "2", "rejected": "3"}\n{"prompt": "1+1=", "chosen": "", "rejected": "3"}\n',
     "row 1: key 'chosen' is an empty response"),
    (b'{"prompt": "1+1=", "chosen": "2", "rejected": "3"}\n{"prompt": "1+1=", "chosen": "2", "rejected": 3}\n',
     "key 'rejected' should be a string, found int"),
], ids=["empty_file", "invalid_utf8", "truncated_json", "empty_response", "mixed_types"])
def test_bad_data_file(tmp_path, content, match):
    if b"\xff" in content:
        assert content.index(b"\xff") == 64
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(content)
    one_line_error(load_rows, str(path), match=match)


def test_missing_data_file(tmp_path):
    one_line_error(load_rows, str(tmp_path / "nope.jsonl"), match="does not exist")


def test_bad_rows_skipped_and_counted(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}, {"prompt": "1+1=", "chosen": " ", "rejected": "3"},
            {"prompt": "2+2=", "chosen": "4", "rejected": None}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out, skipped = load_rows(str(path), skip_bad_rows=True)
    assert out == rows[:1]
    assert skipped.reasons == {"key 'chosen' is an empty response": 1, "key 'rejected' missing": 1}
