# A tiny model for smoke tests and debugging, seconds on a CPU:
# python sft.py config/tiny_sft.py && python dpo.py --sft_ckpt=out/tiny_sft/ckpt.pt --out_dir=out/tiny_dpo
out_dir = "out/tiny_sft"
n_layer = 1
n_head = 2
n_embd = 64
max_iters = 150
batch_size = 32
learning_rate = 3e-3
eval_interval = 50
log_interval = 10
n_eval = 200
