"""
The machinery the training scripts call: small verbs, each module one concern. A learner reads the files at
the repository root (model, data, losses, logprobs, sft, dpo); these are what those scripts lean on.
"""
