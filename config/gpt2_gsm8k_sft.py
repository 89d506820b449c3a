# GPT-2 (124M) SFT on GSM8K, then DPO on its own wrong answers (gpt2_gsm8k_dpo.py). One GPU, internet:
#   python sft.py config/gpt2_gsm8k_sft.py
# 7,473 worked solutions, 3 epochs at 32 rows/step ~ 700 steps. Estimated (not measured here: our machines
# have no GPU) from the FLOP count: a few minutes of training on one A100/H100, plus the held-out task_accuracy
# evaluation, which generates up to 256 tokens (KV cache) for each of n_eval test problems.
# GPT-2 small scores only a few percent on GSM8K: the point is the pipeline, not the score.
out_dir = "out/gpt2_gsm8k_sft"
init_from = "gpt2"
tokenizer = "gpt2"
dataset = "openai/gsm8k:main"
eval_split = "test"
n_eval = 500
block_size = 512
batch_size = 16
gradient_accumulation_steps = 2
max_iters = 700
learning_rate = 2e-5
min_lr = 2e-6
warmup_iters = 50
weight_decay = 0.0
dropout = 0.0
eval_interval = 350
log_interval = 20
beta2 = 0.95
