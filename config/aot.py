# AOT (paired) on the embedded task: python dpo.py config/aot.py
# Sorted within each micro-batch of 64 pairs (see losses.aot_loss). On seed 1: beta = 0.3 79.7%, 1 78.0%, 3 84.1%.
out_dir = "out/aot"
loss_type = "aot"
beta = 3.0
