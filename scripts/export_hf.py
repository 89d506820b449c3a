"""
Export a checkpoint of ours as a Hugging Face transformers GPT2LMHeadModel folder (config.json + safetensors):

    python -m scripts.export_hf out/dpo/ckpt.pt out/dpo/hf

Our GPT keeps GPT-2's layout, so the export is a renaming plus one transpose: GPT-2 stores the attention and MLP
projections as Conv1D, weight (in, out), where nn.Linear holds (out, in). n_positions is our block_size, the
vocabulary is our model's, the embeddings stay tied, and a model trained without biases (bias=False) gets zero
biases, which compute the same thing. A LoRA run's adapters are merged into the weights first
(checkpoint.model_from_checkpoint): the export is a plain GPT2LMHeadModel.

Loading the export (transformers is an optional dependency: `pip install transformers`):

    from transformers import GPT2LMHeadModel
    model = GPT2LMHeadModel.from_pretrained("out/dpo/hf")

Tokens are the checkpoint's tokenizer's (the folder's README.md says which): 'gpt2' is GPT-2's BPE, so
AutoTokenizer.from_pretrained("gpt2") or tiktoken's r50k_base encode for it; 'byte' is the text's UTF-8 bytes,
ids 0-255, with EOS 256 and padding 257. Prompts from chat data should be written with data.render_chat, the
template the model was trained on. The EOS / padding ids are in config.json and generation_config.json.
"""

import os
import sys

import torch

from nanopo.checkpoint import load_checkpoint, model_from_checkpoint
from data import Tokenizer
from configurator import UserError, install_error_handler

# projections GPT-2 keeps as Conv1D (weight transposed relative to nn.Linear)
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def to_hf_gpt2(model, tokenizer_name):
    """Our GPT -> a transformers GPT2LMHeadModel computing the same logits (eval mode)."""
    from transformers import GPT2Config, GPT2LMHeadModel  # optional dependency, imported only when exporting
    c = model.config
    tok = Tokenizer(tokenizer_name)
    hf = GPT2LMHeadModel(GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
        n_inner=None, activation_function="gelu_new", layer_norm_epsilon=1e-5,  # tanh-GELU, nn.LayerNorm's eps
        resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout,  # our one dropout sits at all three
        bos_token_id=tok.eos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, tie_word_embeddings=True))
    ours = model.state_dict()
    dst = {k: v for k, v in hf.state_dict().items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    with torch.no_grad():
        for k, v in dst.items():
            if k == "lm_head.weight":
                continue  # tied to transformer.wte.weight, filled through it
            if k not in ours:  # a bias of a bias=False model: zero adds nothing, as no bias does
                assert k.endswith(".bias"), k
                v.zero_()
                continue
            src = ours[k].t() if k.endswith(CONV1D_WEIGHTS) else ours[k]
            assert src.shape == v.shape, f"{k}: {tuple(src.shape)} vs {tuple(v.shape)}"
            v.copy_(src)
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr(), "lm_head is not tied"
    return hf.eval()


def export(ckpt_path, out_dir):
    """Checkpoint file -> a save_pretrained folder (safetensors) with a short README.md on how to use it."""
    if not os.path.isfile(ckpt_path):
        raise UserError(f"checkpoint {ckpt_path} does not exist")
    ckpt = load_checkpoint(ckpt_path)
    model = model_from_checkpoint(ckpt, ckpt_path)  # its training dropout goes into the config's *_pdrop
    hf = to_hf_gpt2(model, ckpt["tokenizer"])
    hf.save_pretrained(out_dir)  # writes model.safetensors + config.json (safetensors is the default)
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write(f"# GPT-2-layout model exported from {ckpt_path}\n\n"
                f"Tokenizer: '{ckpt['tokenizer']}' (see nanoPO's scripts/export_hf.py). "
                "Load it with:\n\n"
                f"    from transformers import GPT2LMHeadModel\n"
                f"    model = GPT2LMHeadModel.from_pretrained({out_dir!r})\n")
    return hf


if __name__ == "__main__":
    install_error_handler()
    if len(sys.argv) != 3:
        raise UserError("usage: python -m scripts.export_hf CHECKPOINT OUT_DIR  (e.g. out/dpo/ckpt.pt out/dpo/hf)")
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UserError("python -m scripts.export_hf needs transformers: "
                        "pip install transformers") from None
    export(sys.argv[1], sys.argv[2])
    print(f"wrote {sys.argv[2]} (load with transformers.GPT2LMHeadModel.from_pretrained)")
