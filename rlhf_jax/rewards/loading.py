"""The reward-function contract: loading by spec, TRL's calling convention, checked results.

A reward function is called as

    fn(prompts, completions, **columns) -> list[float | None]

(see the package docstring). `load_function` finds one from a spec ("module:name",
"path/to/file.py:name", or "module:factory(arg=literal, ...)"); `RewardFunction` calls it with
one prompt record per completion, the decoded completions and their token ids, and turns what
it returns into a float64 array (NaN = None) or a `RewardError` naming the function and the
dataset row. NumPy only: the rollout scorers (`rlhf_jax.rollout`) call this on the host.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import math
import os
import pathlib
import sys
from typing import Any, Callable, Sequence

import numpy as np

from rlhf_jax.errors import UserError, one_line

__all__ = ["RewardError", "RewardFunction", "load_function"]


class RewardError(UserError):
  """A reward function failed, or returned something that cannot be trained on."""


def _import_module(module_name: str, spec: str):
  if module_name.endswith(".py"):  # a file, relative to the working directory
    path = pathlib.Path(module_name)
    if not path.is_file():
      raise RewardError(f"reward function {spec!r}: the file {str(path)!r} does not exist")
    file_spec = importlib.util.spec_from_file_location(f"rlhf_jax_rewards_{path.stem}", path)
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)
    return module
  if os.getcwd() not in sys.path:  # `rlhf-jax run` (the console script) does not add it
    sys.path.append(os.getcwd())
  try:
    return importlib.import_module(module_name)
  except ImportError as err:
    raise RewardError(f"cannot load reward function {spec!r}: {err} (a module must be "
                      "importable from the working directory, or give a file as "
                      "path/to/file.py:name)") from err


def _call_arguments(call: ast.Call, spec: str):
  try:
    args = [ast.literal_eval(a) for a in call.args]
    kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
  except ValueError:
    raise RewardError(f"reward function {spec!r}: factory arguments must be literals "
                      "(numbers, strings, tuples), e.g. module:factory(max_length=512)") from None
  if any(k.arg is None for k in call.keywords):
    raise RewardError(f"reward function {spec!r}: no **kwargs in a factory call")
  return args, kwargs


def load_function(spec: str) -> Callable:
  """'module:name', 'path/to/file.py:name', or 'module:factory(arg=value, ...)' -> the function.

  A factory call (literal arguments only) returns the reward function it builds, e.g.
  'rlhf_jax.rewards:soft_overlong_penalty(max_length=512, cache=128)'.
  """
  module_name, _, expression = spec.partition(":")
  if not module_name or not expression:
    raise RewardError(f"reward function {spec!r} must be given as 'module:name' (or "
                      "'path/to/file.py:name')")
  try:
    tree = ast.parse(expression.strip(), mode="eval").body
  except SyntaxError:
    raise RewardError(f"reward function {spec!r}: {expression!r} is not a name or a factory "
                      "call") from None
  call = tree if isinstance(tree, ast.Call) else None
  target = call.func if call else tree
  if not isinstance(target, ast.Name):
    raise RewardError(f"reward function {spec!r}: expected a name after ':', got "
                      f"{expression!r}")
  module = _import_module(module_name, spec)
  if not hasattr(module, target.id):
    raise RewardError(f"cannot load reward function {spec!r}: {module_name} has no "
                      f"{target.id!r}")
  fn = getattr(module, target.id)
  if call is not None:
    args, kwargs = _call_arguments(call, spec)
    try:
      fn = fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 — the factory's own message, with where it came from
      raise RewardError(f"reward function {spec!r}: the factory raised {err!r}") from err
  if not callable(fn):
    raise RewardError(f"reward function {spec!r} is not callable")
  return fn


def _as_user_value(value):
  """A prompt or column value as the dataset gave it (message tuples become lists of dicts)."""
  if isinstance(value, tuple) and all(isinstance(m, dict) for m in value):
    return [dict(m) for m in value]
  return value


class RewardFunction:
  """A reward function with TRL's calling convention, checked on every call.

  `__call__(records, completions, ids)` takes one prompt record per completion (with `.text`,
  `.columns` and `.row`, as the data layer makes them), the decoded completions and their token
  ids (the `completion_ids` column; None when there are none, as for a judge's texts), and
  returns a float64 array with NaN where the function said None. A function that raises,
  returns the wrong number of values, a non-number or a non-finite number is a RewardError
  naming the function and the prompt's row as data errors do: "<file>, line <N>" in a
  line-based file, else "<source>, row <N>" (counting from 0).
  """

  def __init__(self, fn: Callable, name: str):
    self.fn, self.name = fn, name
    parameters = inspect.signature(fn).parameters.values()
    self.takes_all = any(p.kind is p.VAR_KEYWORD for p in parameters)
    self.named = {p.name for p in parameters if p.kind in (p.KEYWORD_ONLY,
                                                           p.POSITIONAL_OR_KEYWORD)}

  @classmethod
  def load(cls, spec: str, name: str | None = None) -> "RewardFunction":
    expression = spec.partition(":")[2]
    return cls(load_function(spec), name or expression.split("(")[0].strip())

  def _arguments(self, records, completions, ids):
    prompts = [_as_user_value(r.text) for r in records]
    texts = [c if isinstance(r.text, str) else [{"role": "assistant", "content": c}]
             for r, c in zip(records, completions)]
    columns = {} if ids is None else {"completion_ids": [list(i) for i in ids]}
    for name in sorted({key for r in records for key in r.columns}):
      columns[name] = [_as_user_value(r.columns.get(name)) for r in records]
    if not self.takes_all:  # a function without **kwargs gets the columns it names
      missing = sorted(n for n in self.named - {"prompts", "completions"} - set(columns)
                       if n not in _defaults(self.fn))
      if missing:
        raise RewardError(f"reward function {self.name!r} needs the column(s) {missing}, which "
                          f"the prompt rows do not have (they have {sorted(columns)})")
      columns = {k: v for k, v in columns.items() if k in self.named}
    return prompts, texts, columns

  def __call__(self, records: Sequence[Any], completions: Sequence[str],
               ids: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    prompts, texts, columns = self._arguments(records, completions, ids)
    try:
      values = self.fn(prompts, texts, **columns)
    except Exception as err:  # noqa: BLE001 — located below, then re-raised with where
      raise self._locate(err, prompts, texts, columns, records) from err
    return self._check(values, records)

  def _locate(self, err, prompts, texts, columns, records) -> RewardError:
    """The first row on which the function raises alone, for the message."""
    for i in range(len(prompts)):
      try:
        self.fn(prompts[i:i + 1], texts[i:i + 1], **{k: v[i:i + 1] for k, v in columns.items()})
      except Exception as row_err:  # noqa: BLE001
        return RewardError(f"reward function {self.name!r} raised {type(row_err).__name__}: "
                           f"{one_line(row_err)} (completion {texts[i]!r:.200})",
                           where=_where(records[i]))
    return RewardError(f"reward function {self.name!r} raised {type(err).__name__}: {err} on "
                       f"a batch of {len(prompts)} completions (no single row raises alone)")

  def _check(self, values, records) -> np.ndarray:
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__"):
      raise RewardError(f"reward function {self.name!r} returned {type(values).__name__}; "
                        f"expected a list of {len(records)} floats (or None)")
    if len(values) != len(records):
      raise RewardError(f"reward function {self.name!r} returned {len(values)} values for "
                        f"{len(records)} completions; expected one per completion")
    out = np.empty(len(records), np.float64)
    for i, value in enumerate(list(values)):
      if value is None:
        out[i] = np.nan
        continue
      try:
        out[i] = float(value)
      except (TypeError, ValueError):
        raise RewardError(f"reward function {self.name!r} returned {value!r}; expected a float "
                          f"or None", where=_where(records[i])) from None
      if not math.isfinite(out[i]):
        raise RewardError(f"reward function {self.name!r} returned {value!r}; expected a finite "
                          f"float (None: not applicable)", where=_where(records[i]))
    return out


def _where(record) -> str:
  """The prompt record's row, named as data errors name it (see `TokenizedPrompt.where`)."""
  if callable(where := getattr(record, "where", None)):
    return where()
  from rlhf_jax.data.formats import row_where  # noqa: PLC0415
  return row_where(getattr(record, "source", None), getattr(record, "row", None))


def _defaults(fn) -> set[str]:
  return {name for name, p in inspect.signature(fn).parameters.items()
          if p.default is not inspect.Parameter.empty}
