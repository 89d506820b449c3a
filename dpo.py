"""
Preference optimisation: load the SFT checkpoint into the policy, deep-copy it into a frozen reference, build
preference pairs (on the embedded task: the verified answer above the SFT model's own mistakes) and train the
policy with the loss chosen by --loss_type.

$ python dpo.py                                   # DPO on the embedded task, from out/sft/ckpt.pt
$ python dpo.py --beta=0.5 --out_dir=out/dpo_b05  # any setting below can be overridden
$ python dpo.py --loss_type=sft                   # baseline: continued SFT on the chosen answers only
$ torchrun --standalone --nproc_per_node=2 dpo.py # DDP; the global batch stays the same
"""

import copy
import os
import time

import torch

import common
from configurator import apply_overrides
from data import BatchOrder, AdditionTask, Tokenizer, UserError, collate_pairs, encode_pair_rows
from losses import dpo_loss, sequence_logprobs, sft_loss
from model import logprobs_from_logits

# -----------------------------------------------------------------------------------------------------------
# default config: the embedded task's recipe, well under a minute on a 2-core CPU
out_dir = "out/dpo"
sft_ckpt = "out/sft/ckpt.pt"
seed = 1
device = "auto"
dtype = "auto"
compile = False
eval_interval = 50
log_interval = 10
# the objective
loss_type = "dpo"         # 'dpo', or 'sft' (NLL of the chosen answers: the continued-SFT baseline)
beta = 0.1                # DPO's KL strength: larger = stay closer to the reference
label_smoothing = 0.0     # > 0: conservative DPO (the assumed probability that a label is flipped)
# preference pairs from the embedded task (task settings come from the SFT checkpoint's config)
n_pairs = 2000            # training prompts that get a pair
n_samples = 2             # samples per prompt (temperature below) looked at when the greedy answer is right
sample_temperature = 1.0
# optimisation
batch_size = 64           # pairs per micro-batch
gradient_accumulation_steps = 1
max_iters = 100
learning_rate = 5e-5
min_lr = 5e-5
warmup_iters = 0
lr_decay_iters = 0
decay_lr = False          # DPO's usual recipe: a small constant learning rate
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0
max_nonfinite = 5
# -----------------------------------------------------------------------------------------------------------
config = apply_overrides(globals())
# -----------------------------------------------------------------------------------------------------------
LOSS_TYPES = ("dpo", "sft")
if loss_type not in LOSS_TYPES:
    raise UserError(f"unknown loss_type '{loss_type}': expected one of {', '.join(LOSS_TYPES)}")

t_start = time.time()
rt = common.setup_runtime(device, dtype, seed)
ckpt = common.load_checkpoint(sft_ckpt)
sft_config = ckpt["config"]
tok = Tokenizer(ckpt["tokenizer"])

# the policy starts as the SFT model; dropout off, so log-probs are deterministic and the reference matches it
policy = common.model_from_checkpoint(ckpt, sft_ckpt, dropout=0.0).to(rt.device)
needs_reference = loss_type == "dpo"
reference = None
if needs_reference:
    reference = copy.deepcopy(policy)
    reference.eval()
    reference.requires_grad_(False)
block_size = policy.config.block_size
task = AdditionTask(sft_config["n_digits"], sft_config["n_eval"], sft_config["task_seed"])


# pairs: the verified answer (chosen) over the SFT model's own mistake (rejected), where it makes one
def generate_fn(prompts, temperature, _g=torch.Generator(device=rt.device).manual_seed(seed)):
    policy.eval()
    outs = []
    for i in range(0, len(prompts), 500):
        with rt.autocast():
            outs += policy.generate([tok.encode(p) for p in prompts[i:i + 500]], 8, tok.eos_id, tok.pad_id,
                                    temperature=temperature, generator=_g)
    policy.train()
    return [tok.decode(o) for o in outs]


rows, sources = task.build_pairs(generate_fn, n_pairs, n_samples, sample_temperature, seed)
train_data, skipped = encode_pair_rows(rows, tok, block_size, source="embedded task pairs")
if rt.master:
    print(f"pairs: {len(train_data)} (rejected from: {sources['greedy']} greedy mistakes, {sources['sampled']} "
          f"sampled mistakes, {sources['corruption']} corruptions), skipped: {skipped}")

optimizer = common.configure_optimizer(policy, weight_decay, learning_rate, (beta1, beta2), rt.device_type)
train_model = torch.compile(policy) if compile else policy
ref_model = torch.compile(reference) if compile and reference is not None else reference
if rt.ddp:  # only the policy is wrapped: the reference has no gradients to sync
    train_model = torch.nn.parallel.DistributedDataParallel(
        train_model, device_ids=[rt.local_rank] if rt.device_type == "cuda" else None)
order = BatchOrder(len(train_data), seed)


def make_batch(indices):
    pairs = [train_data[i] for i in indices]
    idx, targets, mask = collate_pairs(pairs, tok.pad_id)  # (2B, T): chosen rows, then rejected rows
    n_tokens = sum(len(p) + len(c) - 1 + len(p) + len(r) - 1 for p, c, r in pairs)
    return {"idx": idx.to(rt.device), "targets": targets.to(rt.device), "mask": mask.to(rt.device),
            "n_tokens": n_tokens}


def concatenated_logps(model, batch):
    """One forward over chosen and rejected together -> summed log-probs and token counts, each split (B,)."""
    logits, _ = model(batch["idx"])
    logps, n_tokens = sequence_logprobs(logprobs_from_logits(logits, batch["targets"]), batch["mask"])
    B = logps.size(0) // 2
    return logps[:B], logps[B:], n_tokens[:B], n_tokens[B:]


def compute_loss(batch):
    policy_chosen_logps, policy_rejected_logps, chosen_n, _ = concatenated_logps(train_model, batch)
    metrics = {"logps/chosen": policy_chosen_logps.detach().mean(),
               "logps/rejected": policy_rejected_logps.detach().mean()}
    if loss_type == "sft":
        return sft_loss(policy_chosen_logps, chosen_n), metrics
    with torch.no_grad():
        ref_chosen_logps, ref_rejected_logps, _, _ = concatenated_logps(ref_model, batch)
    loss, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen_logps, policy_rejected_logps,
                                                      ref_chosen_logps, ref_rejected_logps, beta, label_smoothing)
    metrics.update({"rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
                    "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
                    "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean()})
    return loss, metrics


def describe(r):
    if "rewards/margins" not in r:
        return ""
    return (f", rewards/chosen {r['rewards/chosen']:+.3f}, rewards/rejected {r['rewards/rejected']:+.3f}, "
            f"margins {r['rewards/margins']:+.3f}, accuracies {r['rewards/accuracies']:.2f}")


def evaluate():
    return {"task_accuracy": common.evaluate_task(policy, task, tok, rt)}


def save(iter_num, results):
    if rt.master:
        path = os.path.join(out_dir, "ckpt.pt")
        common.save_checkpoint(path, policy, config, tok.name, iter_num=iter_num, sft_ckpt=sft_ckpt, **results)
        print(f"saved {path}")


logger = common.MetricLogger(out_dir, rt)
start_accuracy = ckpt.get("task_accuracy")
results = common.train_loop(rt, train_model, optimizer, config, order, make_batch, compute_loss, evaluate, save,
                            logger, describe)
if rt.master:
    start = f"{start_accuracy:.1%}" if start_accuracy is not None else "?"
    print(f"{loss_type.upper()} done: held-out task_accuracy {start} (SFT) -> {results['task_accuracy']:.1%} "
          f"in {time.time() - t_start:.0f} s -> {os.path.join(out_dir, 'ckpt.pt')}")
common.cleanup(rt)
