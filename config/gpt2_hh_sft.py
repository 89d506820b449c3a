# GPT-2 (124M) SFT on Anthropic HH-RLHF's chosen transcripts (the DPO paper's recipe: SFT on the preferred
# answers first), then gpt2_hh_dpo.py. One GPU, internet:
#   python sft.py config/gpt2_hh_sft.py
# ~160k rows; 2,000 steps of 64 rows ~ 0.8 epoch. Estimated (not measured here) from the FLOP count:
# well under an hour on one A100/H100 with bf16 and compile.
out_dir = "out/gpt2_hh_sft"
init_from = "gpt2"
tokenizer = "gpt2"
dataset = "Anthropic/hh-rlhf"
dataset_format = "hh"      # sft.py reads pairs as SFT rows: the chosen answer is the response
eval_split = "test"
n_eval = 512
skip_bad_rows = True       # a few HH rows have an empty answer: skip and count them
block_size = 512
batch_size = 16
gradient_accumulation_steps = 4
max_iters = 2000
learning_rate = 5e-5
min_lr = 5e-6
warmup_iters = 100
weight_decay = 0.0
eval_interval = 500
log_interval = 20
beta2 = 0.95
compile = True
