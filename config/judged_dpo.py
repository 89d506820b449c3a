# Judged pairs (docs/judged_pairs.md): no answer is ever shown, only a hidden judge's verdicts
# on two of the SFT model's own samples. Four samples per prompt at temperature 1.5 (diverse enough that most
# prompts give two distinct answers, and noisy: a quarter of the judge's chosen answers are wrong), judged by
# -log(1 + |error|) with Bradley-Terry noise tau = 0.5.
# python dpo.py config/judged_dpo.py                      (DPO)
# python dpo.py config/judged_dpo.py --loss_type=sft      (Preferred-FT: SFT on the chosen samples, same pairs)
out_dir = "out/judged_dpo"
pairs = "judged"
n_samples = 4
sample_temperature = 1.5
judge_temperature = 0.5
