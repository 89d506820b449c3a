# DPO on Anthropic HH-RLHF from the GPT-2 SFT checkpoint. One GPU, internet:
#   python sft.py config/gpt2_hh_sft.py && python dpo.py config/gpt2_hh_dpo.py
#   torchrun --standalone --nproc_per_node=8 dpo.py config/gpt2_hh_dpo.py   # same global batch on 8 GPUs
# Held-out metrics (eval_loss, eval_rewards/accuracies, ...) come from the test split. Estimated (not measured
# here) from the FLOP count: about an hour for 2,500 steps of 64 pairs on one A100/H100 with bf16 + compile.
out_dir = "out/gpt2_hh_dpo"
sft_ckpt = "out/gpt2_hh_sft/ckpt.pt"
dataset = "Anthropic/hh-rlhf"
eval_split = "test"
n_eval = 512
skip_bad_rows = True
batch_size = 8
gradient_accumulation_steps = 8
max_iters = 2500
learning_rate = 5e-7
min_lr = 5e-7
warmup_iters = 150
beta = 0.1
eval_interval = 250
log_interval = 10
compile = True
