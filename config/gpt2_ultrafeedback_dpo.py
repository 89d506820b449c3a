# DPO on UltraFeedback (binarized) from a GPT-2 SFT checkpoint of your choice (e.g. gpt2_hh_sft.py's).
#   python dpo.py config/gpt2_ultrafeedback_dpo.py --sft_ckpt=out/gpt2_hh_sft/ckpt.pt
# The prompt is rendered with data.render_chat, the same template as SFT on `messages` data.
out_dir = "out/gpt2_uf_dpo"
sft_ckpt = "out/gpt2_hh_sft/ckpt.pt"
dataset = "HuggingFaceH4/ultrafeedback_binarized"
dataset_split = "train_prefs"
eval_split = "test_prefs"
n_eval = 512
skip_bad_rows = True
batch_size = 8
gradient_accumulation_steps = 8
max_iters = 1000
learning_rate = 5e-7
min_lr = 5e-7
warmup_iters = 100
beta = 0.1
eval_interval = 250
log_interval = 10
compile = True
