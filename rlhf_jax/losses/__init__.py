"""Every loss is a pure, jittable function of arrays: it takes arrays (log-probs, rewards, masks)
and keyword-only hyper-parameters, does no I/O and holds no state, so it can be jitted, vmapped,
differentiated and tested on its own.

  preference.py  sequence-level losses on log-probs or rewards: the DPO family, KTO, reward
                 modelling (Bradley-Terry, K-wise rankings).
  zoo.py         the rest of TRL's pairwise zoo (EXO, NCA, BCO, SPPO, AOT, APO, DiscoPOP).
  registry.py    `PREFERENCE_LOSSES`: every pairwise loss by name, one calling convention.
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
from rlhf_jax.losses.registry import *  # noqa: F403
from rlhf_jax.losses.zoo import *  # noqa: F403
