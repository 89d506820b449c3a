# Robust DPO (rDPO) on the embedded task: python dpo.py config/robust.py
# label_smoothing is the label-flip rate rDPO corrects for; at 0 rDPO is plain DPO. Our labels are verified, so
# 0.1 assumes noise that is not there: docs/results.md says what that costs.
out_dir = "out/robust"
loss_type = "robust"
beta = 1.0
label_smoothing = 0.1
