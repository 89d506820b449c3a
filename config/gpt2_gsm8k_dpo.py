# DPO on GSM8K from the GPT-2 SFT checkpoint: pairs are built on the fly as on the embedded task (chosen = the
# reference solution, rejected = the SFT model's own wrong answer, greedy or sampled). One GPU, internet:
#   python sft.py config/gpt2_gsm8k_sft.py && python dpo.py config/gpt2_gsm8k_dpo.py
# Not measured here (no GPU): besides the 200 DPO steps, pair sampling generates up to 3 completions of
# <= 256 tokens for each of 2,000 prompts (with model.generate's KV cache: one token per row per forward).
out_dir = "out/gpt2_gsm8k_dpo"
sft_ckpt = "out/gpt2_gsm8k_sft/ckpt.pt"
dataset = "openai/gsm8k:main"
eval_split = "test"
n_eval = 500
n_pairs = 2000
batch_size = 8
gradient_accumulation_steps = 4
max_iters = 200
learning_rate = 5e-7
min_lr = 5e-7
beta = 0.1
eval_interval = 100
log_interval = 10
