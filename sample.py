"""
Print the policy's and the reference's completions side by side for a few prompts.

$ python sample.py                # out/dpo/ckpt.pt vs the SFT checkpoint it started from
$ python sample.py --ckpt=out/ipo/ckpt.pt --temperature=1.0 --num_samples=3
$ python sample.py --prompts="12+34=|99+99=" --ckpt=out/dpo/ckpt.pt
$ python sample.py --prompt_file=prompts.txt   # one prompt per line (\n inside a line: a newline)
Without prompts it takes the first n_prompts held-out problems of the embedded task and marks each
answer.
"""

from configurator import UserError, apply_overrides, install_error_handler
from data import Tokenizer
from nanopo import runtime
from nanopo.checkpoint import load_checkpoint, model_from_checkpoint
from nanopo.tasks import AdditionTask

# bad input ends the run with one line, not a traceback
install_error_handler()

ckpt = "out/dpo/ckpt.pt"  # the policy
ref_ckpt = ""             # '' = the SFT checkpoint named in ckpt's config
prompts = ""              # prompts separated by '|'
prompt_file = ""
n_prompts = 8
num_samples = 1           # completions per prompt and model
temperature = 0.0         # 0 = greedy
top_k = 0                 # 0 = no top-k filter
max_new_tokens = 64
seed = 1
device = "auto"
config = apply_overrides(globals())

rt = runtime.setup(device, "auto", seed)
REF_HINT = "pass the SFT checkpoint as --ref_ckpt=..."
policy_ckpt = load_checkpoint(ckpt, missing_hint="train one with dpo.py, or pass --ckpt=...")
tok = Tokenizer(policy_ckpt["tokenizer"])
ref_path = ref_ckpt or policy_ckpt["config"].get("sft_ckpt")
if not ref_path:
    raise UserError(f"{ckpt} names no SFT checkpoint: pass --ref_ckpt=...")
reference_ckpt = load_checkpoint(ref_path, tok.name, missing_hint=REF_HINT)
models = {"policy": model_from_checkpoint(policy_ckpt, ckpt, dropout=0.0),
          "reference": model_from_checkpoint(reference_ckpt, ref_path, dropout=0.0)}
task = None
if prompt_file:
    try:
        with open(prompt_file, encoding="utf-8") as f:
            prompt_list = [line.rstrip("\n").replace("\\n", "\n") for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"prompt file {prompt_file}: {e}")
elif prompts:
    prompt_list = prompts.split("|")
else:
    # held-out problems of the embedded task, settings from the SFT run that made the reference
    sft_config = reference_ckpt["config"]
    task = AdditionTask(sft_config.get("n_digits", 2), sft_config.get("n_eval", 1000),
                        sft_config.get("task_seed", 1234))
    prompt_list = task.eval_prompts[:n_prompts]

import torch  # noqa: E402  (after the config, like nanoGPT's sample.py)

generator = torch.Generator(device=rt.device).manual_seed(seed)
outputs = {}
for name, model in models.items():
    model.to(rt.device).eval()
    outputs[name] = []
    for p in prompt_list:
        with rt.autocast():
            completions = model.generate([tok.encode(p)] * num_samples, max_new_tokens, tok.eos_id,
                                         tok.pad_id, temperature=temperature, top_k=top_k or None,
                                         generator=generator)
        outputs[name].append([tok.decode(o) for o in completions])


def show(prompt, text):
    """A completion as Python writes it (so whitespace shows), marked against the task if any."""
    if task is None:
        return repr(text)
    if task.is_correct(prompt, text):
        return repr(text) + "  ok"
    return repr(text) + "  wrong"


ref_head = f"reference ({ref_path})"
width = len(ref_head)
for prompt, outs in zip(prompt_list, outputs["reference"]):
    for text in outs:
        width = max(width, len(show(prompt, text)))
width += 2
print(f"{'prompt':<16}{ref_head:<{width}}policy ({ckpt})")
for i, prompt in enumerate(prompt_list):
    for j in range(num_samples):
        head = ""
        if j == 0:
            head = repr(prompt)
        reference = show(prompt, outputs["reference"][i][j])
        policy = show(prompt, outputs["policy"][i][j])
        print(f"{head:<16}{reference:<{width}}{policy}")
