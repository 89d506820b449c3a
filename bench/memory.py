"""
Memory benchmark (`python -m bench.step_time --memory=True`, which runs this file): the peak memory
and the time per pair of one live DPO step, for four kinds of run on the same model and batch (and
a fifth that splits the activations):

  full        every weight trains (AdamW state for all), the reference a frozen deep copy      (dpo.py's default)
  full_ckpt   the same with activation checkpointing (--grad_checkpoint)
  lora        LoRA adapters train (lora.py, --lora_rank), the reference is the policy with its adapters off
  lora_ckpt   LoRA with activation checkpointing
  head        no transformer blocks (n_layer=0), full fine-tuning: the embeddings, the LM head and the log-probs
              alone, whose activations the other kinds' minus give the blocks' (what checkpointing acts on)

Each kind runs in a fresh process (bench/step_time.py starts one per kind), so one kind's freed
memory cannot hide another's peak. A step is what dpo.py runs: the policy's concatenated forward
(logprobs.concatenated_logps), the reference's under no_grad (run first), losses.dpo_loss,
backward, clipping, AdamW. Measured, per kind:

  peak        the process's peak memory: on a CPU its peak RSS (ru_maxrss), on CUDA max_memory_allocated
  above start the peak minus the memory at start (CPU: the RSS of Python + torch after a toy model's step, before
              this kind's model exists)
  activations the first full-size forward + backward's peak over the memory just before it, with the gradients
              already allocated (so it is the activations and the backward's temporaries alone)
  ms/pair     the median over the timed steps (after one warm-up step), per pair

and predicted from the parameter and activation counts (float32 bytes): weights 4N; the deep-copied reference 4N;
gradients 4 per trained parameter and AdamW's two moments 8; activations per token 4 x (16 n_embd per block, as
autograd saves them: LayerNorm inputs, q/k/v, attention output, MLP inputs and GELU input; with checkpointing
n_embd per block plus one block recomputed at a time) + 4 x 3 vocab_size (the policy's log-softmax kept for
backward, and two more (rows, T, vocab) tensors at the peak: the reference's logits and log-softmax, or the
backward's gradients of them; with --logprobs=chunked, 4 x 2 x chunk x vocab_size in all instead: a chunk's
logits and a temporary of them). The peak is predicted as the forward/backward of a step after the first, where
everything is alive at once: weights, reference, AdamW's state (allocated by the first step, kept for the whole
run), gradients and activations.

Checkpointing recomputes the blocks, not the LM head: at GPT-2's 50,304-token vocabulary the (rows, T, vocab)
float32 logits and log-softmax weigh as much as all twelve blocks' activations, so the floor "checkpointing
halves the activations" is checked on the blocks' part (all activations minus the head kind's) and reported on
all of them too; chunked log-probs, which never hold the whole (rows, T, vocab) tensor, shrink the head's part.

$ python -m bench.step_time --memory=True --size=tiny                     # seconds: checks that it runs
$ python -m bench.step_time --memory=True --size=gpt2                     # GPT-2 124M shape, 2 pairs of 64 + 64 tokens
$ python -m bench.step_time --memory=True --size=gpt2-medium              # 24 layers, 1024 wide (355M)
$ python -m bench.step_time --memory=True --size=gpt2 --device=cuda       # on a GPU: bf16 autocast, max_memory_allocated
$ python -m bench.step_time --memory=True --size=gpt2 --logprobs=chunked  # chunked log-probs (the scripts' default at GPT-2)
"""

import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

KINDS = ["full", "full_ckpt", "lora", "lora_ckpt", "head"]
BATCH = (2, 64, 64)  # default pairs, prompt and response tokens: a small batch, so the weights and optimizer
#                      state (what LoRA saves) and the activations (what checkpointing saves) both show


def rss_bytes():
    """This process's resident memory now (Linux /proc; elsewhere its peak so far, the best there is)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return peak_rss_bytes()


def peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if platform.system() == "Darwin" else 1024)


def lora_parameter_count(n_layer, n_embd, rank):
    """rank * (in + out) for the four projections of a block: c_attn (C -> 3C), c_proj (C -> C), c_fc (C -> 4C),
    mlp c_proj (4C -> C)."""
    return n_layer * rank * (4 * n_embd + 2 * n_embd + 5 * n_embd + 5 * n_embd)


def predict(kind, shape, n_params, tokens, rank, logprobs="plain", chunk=1024):
    """Predicted memory in bytes (see the docstring): the parts, and the peak."""
    n_layer, n_embd, vocab = (0 if kind == "head" else shape["n_layer"]), shape["n_embd"], shape["vocab_size"]
    lora = kind.startswith("lora")
    n_lora = lora_parameter_count(n_layer, n_embd, rank) if lora else 0
    trained = n_lora if lora else n_params
    per_block = n_embd if kind.endswith("ckpt") else 16 * n_embd
    recompute = 16 * n_embd if kind.endswith("ckpt") else 0
    parts = {"weights": 4 * (n_params + n_lora), "reference": 0 if lora else 4 * n_params,
             "gradients": 4 * trained, "adamw": 8 * trained,
             "activations": 4 * tokens * (n_layer * per_block + recompute)
             + (4 * tokens * 3 * vocab if logprobs == "plain" else 4 * 2 * min(chunk, tokens) * vocab)}
    return parts, sum(parts.values())  # a later step's backward: AdamW's state outlives the step that made it


def child(kind, settings):
    """One kind, in this (fresh) process: build, measure, print one JSON line."""
    from nanopo import runtime
    from logprobs import concatenated_logps
    from nanopo.lora import AdaptersOff, apply_lora
    from losses import dpo_loss
    from model import GPT, GPTConfig, set_grad_checkpoint
    from nanopo.runtime import configure_optimizer

    rt = runtime.setup(settings["device"], settings["dtype"], seed=1)
    cuda = rt.device_type == "cuda"
    # a step of a toy model first, so that what any first step allocates once (thread pools, kernels' caches)
    # counts as the start, not as this kind's memory
    toy = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=1, n_embd=8)).to(rt.device)
    with rt.autocast():
        logps = concatenated_logps(toy, [([1, 2], [3, 4], [5, 4])], pad_id=15, block_size=8, device=rt.device)
    (logps[0] - logps[1]).sum().backward()
    configure_optimizer(toy, 0.0, 1e-5, (0.9, 0.99), rt.device_type).step()
    del toy, logps
    start = torch.cuda.memory_allocated() if cuda else rss_bytes()
    shape, (B, P, R) = settings["shape"], settings["batch"]
    policy = GPT(GPTConfig(dropout=0.0, **dict(shape, n_layer=0 if kind == "head" else shape["n_layer"])))
    policy = policy.to(rt.device)
    if kind.startswith("lora"):
        apply_lora(policy, settings["lora_rank"], alpha=16.0)  # (alpha does not change memory)
        reference = AdaptersOff(policy)
    else:
        reference = copy.deepcopy(policy).eval().requires_grad_(False)
    set_grad_checkpoint(policy, kind.endswith("ckpt"))
    optimizer = configure_optimizer(policy, 0.0, 1e-5, (0.9, 0.99), rt.device_type)
    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(0, shape["vocab_size"] - 2, (n,), generator=g).tolist()  # noqa: E731
    eos, pad = shape["vocab_size"] - 2, shape["vocab_size"] - 1
    pairs = [(rand(P), rand(R - 1) + [eos], rand(R - 1) + [eos]) for _ in range(B)]
    layout = dict(pad_id=pad, block_size=shape["block_size"], device=rt.device, logprobs=settings["logprobs"],
                  chunk=settings["chunk"])

    def forward_backward(batch=pairs):
        with rt.autocast():
            with torch.no_grad():  # the reference first, as dpo.py runs it
                rc, rr, _, _ = concatenated_logps(reference, batch, **layout)
            pc, pr, _, _ = concatenated_logps(policy, batch, **layout)
            loss = dpo_loss(pc, pr, rc, rr, settings["beta"])[0]
        loss.backward()

    def step():
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # the first full-size forward + backward, with the gradients allocated up front: its peak over this point is
    # the activations' (a fresh process: nothing before went this high). Before it, one pair of a few tokens
    # runs every op once, so the one-time allocations of the first call (kernels' caches, threads) are not counted
    forward_backward([(p[:4], c[-2:], r[-2:]) for p, c, r in pairs[:1]])
    for p in policy.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cuda else rss_bytes()
    forward_backward()
    activations = (torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()) - before
    step()  # this warm-up step also allocates AdamW's state
    times = []
    for _ in range(settings["steps"]):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        forward_backward()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000)
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()
    print(json.dumps({"kind": kind, "start": start, "peak": peak, "above_start": peak - start,
                      "activations": activations, "ms_per_pair": statistics.median(times) / B,
                      "trained": sum(p.numel() for p in policy.parameters() if p.requires_grad),
                      "n_params": sum(p.numel() for p in policy.parameters()), "device": rt.device,
                      "dtype": rt.dtype, "threads": torch.get_num_threads()}))


def main(config, shape, overridden):
    """python -m bench.step_time --memory=True: one fresh process per kind, then the table, the
    predictions and the floors."""
    B, P, R = (config[k] if k in overridden else d for k, d in zip(("batch_size", "prompt_len", "response_len"),
                                                                    BATCH))
    shape = dict(shape, block_size=max(shape["block_size"], P + R - 1))
    settings = {"shape": shape, "batch": (B, P, R), "lora_rank": config["lora_rank"], "beta": config["beta"],
                "logprobs": config["logprobs"], "chunk": config["logprob_chunk"],
                "device": config["device"], "dtype": config["dtype"],
                "steps": config["steps"] if "steps" in overridden else 2}
    tokens = 2 * B * (P + R - 1)
    print(f"memory, {config['size']} shape (n_layer={shape['n_layer']}, n_embd={shape['n_embd']}, vocab="
          f"{shape['vocab_size']}): one live DPO step on {B} pairs of {P} prompt + {R} response tokens "
          f"({2 * B} rows, {tokens} tokens); LoRA rank {config['lora_rank']} on all four projections; "
          f"{config['logprobs']} log-probs; {settings['steps']} timed steps after 1 warm-up, each kind in a fresh "
          "process")
    results = {}
    for kind in KINDS:
        proc = subprocess.run([sys.executable, "-m", "bench.memory", kind, json.dumps(settings)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"error: the '{kind}' process failed: {proc.stderr.strip().splitlines()[-1:]}")
        results[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
    n_params, mb = results["full"]["n_params"], 1 / 2 ** 20
    print(f"{results['full']['device']} {results['full']['dtype']}, {results['full']['threads']} threads; "
          f"{n_params / 1e6:.1f}M parameters, {results['lora']['trained']:,} in the adapters")
    print(f"{'kind':<11}{'peak MB':>9}{'above start':>12}{'predicted':>10}{'activations':>12}{'predicted':>10}"
          f"{'blocks':>8}{'ms/pair':>9}   predicted parts (MB): weights, reference, gradients, AdamW")
    for kind, r in results.items():
        base = results["head" if kind == "head" else "full"]["n_params"]  # (without the adapters)
        parts, peak = predict(kind, shape, base, tokens, config["lora_rank"], config["logprobs"],
                              config["logprob_chunk"])
        r["predicted"] = {k: v * mb for k, v in dict(parts, peak=peak).items()}
        r["blocks"] = r["activations"] - results["head"]["activations"]  # the blocks' share of the activations
        print(f"{kind:<11}{r['peak'] * mb:>9,.0f}{r['above_start'] * mb:>12,.0f}{peak * mb:>10,.0f}"
              f"{r['activations'] * mb:>12,.0f}{parts['activations'] * mb:>10,.0f}{r['blocks'] * mb:>8,.0f}"
              f"{r['ms_per_pair']:>9,.0f}   "
              + ", ".join(f"{parts[k] * mb:,.0f}" for k in ("weights", "reference", "gradients", "adamw")))
    lora_ratio = results["lora"]["above_start"] / results["full"]["above_start"]
    floors = {"lora peak / full peak (above start) <= 0.6": lora_ratio}
    for k in ("full", "lora"):
        floors[f"{k}: checkpointed / plain activations of the blocks <= 0.5"] = \
            results[f"{k}_ckpt"]["blocks"] / results[k]["blocks"]
        floors[f"{k}: checkpointed / plain activations, all (LM head included) <= 0.5"] = \
            results[f"{k}_ckpt"]["activations"] / results[k]["activations"]
    floors = {k: (v, v <= (0.6 if k.startswith("lora peak") else 0.5)) for k, v in floors.items()}
    print("floors (meant for the gpt2 shape):\n" + "\n".join(f"  {k}: {v:.2f} {'ok' if ok else 'MISSED'}"
                                                             for k, (v, ok) in floors.items()))
    out = config["out"] if "out" in overridden else f"out/bench_memory_{config['size']}_{config['logprobs']}.json"
    if out:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "w") as f:
            json.dump({"config": config, "shape": shape, "batch": [B, P, R], "tokens": tokens, "kinds": results,
                       "floors": {k: {"value": v, "ok": ok} for k, (v, ok) in floors.items()}}, f, indent=2)
        print(f"wrote {out}")


if __name__ == "__main__":
    child(sys.argv[1], json.loads(sys.argv[2]))
