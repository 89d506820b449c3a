# SimPO on the embedded task (reference-free: one model in memory): python dpo.py config/simpo.py
out_dir = "out/simpo"
loss_type = "simpo"
beta = 2.0          # reward scale on the per-token average log-prob
simpo_gamma = 0.5   # target reward margin
