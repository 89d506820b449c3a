# Hinge (SLiC) loss on the embedded task: python dpo.py config/hinge.py
# A pair stops contributing once its summed log-ratio margin reaches 1/beta nats (1 nat here).
out_dir = "out/hinge"
loss_type = "hinge"
beta = 1.0
