# Hinge (SLiC) loss on the embedded task: python dpo.py config/hinge.py
# A pair stops contributing once its summed log-ratio margin reaches 1/beta nats.
out_dir = "out/hinge"
loss_type = "hinge"
beta = 0.1
