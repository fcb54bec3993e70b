"""Evaluation with lm-evaluation-harness: `automodel eval` and train.eval_every (an optional extra)."""
