# ORPO from the SFT checkpoint (reference-free): python dpo.py config/orpo.py
# One stage instead of two: python dpo.py config/orpo.py --init_from=scratch --max_iters=800 --learning_rate=1e-3
out_dir = "out/orpo"
loss_type = "orpo"
beta = 0.1          # ORPO's lambda: weight of the odds-ratio term next to the NLL of the chosen answer
