"""Shared check that loss functions give their float64 NumPy references' values under eager,
jit, vmap, pmap and shard_map (one independent batch per device), and that row-local functions
shard one batch's rows over the devices.

`cases` maps a name to (function under test, NumPy reference, builder of one batch's args,
row-local?). Every case runs in one program per transform, so each transform compiles once.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

NUM_DEVICES = 8
TRANSFORMS = ("eager", "jit", "vmap", "pmap", "shard_map")


def stack(trees):
  return jax.tree.map(lambda *xs: np.stack(xs), *trees)


def take(tree, i):
  return jax.tree.map(lambda x: x[i], tree)


class TransformHarness:

  def __init__(self, cases: dict, *, rtol: float, atol: float):
    self.cases, self.rtol, self.atol = cases, rtol, atol

  def apply_all(self, args_by_name):
    return {name: self.cases[name][0](*args) for name, args in args_by_name.items()}

  def assert_close(self, got, expected, names=None):
    for name in names or self.cases:
      jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=self.rtol, atol=self.atol,
                                     err_msg=name), got[name], expected[name])

  def mesh(self) -> Mesh:
    assert jax.device_count() == NUM_DEVICES, "tests/conftest.py sets 8 CPU devices"
    return Mesh(np.array(jax.devices()), ("data",))

  def batches_and_expected(self):
    """NUM_DEVICES independent batches per case, and the float64 NumPy values for each."""
    batches = {name: stack([make_args() for _ in range(NUM_DEVICES)])
               for name, (_, _, make_args, _) in self.cases.items()}
    expected = {name: stack([reference(*take(batches[name], i)) for i in range(NUM_DEVICES)])
                for name, (_, reference, _, _) in self.cases.items()}
    return batches, expected

  def check_transform(self, transform: str, batches, expected, mesh: Mesh):
    if transform == "eager":  # op by op; one batch, as each eager op compiles on its own
      expected = take(expected, 0)
      got = self.apply_all(take(batches, 0))
    elif transform == "jit":
      jitted = jax.jit(self.apply_all)
      got = stack([jitted(take(batches, i)) for i in range(NUM_DEVICES)])
    elif transform == "vmap":
      got = jax.jit(jax.vmap(self.apply_all))(batches)
    elif transform == "pmap":
      got = jax.pmap(self.apply_all)(batches)
    elif transform == "shard_map":
      # One independent batch per device (the leading axis), the functions unchanged inside.
      def per_device(args_by_name):
        return jax.tree.map(lambda x: x[None], self.apply_all(take(args_by_name, 0)))

      got = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=P("data"),
                                  out_specs=P("data")))(batches)
    else:
      raise ValueError(f"transform={transform!r}: expected one of {TRANSFORMS}")
    self.assert_close(got, expected)

  def check_row_sharding(self, batches, mesh: Mesh):
    """The row-local cases on one batch of NUM_DEVICES times the rows, sharded by rows."""
    names = [name for name, (_, _, _, row_local) in self.cases.items() if row_local]
    big_batch = {name: jax.tree.map(lambda x: np.concatenate(list(x)), batches[name])
                 for name in names}
    got = jax.jit(jax.shard_map(self.apply_all, mesh=mesh, in_specs=P("data"),
                                out_specs=P("data")))(big_batch)
    expected = {name: self.cases[name][1](*big_batch[name]) for name in names}
    self.assert_close(got, expected, names)
