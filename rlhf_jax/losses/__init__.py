"""Every loss is a pure, jittable function of arrays (see ARCHITECTURE.md, "The loss contract").

  preference.py  sequence-level losses on log-probs or rewards: the DPO family, reward modelling,
                 and the `PREFERENCE_LOSSES` registry.
  policy.py      token-level RL: PPO's clipped surrogate and value loss, GAE, whitening,
                 GRPO / RLOO advantages, token-aggregation modes.
  kl.py          per-token KL estimators, KL-penalised rewards, the adaptive KL controller.

`losses.kl` is the per-token KL estimator function (the contract's name); it shadows the kl.py
submodule, whose other functions are re-exported here like everything else.

Hyper-parameters are keyword-only; losses return per-example [B] or per-token [B, T] values and
never reduce, so the caller's aggregation is explicit.
"""

from rlhf_jax.losses.kl import *  # noqa: F403
from rlhf_jax.losses.policy import *  # noqa: F403
from rlhf_jax.losses.preference import *  # noqa: F403
