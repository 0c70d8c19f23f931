"""Orbax checkpoints of a train state plus the JSON metadata needed to resume exactly.

Each checkpoint holds the state pytree (params — a LoRA model's adapters only, its frozen base
being reloaded from the model path —, optimiser state, RNG key, extras) and a JSON item
with the step, the data position and anything else the loop records. Typed PRNG keys are stored as
their raw key data and re-wrapped on restore. Saves are asynchronous when orbax can be (the loop
waits before exiting and before a restore); `keep` bounds how many are kept.

Damaged checkpoints: `restore_intact` tries the steps newest first. A step whose files cannot be
read back (a truncated or corrupt array file, empty or corrupt metadata, an item directory
missing as after a kill mid-save) is logged as damaged, with why, and moved aside to
`<directory>/<step>.damaged` (orbax ignores that name; without the move it would skip every
later save at or below that step); the newest intact step is restored. When none is intact it is
a CheckpointError naming the directory, never a silent start from step 0. (A save that a kill
interrupted before orbax renamed its temporary directory is not a step at all: orbax ignores it.)
Across processes, every process must read a step for it to count as intact, so all of them
resume from the same one.
"""

from __future__ import annotations

import logging
import pathlib
import re
import sys
from typing import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from rlhf_jax import parallel
from rlhf_jax.errors import CheckpointError, UserError, one_line
from rlhf_jax.models import lora

__all__ = ["Checkpointer", "CheckpointError"]

log = logging.getLogger(__name__)


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
    """Restores into the structure (and shardings) of `state_like`; returns (state, meta).

    A step that cannot be read back is a CheckpointError naming its directory and why.
    """
    self.manager.wait_until_finished()
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    try:
      return self._read_state(step, state_like), self._read_meta(step)
    except Exception as err:  # noqa: BLE001 — orbax, tensorstore and json raise many types
      self._quiet_abandoned_reads()
      raise CheckpointError(f"expected an intact checkpoint, got a damaged one ({_why(err)})",
                            where=str(self.directory / str(step))) from err

  def _read_meta(self, step: int) -> dict:
    return dict(self.manager.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)

  def _read_state(self, step: int, state_like):
    """The state at `step` in the structure (and shardings) of `state_like`: the one place a
    state is read back (restore and restore_intact both come here)."""
    like, bases = lora.detach_bases(state_like)  # a LoRA base is never saved: put it back
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _keys_to_data(like))
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))
    return lora.attach_bases(_data_to_keys(restored.state, like), bases)

  def restore_intact(self, state_like, check: Callable[[dict], None] | None = None):
    """(state, meta) of the newest intact checkpoint, or None when there is none at all.

    Damaged steps are logged and moved aside (see the module docstring); `check(meta)` runs on
    each candidate's metadata before its state is read, and what it raises (a config that does
    not match) stops the search. CheckpointError when every step is damaged.
    """
    self.manager.wait_until_finished()
    steps = sorted(self.all_steps(), reverse=True)
    damaged = []  # (step, why)
    for step in steps:
      meta, why = self._attempt(lambda: self._read_meta(step))
      if why is None and check is not None:
        check(meta)
      if why is None:
        state, why = self._attempt(lambda: self._read_state(step, state_like))
      if why is None:
        if damaged:
          self._set_aside([s for s, _ in damaged])
          log.warning("resuming from step %d, the newest intact checkpoint in %s", step,
                      self.directory)
        return state, meta
      damaged.append((step, why))
      self._quiet_abandoned_reads()
      log.warning("the checkpoint at step %d in %s is damaged (%s); trying an older one", step,
                  self.directory, why)
    if not damaged:
      return None
    raise CheckpointError(
        "expected an intact checkpoint to resume from, got only damaged ones: "
        + "; ".join(f"step {s}: {why}" for s, why in damaged)
        + ". Move the directory aside to start over, or set run.resume=false with "
          "run.overwrite=true", where=str(self.directory))

  def _attempt(self, read):
    """(value, None) when `read()` succeeds on every process, else (None, why)."""
    try:
      value, why = read(), None
    except UserError:
      raise
    except Exception as err:  # noqa: BLE001 — orbax, tensorstore and json raise many types
      value, why = None, _why(err)
    # host: a flag per process, gathered so that every process takes the same step
    everywhere = parallel.host_get_all_processes(np.int32(why is None))
    if why is None and not np.all(everywhere):
      value, why = None, "another process could not read it"
    return value, why

  def _set_aside(self, steps: list[int]):
    """Renames damaged step directories to `<step>.damaged` (process 0) and reloads the steps."""
    if jax.process_index() == 0:
      for step in steps:
        source, target = self.directory / str(step), self.directory / f"{step}.damaged"
        suffix = 1
        while target.exists():
          suffix += 1
          target = self.directory / f"{step}.damaged.{suffix}"
        if source.exists():
          source.rename(target)
          log.warning("moved the damaged checkpoint at step %d to %s", step, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # noqa: PLC0415 — only multi-host needs it
      multihost_utils.sync_global_devices("rlhf_jax checkpoint set-aside")
    self.manager.reload()

  def _quiet_abandoned_reads(self):
    """After a failed read, tensorstore may complete the reads it abandoned on orbax's closed
    event loop, which Python reports as an unraisable "Event loop is closed" with a traceback
    on stderr. That one is expected and dropped until close(); every other one still shows."""
    if getattr(self, "_previous_hook", None) is not None:
      return
    previous = self._previous_hook = sys.unraisablehook

    def hook(unraisable):
      if not (unraisable.exc_type is RuntimeError
              and str(unraisable.exc_value) == "Event loop is closed"):
        previous(unraisable)

    sys.unraisablehook = hook

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    """Waits for pending saves and releases the manager; a second call does nothing."""
    if getattr(self, "_closed", False):
      return
    self.manager.wait_until_finished()
    self.manager.close()
    self._closed = True
    if getattr(self, "_previous_hook", None) is not None:
      sys.unraisablehook, self._previous_hook = self._previous_hook, None


def _why(err: Exception) -> str:
  """A short reason for a failed read: tensorstore's status code and its innermost clauses
  (which file, what was wrong), without the JSON spec it appends."""
  message = one_line(err).split(" [tensorstore_spec")[0]
  code = re.match(r"([A-Z_]+): ", message)
  if code and message.count(": ") > 3:
    message = code.group(1) + ": " + ": ".join(message.split(": ")[-2:])
  return f"{type(err).__name__}: {message}"[:300]
