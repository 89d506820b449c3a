"""
A self-contained GPT, readable top to bottom, in the spirit of nanoGPT's model.py and in its
order: GPTConfig, CausalSelfAttention, MLP, Block, GPT. After that core come the extras, each under
its own header: the KV cache, the FlexAttention helpers, packed rows' attention on a CPU, the
chunked target log-probs and activation checkpointing.

It keeps GPT-2's parameter layout (transformer.wte / wpe / h.N.{ln_1, attn.c_attn, attn.c_proj,
ln_2, mlp.c_fc, mlp.c_proj} / ln_f, and an lm_head tied to wte), so GPT-2 weights can be mapped in
one-to-one.

GPT.forward returns one tensor. By default that is the logits; with `score` it is the log-probs of
given target tokens, which is what preference optimisation needs (logprobs.py sums them per
response). Beyond nanoGPT the model offers:
  - optional position ids and attention masks, so left-padded batches, prefix-shared sequences
    and packed rows work;
  - the scoring head (`score`): the LM head runs only at the positions whose next token is scored,
    and `target_logps` turns their hidden states into log p(target) a chunk of rows at a time, so no
    (rows x T x vocab) logits are ever held;
  - batched generation from prompts of different lengths (greedy, or temperature / top-k sampling)
    that stops each row at EOS, with a KV cache so each new token runs through the model once.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
    noop_context_fn,
)

# FlexAttention (torch >= 2.5): block-sparse masks that keep a fused kernel. It is optional, so an
# older torch still runs everything else.
try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:
    BlockMask = None
    create_block_mask = None
    flex_attention = None


@dataclass
class GPTConfig:
    """The model's shape; the names are nanoGPT's, so `--n_layer=2` works on the command line."""
    block_size: int = 64      # longest sequence the position table covers
    vocab_size: int = 258     # the byte tokenizer's 256 bytes + <|endoftext|> + <|pad|>
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True         # GPT-2 has biases in Linear and LayerNorm


class CausalSelfAttention(nn.Module):

    def __init__(self, config, layer_idx=0):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        # q, k, v in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.layer_idx = layer_idx  # which slot of a KVCache is this layer's

    def forward(self, x, attn_mask=None, cache=None):
        B, T, C = x.size()
        qkv = self.c_attn(x)
        dropout_p = self.dropout if self.training else 0.0
        if isinstance(attn_mask, Segments):
            # packed rows (data.pack, --packing): each segment attends within itself only
            y = attn_mask.attend(qkv, self.n_head, dropout_p)
            return self.resid_dropout(self.c_proj(y))
        q, k, v = qkv.split(self.n_embd, dim=2)
        # (B, T, C) -> (B, n_head, T, head_size)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if cache is not None:
            # generation: the new tokens attend to the cached ones too; k, v become
            # (B, n_head, tokens so far, head_size)
            k, v = cache.append(self.layer_idx, k, v)
        if attn_mask is None:
            # The common case: plain causal attention, which lets SDPA pick its fastest kernel. A
            # single query (one new token after cached ones) sees every key: is_causal would align
            # it with the first key only.
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=T > 1)
        elif BlockMask is not None and isinstance(attn_mask, BlockMask):
            # FlexAttention (no dropout)
            y = flex(q, k, v, attn_mask)
        else:
            # attn_mask: bool (B or 1, 1, T, S), True = may attend (S = T, or the tokens so far with
            # a cache). The caller builds causality into it.
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        # GPT-2's tanh-approximate GELU as one fused op (written out by hand it costs ~4x on CPU)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config, layer_idx=0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)
        # set_grad_checkpoint: False, True (whole block) or 'selective'
        self.grad_checkpoint = False

    def forward(self, x, attn_mask=None, cache=None):
        if self.grad_checkpoint and torch.is_grad_enabled() and cache is None:
            # Activation checkpointing: keep only the block's input; backward runs the block again
            # to get what it would have saved. Non-reentrant: correct when no input requires grad
            # (frozen embeddings under LoRA), under DDP, and it restores the RNG so dropout draws
            # the same masks the second time. 'selective': the matmuls' and attention's outputs are
            # kept too, so the second run only redoes the cheap ops (LayerNorm, GELU, adds,
            # dropout): 11/16 of the memory for 0.5-3% more time, not ~1/3.
            context = noop_context_fn
            if self.grad_checkpoint == "selective":
                context = selective_context
            return checkpoint(self.layers, x, attn_mask, use_reentrant=False, context_fn=context)
        return self.layers(x, attn_mask, cache)

    def layers(self, x, attn_mask=None, cache=None):
        """The block itself, pre-norm residual: what checkpointing recomputes in backward."""
        x = x + self.attn(self.ln_1(x), attn_mask, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying (GPT-2 does it): the output projection is the token embedding
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections keeps the residual stream's variance flat
        # in depth
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True):
        """Parameter count; the position table is left out by default, as in nanoGPT (the token
        table is shared with lm_head and so is counted)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, T, train=True):
        """Model FLOPs per token of a length-T row, as nanoGPT counts them: 6N + 12*L*H*Q*T for
        forward and backward (N parameters without the position table, Q the head size), a third of
        that forward only. A frozen parameter (LoRA's base weights) costs 4 per token, not 6:
        backward needs the gradient of its input, not of itself. Recomputation (activation
        checkpointing) is not counted: these are model FLOPs."""
        cfg = self.config
        head_size = cfg.n_embd // cfg.n_head
        forward = 2 * self.get_num_params() + 4 * cfg.n_layer * cfg.n_head * head_size * T
        frozen = 0
        for n, p in self.named_parameters():
            if not p.requires_grad and n != "transformer.wpe.weight":
                frozen += p.numel()
        if train:
            return 3 * forward - 2 * frozen
        return forward

    def forward(self, idx, pos=None, attn_mask=None, cache=None, last_only=False, score=None,
                chunk=1024):
        """The trunk (hidden_states), then one of two heads. Returns a single tensor:
          - score=None: the logits (B, T, V), or (B, 1, V) with last_only (self.logits);
          - score=(cols, targets), both (B, K) long: float32 log-probs (B, K), logps[b, k] =
            log p(targets[b, k]) as predicted at column cols[b, k] of row b, without the (B, T, V)
            logits (self.scored_logps; `chunk` rows of logits at a time, 0 = all at once).

        idx: (B, T) token ids. pos: (B, T) or (T,) position ids, default 0..T-1.
        attn_mask: None for causal attention, bool (B, 1, T, T) with True = may attend, a
        FlexAttention BlockMask (model.block_mask, model.document_block_mask), or the Segments of
        packed rows. cache: a KVCache (generation): idx are the
        tokens after the cached ones, either all of the first ones or one at a time, and attn_mask,
        if any, is (B, 1, T, cached + T).

        Scoring has its own method but must still be reached through forward, because the wrappers
        training uses see forward only: DDP prepares its gradient all-reduce in forward, FSDP2
        all-gathers the sharded weights (lm_head.weight included) in hooks around forward, and
        torch.compile compiles forward. A direct call of scored_logps would skip all three."""
        x = self.hidden_states(idx, pos, attn_mask, cache)
        if score is None:
            return self.logits(x, last_only)
        cols, targets = score
        return self.scored_logps(x, cols, targets, chunk)

    def hidden_states(self, idx, pos=None, attn_mask=None, cache=None):
        """The trunk: embeddings and the blocks, ids (B, T) -> hidden states (B, T, C), before
        ln_f."""
        B, T = idx.size()
        start = 0
        if cache is not None:
            start = cache.filled
            # after the first call (the prompts), a KV cache takes one new token at a time
            assert start == 0 or T == 1, "a KV cache takes one new token at a time"
        # Only default positions are checked against block_size: a packed, prefix-shared row may be
        # longer than block_size, its positions are not.
        if pos is None:
            end = start + T
            block_size = self.config.block_size
            assert end <= block_size, f"{end} tokens > block_size {block_size}"
            pos = torch.arange(start, end, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x, attn_mask, cache)
        # advanced here, after every layer has appended its keys and values
        if cache is not None:
            cache.filled += T
        return x

    def logits(self, x, last_only=False):
        """The LM head: hidden states (B, T, C) -> logits (B, T, V), or (B, 1, V) with last_only."""
        x = self.transformer.ln_f(x)
        # generation only needs the next token: skip T-1 rows of the lm_head matmul
        if last_only:
            x = x[:, [-1], :]
        return self.lm_head(x)

    def scored_logps(self, x, cols, targets, chunk=1024):
        """The scoring head: hidden states (B, T, C) -> log p(targets[b, k]) at column cols[b, k],
        (B, K) float32. Only those B*K positions go through ln_f and the LM head."""
        B = x.size(0)
        rows = torch.arange(B, device=x.device)[:, None]  # (B, 1)
        # (B, K, C): row b's hidden states at its columns cols[b]
        h = self.transformer.ln_f(x[rows, cols])
        # chunk=0: all K columns' logits at once, as plain autograd keeps them for backward. Faster
        # (no logits made twice) for O(B*K*V) memory.
        if chunk == 0:
            logits = self.lm_head(h).float()  # (B, K, V)
            return torch.gather(logits.log_softmax(-1), 2, targets[..., None])[..., 0]
        # (B*K,)
        logps = target_logps(h.flatten(0, 1), self.lm_head.weight, targets.flatten(), chunk)
        return logps.view(targets.shape)

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, eos_id, pad_id, temperature=0.0, top_k=None,
                 generator=None, use_cache=True):
        """Continue each prompt (a list of token-id lists, lengths may differ) until EOS or
        max_new_tokens. temperature 0 is greedy; otherwise sample from
        softmax(logits / temperature), restricted to the top_k tokens when given. Returns a list of
        generated id lists, EOS excluded.
        Prompts are left-padded so every row's next token sits in the last
        column; padding is kept out of attention by a mask and position ids count real tokens only,
        so a row's output does not depend on what else is in the batch. With use_cache the prompts
        run once and each new token then runs alone against a KVCache; without it, and once a row
        would pass block_size, every step re-runs the last block_size tokens, as nanoGPT's generate
        does (the only way past block_size with learned positions)."""
        device = self.transformer.wte.weight.device
        block_size = self.config.block_size
        B, L = len(prompts), max(len(p) for p in prompts)
        idx = torch.full((B, L), pad_id, dtype=torch.long, device=device)
        # True where a real token sits
        real = torch.zeros((B, L), dtype=torch.bool, device=device)
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"generate: prompt {i} is empty")
            idx[i, L - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
            real[i, L - len(p):] = True
        done = torch.zeros(B, dtype=torch.bool, device=device)
        cache = None
        if use_cache:
            cache = KVCache(self.config.n_layer, min(L + max_new_tokens, block_size))
        for step in range(max_new_tokens):
            # a full cache: from here on a sliding window
            if cache is not None and idx.size(1) > block_size:
                cache = None
            if cache is not None and step > 0:
                # only the newest token runs; it attends to every real token before it (and to
                # itself)
                idx_cond = idx[:, -1:]
                # (B, 1): the number of real tokens before it
                pos = (real.long().sum(1, keepdim=True) - 1).clamp(min=0)
                mask = real[:, None, None, :]  # (B, 1, 1, tokens so far)
            else:
                # the whole sequence (its last block_size tokens)
                idx_cond, real_cond = idx[:, -block_size:], real[:, -block_size:]
                T = idx_cond.size(1)
                if real_cond.all():
                    pos, mask = None, None
                else:
                    pos = (real_cond.long().cumsum(1) - 1).clamp(min=0)  # (B, T)
                    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
                    mask = causal[None] & real_cond[:, None, :]
                    # a padding query sees only itself, so no row of the softmax is empty (an empty
                    # row is NaN)
                    mask = mask | torch.eye(T, dtype=torch.bool, device=device)[None]
                    mask = mask[:, None]  # (B, 1, T, T)
            logits = self(idx_cond, pos=pos, attn_mask=mask, cache=cache, last_only=True)
            logits = logits[:, -1, :].float()  # (B, V)
            if temperature == 0.0:
                next_id = logits.argmax(dim=-1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                probs = F.softmax(logits, dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
            # finished rows idle on padding
            next_id = torch.where(done, torch.full_like(next_id, pad_id), next_id)
            idx = torch.cat([idx, next_id[:, None]], dim=1)
            real = torch.cat([real, (~done)[:, None]], dim=1)
            done = done | (next_id == eos_id)
            if done.all():
                break
        # one host copy at the end, not one per token
        out = []
        for row in idx[:, L:].tolist():
            if eos_id in row:
                row = row[:row.index(eos_id)]
            out.append(row)
        return out

    @classmethod
    def from_hf_gpt2(cls, hf_model_or_name, block_size=None, dropout=0.0):
        """A GPT holding the weights of a Hugging Face GPT2LMHeadModel: a model object, or a name or
        folder that GPT2LMHeadModel.from_pretrained loads ('gpt2', 'gpt2-medium', ...). block_size,
        when smaller than GPT-2's n_positions, keeps only the first rows of the position table (less
        memory for short sequences)."""
        if isinstance(hf_model_or_name, str):
            # an optional dependency, needed only here
            from transformers import GPT2LMHeadModel
            hf = GPT2LMHeadModel.from_pretrained(hf_model_or_name)
        else:
            hf = hf_model_or_name
        c = hf.config
        # The architecture has to be the one forward() computes (options that only change rounding
        # don't matter).
        if c.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"GPT-2 config uses activation '{c.activation_function}', "
                             "this GPT has tanh-GELU")
        standard_attention = c.scale_attn_weights and not c.scale_attn_by_inverse_layer_idx
        if c.n_inner not in (None, 4 * c.n_embd) or not standard_attention:
            raise ValueError("GPT-2 config has n_inner != 4*n_embd "
                             "or non-standard attention scaling")
        # nn.LayerNorm's default eps is GPT-2's 1e-5
        if abs(c.layer_norm_epsilon - 1e-5) > 1e-12:
            raise ValueError(f"GPT-2 config has layer_norm_epsilon {c.layer_norm_epsilon}, "
                             "this GPT uses 1e-5")
        block_size = block_size or c.n_positions
        if block_size > c.n_positions:
            raise ValueError(f"block_size {block_size} > the model's n_positions {c.n_positions}")
        model = cls(GPTConfig(block_size=block_size, vocab_size=c.vocab_size, n_layer=c.n_layer,
                              n_head=c.n_head, n_embd=c.n_embd, dropout=dropout, bias=True))
        # attn.bias / attn.masked_bias are causal-mask buffers of older transformers versions, not
        # weights
        buffers = (".attn.bias", ".attn.masked_bias")
        src = {k: v for k, v in hf.state_dict().items() if not k.endswith(buffers)}
        # the tensors share storage with the parameters: copy_ fills the model
        dst = model.state_dict()
        if "lm_head.weight" in src:
            if not torch.equal(src.pop("lm_head.weight"), src["transformer.wte.weight"]):
                raise ValueError("the GPT-2 model's lm_head is not tied to its token embedding; "
                                 "this GPT ties them")
        if set(src) != set(dst) - {"lm_head.weight"}:
            mismatch = sorted(set(src) ^ set(dst))[:4]
            raise ValueError(f"GPT-2 weights do not match this GPT's layout: {mismatch}")
        # GPT-2 stores these projections as Conv1D, weight (in, out); nn.Linear holds (out, in)
        conv1d = ("attn.c_attn.weight", "attn.c_proj.weight",
                  "mlp.c_fc.weight", "mlp.c_proj.weight")
        with torch.no_grad():
            for k, v in src.items():
                if k.endswith(conv1d):
                    v = v.t()
                if k == "transformer.wpe.weight":
                    v = v[:block_size]
                assert v.shape == dst[k].shape, f"{k}: {tuple(v.shape)} vs {tuple(dst[k].shape)}"
                dst[k].copy_(v)
        return model


# --------------------------------------------------------------------------------------------------
# The KV cache (generation)

class KVCache:
    """The keys and values of every layer for the tokens run so far. With it, generation feeds each
    new token through the model once (attending to the cached ones) instead of re-running the whole
    sequence per token: O(T) work per new token instead of O(T^2)."""

    def __init__(self, n_layer, max_len):
        # per layer: (B, n_head, max_len, head_size)
        self.k = [None] * n_layer
        self.v = [None] * n_layer
        self.max_len = max_len
        # tokens cached so far; GPT.hidden_states advances it after all the layers have appended
        self.filled = 0

    def append(self, layer, k, v):
        """k, v: (B, n_head, T, head_size) of T new tokens -> those of every token so far,
        (B, n_head, filled + T, head_size), views into the cache."""
        B, H, T, D = k.shape
        # allocated on first use, in the dtype autocast gives k and v
        if self.k[layer] is None:
            self.k[layer] = k.new_empty(B, H, self.max_len, D)
            self.v[layer] = v.new_empty(B, H, self.max_len, D)
        end = self.filled + T
        assert end <= self.max_len, f"KV cache of {self.max_len} tokens is full"
        self.k[layer][:, :, self.filled:end] = k
        self.v[layer][:, :, self.filled:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


# --------------------------------------------------------------------------------------------------
# FlexAttention helpers (prefix-shared and packed masks on a GPU)

FLEX_AVAILABLE = flex_attention is not None
# flex_attention is only fast compiled; it is compiled once, on first use on a GPU
_compiled_flex = None


def flex(q, k, v, block_mask):
    """flex_attention, compiled on a GPU (where it becomes one fused kernel that skips masked
    blocks); on a CPU it runs eagerly, which is correct but slow, so there SDPA with a boolean mask
    is the default."""
    global _compiled_flex
    if q.is_cuda:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        return _compiled_flex(q, k, v, block_mask=block_mask)
    return flex_attention(q, k, v, block_mask=block_mask)


def block_mask(dense):
    """A boolean mask (B, 1, T, T), True = may attend, as a FlexAttention BlockMask over the same
    pattern."""
    B, _, T, _ = dense.shape

    def may_attend(b, h, q, kv):
        return dense[b, 0, q, kv]

    return create_block_mask(may_attend, B, None, T, T, device=dense.device)


def document_block_mask(doc, local, seg_mask=None, block=128, device=None):
    """The attention of packed rows (data.pack) as a FlexAttention BlockMask: a query sees the keys
    of its own segment only (doc (R, T), -1 on padding), causally, or as the segments' own mask
    says (seg_mask (S, 1, L, L), read at the columns' places in their segment, local (R, T)).

    FlexAttention computes only the (block x block) tiles the BlockMask lists. They are found from
    the segments' extents, not by evaluating the mask at all T x T places (create_block_mask's way,
    whose memory grows with T^2: a micro-batch packed into one row of 40k tokens would need GBs):
    tile (q, k) is listed when one segment spans both and k <= q, or k = q (padding's diagonal).
    The tiles are found on the host (pass CPU tensors: no GPU sync per segment); the mask and the
    BlockMask live on `device` (default: doc's)."""
    device = device or doc.device
    R, T = doc.shape
    n_blocks = -(-T // block)
    listed = torch.eye(n_blocks, dtype=torch.bool).repeat(R, 1, 1)  # (R, n_blocks, n_blocks)
    host_doc = doc.cpu()
    columns = torch.arange(T)
    for r in range(R):
        for s in host_doc[r].unique().tolist():
            if s < 0:
                continue
            where = columns[host_doc[r] == s]
            first, last = where[0].item() // block, where[-1].item() // block
            span = torch.ones(last - first + 1, last - first + 1, dtype=torch.bool).tril()
            listed[r, first:last + 1, first:last + 1] |= span
    # per query tile, the key tiles it computes: their count and indices (listed ones first)
    kv_num_blocks = listed.sum(-1).int()[:, None]  # (R, 1, n_blocks)
    kv_indices = torch.argsort(~listed, dim=-1, stable=True).int()[:, None]
    doc, local = doc.to(device), local.to(device)
    if seg_mask is not None:
        seg_mask = seg_mask.to(device)

    def may_attend(b, h, q, kv):
        same = doc[b, q] == doc[b, kv]
        if seg_mask is None:
            inside = kv <= q
        else:
            inside = seg_mask[doc[b, q].clamp(min=0), 0, local[b, q], local[b, kv]]
        # the diagonal: no empty softmax row (NaN) on padding
        return (same & inside) | (q == kv)

    return BlockMask.from_kv_blocks(kv_num_blocks.to(device), kv_indices.to(device),
                                    BLOCK_SIZE=block, mask_mod=may_attend, seq_lengths=(T, T))


# --------------------------------------------------------------------------------------------------
# Packed rows on a CPU: attention one segment at a time

class Segments:
    """Packed rows' attention without FlexAttention (on a CPU): each segment's queries, keys and
    values are gathered back into a padded layout, attend there (causal, or with the segments' own
    mask), and the outputs go back to their packed columns. So the matmuls before and after
    attention (most of a block's FLOPs) run on the packed tokens only, and each segment's attention
    is exactly its padded row's: a real query never sees a slot past its segment's end (causal) or
    one its mask leaves out. The segments attend in groups of similar length
    (data.attention_groups), each group padded to its longest, so attention itself computes
    little padding either.
    data.pack makes the layout. Measured against SDPA with a block-diagonal boolean mask over the
    whole packed row, which is exact too but computes every query against every key, in
    docs/scale_and_speed.md, "Packing" (bench/packed_attention.py)."""

    def __init__(self, index, inverse, packed_real, slot_real, groups, masks=None):
        self.index = index              # (slots,) long: the flat packed position of each slot
        self.inverse = inverse          # (R * T,) long: the slot of each packed position
        self.packed_real = packed_real  # (R * T,) bool: a segment's token, not padding
        self.slot_real = slot_real      # (slots,) bool: a slot inside its segment
        self.groups = groups            # [(S_g, L_g)]: group g's segments and their width
        self.masks = masks              # None: causal; else per group (S_g, 1, L_g, L_g) bool

    # torch.compile runs this eagerly (a graph break): its shapes, the groups', change with every
    # batch, and a graph per shape would mean a recompile per step
    @torch.compiler.disable
    def attend(self, qkv, n_head, dropout_p=0.0):
        """qkv (R, T, 3C), c_attn's output on packed rows -> attention's output (R, T, C)."""
        R, T, C3 = qkv.shape
        C = C3 // 3
        # (R * T, 3C) -> (slots, 3C): one gather for q, k and v
        qkv = Relayout.apply(qkv.view(R * T, C3), self.index, self.inverse, self.packed_real)
        blocks = qkv.split([S_g * L_g for S_g, L_g in self.groups])
        masks = self.masks or [None] * len(self.groups)
        outputs = []
        for (S_g, L_g), block, mask in zip(self.groups, blocks, masks):
            # (S_g * L_g, 3C) -> three (S_g, n_head, L_g, head_size)
            q, k, v = block.view(S_g, L_g, C3).split(C, dim=2)
            q, k, v = (x.view(S_g, L_g, n_head, C // n_head).transpose(1, 2) for x in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                               is_causal=mask is None)
            outputs.append(y.transpose(1, 2).reshape(S_g * L_g, C))
        # (slots, C) -> each packed position's slot, (R, T, C)
        y = Relayout.apply(torch.cat(outputs), self.inverse, self.index, self.slot_real)
        return y.view(R, T, C)


class Relayout(torch.autograd.Function):
    """rows (N, C) -> rows[source] (M, C): moving tokens between the packed and the attention
    layout. Each real token has one place in each, so the move is a permutation plus padding, and
    its gradient is the move back, grad[back] with the padding's rows zero: a gather too.
    (Autograd's own gradient of indexing is a scatter-add, which must allow for repeated indices:
    on a CPU it cost an eighth of a packed step.)

    Why this is exact: the true gradient of a real token's place is the gradient of its one place
    in the other layout, plus the gradients of any padding places that read it (padding points at
    a real row, 0). Those are 0: a padding slot is attended by no real query and its output is
    never read; a padding column of a packed row is read by nothing that is scored."""

    @staticmethod
    def forward(ctx, rows, source, back, real):
        # source (M,): the row of `rows` each output row copies; back (N,): the output row each
        # row of `rows` went to; real (N,) bool: the rows of `rows` that are tokens, not padding
        ctx.save_for_backward(back, real)
        return rows.index_select(0, source)

    @staticmethod
    def backward(ctx, grad):
        back, real = ctx.saved_tensors
        grad = grad.index_select(0, back)
        return torch.where(real[:, None], grad, torch.zeros_like(grad)), None, None, None


# --------------------------------------------------------------------------------------------------
# Chunked target log-probs (the scoring head's LM head, without the full logits)

class ChunkedTargetLogps(torch.autograd.Function):
    """log p(target) = z[target] - logsumexp(z), z = hidden @ weight^T the logits, for N rows of
    hidden states, `chunk` rows at a time: a chunk's logits (chunk, V) are made, reduced to a
    log-sum-exp and one gathered value per row, and dropped. Backward makes each chunk's logits
    again (one more matmul of the LM head) instead of keeping them, so the memory beyond inputs and
    outputs is O(chunk x V), not O(N x V).

    The derivative of log p(t) with respect to the logits is onehot(t) - softmax(z); through
    z = h W^T it gives grad_h = dz W and grad_W = dz^T h, summed over the chunks (a tied W gets
    this, plus the embedding's share, in one .grad: autograd adds the two). Matmuls run in the
    autocast dtype when autocast is on (as nn.Linear's would), the logits are upcast: log-probs come
    out float32 (float64 for float64 inputs)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk):
        # hidden (N, C), weight (V, C), targets (N,) long -> (N,) log-probs
        dtype, acc = _head_dtypes(hidden)
        h, w = hidden.to(dtype), weight.to(dtype)
        out = hidden.new_empty(hidden.size(0), dtype=acc)
        # kept for backward: softmax = exp(z - lse)
        lse = hidden.new_empty(hidden.size(0), dtype=acc)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, h.size(0), chunk):
                z = (h[s:s + chunk] @ w.t()).to(acc)  # (chunk, V): the only logits alive
                lse[s:s + chunk] = torch.logsumexp(z, dim=-1)
                out[s:s + chunk] = z.gather(1, targets[s:s + chunk, None])[:, 0] - lse[s:s + chunk]
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk = chunk
        ctx.dtype = dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        # d log p(target) / d logits = onehot(target) - softmax, a chunk's logits made again from
        # hidden and weight
        hidden, weight, targets, lse = ctx.saved_tensors
        chunk, dtype = ctx.chunk, ctx.dtype
        h, w = hidden.to(dtype), weight.to(dtype)
        grad_h = torch.empty_like(h)
        # the weight's gradient is summed over the chunks in float32 (at least)
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = torch.zeros_like(weight, dtype=lse.dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, h.size(0), chunk):
                g = grad_out[s:s + chunk, None].to(lse.dtype)  # (chunk, 1)
                z = (h[s:s + chunk] @ w.t()).to(lse.dtype)  # (chunk, V), made again
                # -g * softmax(z), in place
                dz = z.sub_(lse[s:s + chunk, None]).exp_().mul_(-g)
                # + g at the target
                dz = dz.scatter_add_(1, targets[s:s + chunk, None], g).to(dtype)
                grad_h[s:s + chunk] = dz @ w
                if grad_w is not None and grad_w.dtype == dtype:
                    # in place: no (V, C) temporary
                    grad_w.addmm_(dz.t(), h[s:s + chunk])
                elif grad_w is not None:
                    # bf16 / fp16 products, summed over chunks in float32
                    grad_w += dz.t() @ h[s:s + chunk]
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        return grad_h.to(hidden.dtype), grad_w, None, None


def _head_dtypes(hidden):
    """(matmul dtype, log-prob dtype) of the LM head: autocast's dtype when it is on, else the
    input's; log-probs at least float32."""
    device = hidden.device.type
    dtype = hidden.dtype
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    return dtype, torch.promote_types(dtype, torch.float32)


def target_logps(hidden, weight, targets, chunk=1024):
    """Log-probs of `targets` (N,) from final hidden states (N, C) and the LM head's weight (V, C),
    chunk rows of logits at a time (ChunkedTargetLogps)."""
    if torch.compiler.is_compiling():
        # torch.compile would trace the Function and merge backward's logits matmul with forward's,
        # keeping every chunk's logits for backward (O(N x V) again): run it eagerly instead, a
        # graph break of its own
        from torch._dynamo import disable
        return disable(ChunkedTargetLogps.apply)(hidden, weight, targets, chunk)
    return ChunkedTargetLogps.apply(hidden, weight, targets, chunk)


# --------------------------------------------------------------------------------------------------
# Activation checkpointing

def set_grad_checkpoint(model, on=True):
    """Activation checkpointing, per block (Block.forward): training keeps each block's input
    instead of all its activations and recomputes them in backward, about one more forward pass of
    compute for O(n_layer) less activation memory. on='selective': only what is cheap to make again
    is recomputed."""
    if on not in (False, True, "selective"):
        raise ValueError(f"grad_checkpoint: expected False, True or 'selective', got {on!r}")
    for block in model.transformer.h:
        block.grad_checkpoint = on
    return model


# Selective checkpointing keeps the outputs of what costs FLOPs to make (matmuls, attention): per
# token and block, the input C, q/k/v 3C, attention's output C, the two c_proj outputs 2C and the
# MLP's hidden layer 4C: 11C against 16C unchecked (C = n_embd), whose two LayerNorm outputs,
# mid-block residual and GELU output (7C) are made again.
_aten = torch.ops.aten
KEPT_OPS = {
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten.baddbmm.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
}


def selective_context():
    """torch.utils.checkpoint's context_fn for 'selective': KEPT_OPS' outputs are saved, the rest
    recomputed."""

    def policy(ctx, op, *args, **kwargs):
        if op in KEPT_OPS:
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)
