# IPO on the embedded task: python dpo.py config/ipo.py
# IPO regresses the per-token log-ratio margin onto 1/(2*beta); beta=0.5 asks for a margin of 1 nat per token.
out_dir = "out/ipo"
loss_type = "ipo"
beta = 0.5
