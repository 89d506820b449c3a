# KTO on the embedded task: each pair gives one desirable and one undesirable example.
# python dpo.py config/kto.py
out_dir = "out/kto"
loss_type = "kto"
beta = 1.0
batch_size = 128    # unpaired examples per micro-batch: the same number of sequences as 64 pairs
