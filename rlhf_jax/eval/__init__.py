"""Evaluation and diagnostics of aligned policies.

  policy_eval.py  sample a policy on held-out prompts; gold and proxy reward, KL to the reference
  diagnostics.py  win rate, length bias, best-of-N KL (analytic and estimated)
  plots.py        the reward-vs-KL frontier, proxy vs gold over training, Markdown tables
"""

from rlhf_jax.eval.diagnostics import (best_of_n_kl_analytic, best_of_n_kl_estimate,
                                       best_of_n_kl_estimate_bias, length_bias, win_rate)
from rlhf_jax.eval.policy_eval import (PolicyEvaluator, PolicySamples, evaluate_policy,
                                       summarize)

__all__ = ["best_of_n_kl_analytic", "best_of_n_kl_estimate", "best_of_n_kl_estimate_bias",
           "length_bias", "win_rate",
           "PolicyEvaluator", "PolicySamples", "evaluate_policy", "summarize"]
