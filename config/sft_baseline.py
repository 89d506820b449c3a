# The honest baseline: continued SFT from the SFT checkpoint on the chosen (verified) answers of the same pairs,
# for the same number of steps as DPO. python dpo.py config/sft_baseline.py
out_dir = "out/sft_chosen"
loss_type = "sft"
