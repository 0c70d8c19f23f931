"""Orbax checkpoints of a train state plus the JSON metadata needed to resume exactly.

Each checkpoint holds the state pytree (params — a LoRA model's adapters only, its frozen base
being reloaded from the model path —, optimiser state, RNG key, extras) and a JSON item
with the step, the data position and anything else the loop records. Typed PRNG keys are stored as
their raw key data and re-wrapped on restore. Saves are asynchronous when orbax can be (the loop
waits before exiting and before a restore); `keep` bounds how many are kept.
"""

from __future__ import annotations

import pathlib

import jax
import orbax.checkpoint as ocp

from rlhf_jax.models import lora

__all__ = ["Checkpointer"]


def _is_key(x) -> bool:
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keys_to_data(tree):
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _data_to_keys(tree, like):
  return jax.tree.map(lambda x, ref: jax.random.wrap_key_data(x, impl=jax.random.key_impl(ref))
                      if _is_key(ref) else x, tree, like)


class Checkpointer:
  """Saves and restores (state, metadata) under `directory/<step>`."""

  def __init__(self, directory: str | pathlib.Path, *, keep: int = 3, async_save: bool = True):
    self.directory = pathlib.Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, meta: dict):
    state = lora.detach_bases(state)[0]  # a LoRA base is reloaded from the model, never saved
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_keys_to_data(state)), meta=ocp.args.JsonSave(meta)))

  def restore(self, state_like, step: int | None = None):
    """Restores into the structure (and shardings) of `state_like`; returns (state, meta)."""
    self.manager.wait_until_finished()
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    like, bases = lora.detach_bases(state_like)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _keys_to_data(like))
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    state = lora.attach_bases(_data_to_keys(restored.state, like), bases)
    return state, dict(restored.meta)

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    """Waits for pending saves and releases the manager; a second call does nothing."""
    if getattr(self, "_closed", False):
      return
    self.manager.wait_until_finished()
    self.manager.close()
    self._closed = True
