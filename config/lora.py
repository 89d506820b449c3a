# LoRA DPO on the embedded task: python dpo.py config/lora.py
# Rank-8 adapters on the four projections of every block train (65,536 of the SFT model's 830,464
# weights, position table included); every other weight stays frozen, and the reference is the
# policy itself with its adapters switched off. LoRA wants a larger learning rate than full
# fine-tuning's 5e-5: on seed 1, 5e-5 / 1e-4 / 3e-4 / 1e-3 / 3e-3 reached 87.1% / 95.3% / 98.4% /
# 94.9% / 90.0% held-out (docs/lora_and_checkpointing.md).
out_dir = "out/lora"
lora_rank = 8
lora_alpha = 16.0
learning_rate = 3e-4
min_lr = 3e-4
