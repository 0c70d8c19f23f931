"""`PREFERENCE_LOSSES`: every pairwise loss by name, with what a trainer needs to use it.

`PREFERENCE_LOSSES[name](pc, pr, rc, rr, **hparams) -> [B]` gives every loss one calling
convention (reference-free ones ignore rc, rr), so a trainer, sweep or notebook swaps losses by
name; each entry also says whether the loss needs a reference, the paper's `logp_reduction`
(token sums or means), its hyper-parameters with defaults, and whether it is batch-coupled.
`register_preference_loss` adds a user's own.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
from typing import Any, Callable, Mapping

import chex

from rlhf_jax.losses.preference import dpo, hinge, ipo, orpo, robust_dpo, simpo
from rlhf_jax.losses.zoo import (aot, aot_pair, apo_down, apo_zero, bco_pair, discopop, exo_pair,
                                 nca_pair, sppo_hard)

__all__ = ["PreferenceLoss", "PREFERENCE_LOSSES", "register_preference_loss"]

_LOGP_REDUCTIONS = ("sum", "mean")


@dataclasses.dataclass(frozen=True)
class PreferenceLoss:
  """A pairwise loss with what a trainer needs to use it by name.

  Call as `loss(pc, pr, rc, rr, **hparams) -> [B]`; reference-free losses ignore rc and rr (which
  may be None), the others raise if they are missing. An unknown hyper-parameter raises.

  Attributes:
    name: registry key.
    fn: the loss, `fn(pc, pr, [rc, rr,] *, **hparams)`.
    reference_free: True if it needs no reference log-probs.
    logp_reduction: "sum" or "mean": how the paper reduces token log-probs.
    hparams: ((name, default), ...): the keyword hyper-parameters it accepts.
    batch_coupled: True if a row's value depends on other rows (sorting, batch means); such a
      loss takes `where=` ([B] bool, the real rows) so padding rows leave the batch statistics
      alone, and gives padding rows 0.
    fixed: ((name, value), ...) bound at registration (e.g. an f-divergence variant of dpo).
  """
  name: str
  fn: Callable[..., chex.Array]
  reference_free: bool
  logp_reduction: str
  hparams: tuple[tuple[str, Any], ...]
  batch_coupled: bool = False
  fixed: tuple[tuple[str, Any], ...] = ()

  @property
  def defaults(self) -> dict[str, Any]:
    return dict(self.hparams)

  def check_hparams(self, hparams: Mapping[str, Any]) -> None:
    """Raises ValueError naming any key of `hparams` this loss does not accept."""
    valid = [name for name, _ in self.hparams]
    for key in hparams:
      if key not in valid:
        close = difflib.get_close_matches(key, valid, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"preference loss {self.name!r} has no hyper-parameter {key!r}"
                         f" (it accepts {valid}){hint}")

  def __call__(self, pc, pr, rc=None, rr=None, *, where=None, **hparams) -> chex.Array:
    """The loss's [B] values. `where` ([B] bool, the real rows) matters only to batch-coupled
    losses; the others are per-row, and the caller weights their rows as it likes."""
    self.check_hparams(hparams)
    kwargs = {**dict(self.fixed), **hparams}
    if self.batch_coupled and where is not None:
      kwargs["where"] = where
    if self.reference_free:
      return self.fn(pc, pr, **kwargs)
    if rc is None or rr is None:
      raise ValueError(f"preference loss {self.name!r} needs the reference log-probs rc and rr")
    return self.fn(pc, pr, rc, rr, **kwargs)


PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {}


def register_preference_loss(name: str, fn: Callable[..., chex.Array], *, reference_free: bool,
                             logp_reduction: str, batch_coupled: bool = False,
                             fixed: Mapping[str, Any] | None = None,
                             overwrite: bool = False) -> PreferenceLoss:
  """Adds `fn` to `PREFERENCE_LOSSES` under `name` and returns its entry.

  `fn` takes (pc, pr) if `reference_free` else (pc, pr, rc, rr) positionally, then keyword-only
  hyper-parameters, each with a default: those become the entry's `hparams`, minus any bound by
  `fixed`. Raises ValueError on a taken name (unless `overwrite`) or a malformed `fn`.
  """
  if name in PREFERENCE_LOSSES and not overwrite:
    raise ValueError(f"preference loss {name!r} is already registered (pass overwrite=True)")
  if logp_reduction not in _LOGP_REDUCTIONS:
    raise ValueError(f"logp_reduction must be one of {_LOGP_REDUCTIONS}, got {logp_reduction!r}")
  params = inspect.signature(fn).parameters.values()
  positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
  n_arrays = 2 if reference_free else 4
  if len(positional) != n_arrays and not any(p.kind == p.VAR_POSITIONAL for p in params):
    expected = "pc, pr" if reference_free else "pc, pr, rc, rr"
    raise ValueError(f"{name!r}: fn must take {n_arrays} positional log-prob arrays ({expected}),"
                     f" got {len(positional)}")
  keyword = [p for p in params if p.kind == p.KEYWORD_ONLY and p.name != "where"]
  if batch_coupled and "where" not in {p.name for p in params}:
    raise ValueError(f"{name!r}: a batch-coupled loss must take where= (its real rows)")
  missing = [p.name for p in keyword if p.default is p.empty]
  if missing:
    raise ValueError(f"{name!r}: keyword-only hyper-parameters {missing} need defaults")
  fixed = dict(fixed or {})
  unknown = set(fixed) - {p.name for p in keyword}
  if unknown:
    raise ValueError(f"{name!r}: fixed {sorted(unknown)} are not keyword-only parameters of fn")
  entry = PreferenceLoss(
      name=name, fn=fn, reference_free=reference_free, logp_reduction=logp_reduction,
      hparams=tuple((p.name, p.default) for p in keyword if p.name not in fixed),
      batch_coupled=batch_coupled, fixed=tuple(sorted(fixed.items())))
  PREFERENCE_LOSSES[name] = entry
  return entry


_register = functools.partial(register_preference_loss, reference_free=False, logp_reduction="sum")
_register("dpo", dpo)
_register("robust_dpo", robust_dpo)
_register("ipo", ipo, logp_reduction="mean")
_register("hinge", hinge)
_register("simpo", simpo, reference_free=True, logp_reduction="mean")
_register("orpo", orpo, reference_free=True, logp_reduction="mean")
_register("exo_pair", exo_pair)
_register("nca_pair", nca_pair)
_register("bco_pair", bco_pair, batch_coupled=True)  # coupled through the default delta
_register("sppo_hard", sppo_hard)
_register("aot", aot, batch_coupled=True)
_register("aot_pair", aot_pair, batch_coupled=True)
_register("apo_zero", apo_zero)
_register("apo_down", apo_down)
_register("discopop", discopop)
# Length-normalised DPO (TRL's "sigmoid_norm") is DPO on token-MEAN log-probs: the same math, so
# it is an entry, not a function. What differs is what the trainer feeds it, which is exactly what
# `logp_reduction` tells the trainer; a second function would duplicate dpo's body.
_register("ln_dpo", dpo, logp_reduction="mean")
_register("sigmoid_norm", dpo, logp_reduction="mean")
# The f-divergence options of dpo, by name; alpha is bound (so rejected) where it means nothing.
_register("dpo_forward_kl", dpo, fixed={"f_divergence": "forward_kl", "alpha": 0.5})
_register("dpo_js_divergence", dpo, fixed={"f_divergence": "js_divergence", "alpha": 0.5})
_register("dpo_alpha_divergence", dpo, fixed={"f_divergence": "alpha_divergence"})
