"""rlhf_jax: aligning language models with human preferences in JAX/Flax.

Light to import: `losses` and `ops` (pure math) load eagerly; the heavier subpackages (models,
sampling, rollout, rewards, data, train, eval, ...) load on first attribute access.
"""

import importlib

from rlhf_jax import losses, ops

__version__ = "0.1.0"

_LAZY = ("models", "sampling", "rollout", "rewards", "data", "train", "eval", "parallel", "cli",
         "config", "bandit", "embedded", "feedback", "pipeline")


def __getattr__(name):
  if name in _LAZY:
    return importlib.import_module(f"rlhf_jax.{name}")
  raise AttributeError(f"module 'rlhf_jax' has no attribute {name!r}")


__all__ = ["losses", "ops", "__version__", *_LAZY]
