"""Run by tests/test_lora.py under `torchrun --nproc_per_node=2` (gloo, CPU): one DPO backward of a DDP-wrapped
tiny GPT, each rank on its own pairs, with and without activation checkpointing (whole blocks, and selective), for
full fine-tuning (reference: a frozen deep copy) and for LoRA (reference: the policy with its adapters off). Rank 0
writes, for each, the largest difference between the checkpointed and the plain all-reduced gradients, and whether
the ranks hold the same gradients (DDP synchronised them). Usage: torchrun ... ddp_checkpoint_grads.py OUT.json"""

import copy
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from logprobs import concatenated_logps  # noqa: E402
from nanopo.lora import AdaptersOff, apply_lora  # noqa: E402
from losses import dpo_loss  # noqa: E402
from model import GPT, GPTConfig, set_grad_checkpoint  # noqa: E402

torch.set_num_threads(1)
dist.init_process_group("gloo")
rank = dist.get_rank()
CONFIG = GPTConfig(block_size=32, vocab_size=258, n_layer=2, n_head=2, n_embd=32, dropout=0.1)


def pairs(seed):
    g = torch.Generator().manual_seed(seed)
    rand = lambda n: torch.randint(0, 256, (n,), generator=g).tolist()  # noqa: E731
    return [(rand(5 + i), rand(3 + i) + [256], rand(6 - i) + [256]) for i in range(4)]


def gradients(lora, grad_checkpoint):
    """{name: all-reduced gradient} of one DPO backward on this rank's pairs."""
    torch.manual_seed(0)
    policy = GPT(CONFIG)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    if lora:
        apply_lora(policy, rank=4, alpha=8.0, dropout=0.1)
        g = torch.Generator().manual_seed(1)
        for name, p in policy.named_parameters():
            if name.endswith("lora_B"):  # non-zero, so A's gradient is not zero as well
                p.data.copy_(0.1 * torch.randn(p.shape, generator=g))
        reference = AdaptersOff(policy)
    set_grad_checkpoint(policy, grad_checkpoint)
    ddp = torch.nn.parallel.DistributedDataParallel(policy)
    batch = pairs(100 + rank)
    layout = dict(pad_id=257, block_size=32, device="cpu")
    torch.manual_seed(10 + rank)  # the dropout masks: the same in both runs, different on each rank
    pc, pr, _, _ = concatenated_logps(ddp, batch, **layout)
    with torch.no_grad():
        rc, rr, _, _ = concatenated_logps(reference, batch, **layout)
    dpo_loss(pc, pr, rc, rr, beta=0.5)[0].backward()
    return {n: p.grad for n, p in policy.named_parameters() if p.requires_grad}


results = {}
for lora, mode in ((False, True), (True, True), (False, "selective"), (True, "selective")):
    plain, checkpointed = gradients(lora, False), gradients(lora, mode)
    assert plain.keys() == checkpointed.keys()
    gathered = [None, None]
    dist.all_gather_object(gathered, {n: g.tolist() for n, g in checkpointed.items()})
    results[("lora" if lora else "full") + ("_selective" if mode == "selective" else "")] = {
        "max_abs_diff": max((plain[n] - checkpointed[n]).abs().max().item() for n in plain),
        "grad_norm": torch.cat([g.flatten() for g in plain.values()]).norm().item(),
        "n_tensors": len(plain),
        "ranks_agree": gathered[0] == gathered[1],
    }
if rank == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(results, f)
# leave as runtime.cleanup does: rank 0's file is written, then out without the interpreter's teardown, where a
# loaded machine can abort a gloo process ("terminate called without an active exception", SIGABRT)
dist.barrier()
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)
