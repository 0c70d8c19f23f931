"""Typed experiment configs: frozen dataclasses, dotted overrides, and experiment files.

An experiment file is a small Python file whose `get_config(arg=None)` returns a frozen dataclass
tree with a `trainer` field naming what runs it. `--set section.key=value` overrides are parsed
with the field's type; a key that does not exist is an error suggesting the nearest valid one, so
a typo never silently trains the default.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import json
import pathlib
import re
import traceback
import types
import typing
from typing import Any

from rlhf_jax.errors import UserError

__all__ = [
    "ConfigError",
    "require",
    "choices",
    "check_choices",
    "apply_overrides",
    "config_keys",
    "load_experiment",
    "to_dict",
    "from_dict",
]


class ConfigError(UserError):
  """A config that cannot be what the user meant: unknown key, bad value, bad experiment file."""


def require(ok: bool, key: str, expected: str, value):
  """The one range check of config values, for `validate()` methods: a ConfigError
  '<key>: expected <expected>, got <value>' unless `ok`."""
  if not ok:
    raise ConfigError(f"expected {expected}, got {value!r}", where=key)


def choices(hint) -> tuple | None:
  """The values a `Literal[...]` field (or `Literal[...] | None`, None included) allows; None
  for a field of any other type."""
  if typing.get_origin(hint) is typing.Literal:
    return typing.get_args(hint)
  if typing.get_origin(hint) in (typing.Union, types.UnionType):
    args = typing.get_args(hint)
    literals = [a for a in args if typing.get_origin(a) is typing.Literal]
    if literals and all(a is type(None) or a in literals for a in args):
      allowed = tuple(v for a in literals for v in typing.get_args(a))
      return allowed + ((None,) if type(None) in args else ())
  return None


def _choice_error(key: str, allowed: tuple, value) -> ConfigError:
  return ConfigError(f"expected one of {', '.join(map(repr, allowed))}, got {value!r}",
                     where=key)


def check_choices(config, prefix: str = ""):
  """Every `Literal[...]` field of the config tree holds one of its values: a ConfigError
  '<prefix><key>: expected one of 'a', 'b', got 'c'' for the first that does not. The one
  check of choice fields, for `validate()` methods (`prefix` names the section, e.g. "loss.")
  and for a config built in an experiment file (apply_overrides checks the whole tree)."""
  hints = _field_types(type(config))
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    if dataclasses.is_dataclass(value):
      check_choices(value, f"{prefix}{field.name}.")
    elif (allowed := choices(hints[field.name])) is not None and value not in allowed:
      raise _choice_error(f"{prefix}{field.name}", allowed, value)


def config_keys(config) -> list[str]:
  """All dotted leaf keys of a config tree, e.g. ['model.path', 'optimizer.lr', ...]."""
  keys = []
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    if dataclasses.is_dataclass(value):
      keys += [f"{field.name}.{key}" for key in config_keys(value)]
    else:
      keys.append(field.name)
  return keys


def _field_types(cls) -> dict[str, Any]:
  return typing.get_type_hints(cls)


def _coerce(raw: str, hint, key: str):
  """Parses the string `raw` as a value of type `hint`; ConfigError naming `key` otherwise."""
  origin = typing.get_origin(hint)
  args = typing.get_args(hint)
  if (allowed := choices(hint)) is not None:
    for option in (a for a in allowed if a is not None):  # a value "none" is the value
      try:
        value = _coerce(raw, type(option), key)
      except ConfigError:
        continue
      if value == option:
        return value
    if None in allowed and raw.strip().lower() in ("none", "null"):
      return None
    raise _choice_error(key, allowed, raw)
  if origin in (typing.Union, types.UnionType):
    if type(None) in args and raw.strip().lower() in ("none", "null"):
      return None
    errors = []
    for option in (a for a in args if a is not type(None)):
      try:
        return _coerce(raw, option, key)
      except ConfigError as err:
        errors.append(str(err))
    raise ConfigError(f"{key}: cannot parse {raw!r} as {hint}: " + "; ".join(errors))
  if hint is bool:
    lowered = raw.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
      return True
    if lowered in ("false", "0", "no", "off"):
      return False
    raise ConfigError(f"{key}: expected a boolean (true/false), got {raw!r}")
  if hint in (int, float):
    try:
      value = ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError):
      raise ConfigError(f"{key}: expected {hint.__name__}, got {raw!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f"{key}: expected {hint.__name__}, got {raw!r}")
    if hint is int and float(value) != int(value):
      raise ConfigError(f"{key}: expected an integer, got {raw!r}")
    return hint(value)
  if hint is str:
    return raw
  if origin in (tuple, list):
    try:
      value = ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError):
      value = [part.strip() for part in _split_top_level(raw) if part.strip()]
    if not isinstance(value, (list, tuple)):
      value = [value]
    item_hint = args[0] if args else str
    items = [_coerce(str(item), item_hint, key) for item in value]
    return tuple(items) if origin is tuple else list(items)
  if origin is dict or hint is dict:
    try:
      value = json.loads(raw)
    except json.JSONDecodeError:
      raise ConfigError(f"{key}: expected a JSON object, got {raw!r}") from None
    if not isinstance(value, dict):
      raise ConfigError(f"{key}: expected a JSON object, got {raw!r}")
    return value
  raise ConfigError(f"{key}: cannot set a value of type {hint} from the command line")


def _split_top_level(raw: str) -> list[str]:
  """'a,f(x=1,y=2),b' -> ['a', 'f(x=1,y=2)', 'b']: commas inside brackets do not split."""
  parts, depth, current = [], 0, []
  for char in raw:
    depth += {"(": 1, "[": 1, ")": -1, "]": -1}.get(char, 0)
    if char == "," and depth == 0:
      parts.append("".join(current))
      current = []
    else:
      current.append(char)
  return parts + ["".join(current)]


def _initials(name: str) -> str:
  return "".join(word[0] for word in name.split("_") if word)


def _nearest_key(key: str, candidates: list[str]) -> str | None:
  """The valid key the user most likely meant by `key`, or None.

  In order: a close match of the whole dotted key; a close match of the leaf within the same
  section; an abbreviation either way ("learning_rate" <-> "lr", by initials); the same leaf in
  another section (a typo in the section name).
  """
  close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.75)
  if close:
    return close[0]
  section, _, leaf = key.rpartition(".")
  siblings = {k.rpartition(".")[2]: k for k in candidates if k.rpartition(".")[0] == section}
  close = difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.6)
  if close:
    return siblings[close[0]]
  for sibling, full in siblings.items():
    if leaf == _initials(sibling) or sibling == _initials(leaf):
      return full
  close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
  if close:
    return close[0]
  same_leaf = [k for k in candidates if k.rpartition(".")[2] == leaf]
  return same_leaf[0] if same_leaf else None


def _set(config, parts: list[str], raw: str, full_key: str, root):
  field_names = [field.name for field in dataclasses.fields(config)]
  name = parts[0]
  if name not in field_names:
    close = _nearest_key(full_key, config_keys(root))
    hint = f"; did you mean {close!r}?" if close else ""
    raise ConfigError(f"unknown config key {full_key!r}{hint}")
  current = getattr(config, name)
  if len(parts) > 1:
    if not dataclasses.is_dataclass(current):
      raise ConfigError(f"{'.'.join(full_key.split('.')[:-len(parts) + 1])!r} is a value, "
                        f"not a section, so {full_key!r} does not exist")
    return dataclasses.replace(config, **{name: _set(current, parts[1:], raw, full_key, root)})
  if dataclasses.is_dataclass(current):
    raise ConfigError(f"{full_key!r} is a section; set one of its keys: "
                      + ", ".join(f"{full_key}.{k}" for k in config_keys(current)[:8]))
  value = _coerce(raw, _field_types(type(config))[name], full_key)
  return dataclasses.replace(config, **{name: value})


def apply_overrides(config, overrides: typing.Iterable[str], *, check=None):
  """Returns `config` with each "dotted.key=value" applied (parsed by the field's type), then
  `check(config)` if given (the CLI's trainer check), `check_choices` and the config's own
  `validate()`."""
  for override in list(overrides):
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
      raise ConfigError(f"override {override!r} is not of the form dotted.key=value")
    key = key.strip()
    config = _set(config, key.split("."), raw, key, config)
  if check is not None:
    check(config)
  check_choices(config)
  if callable(validate := getattr(config, "validate", None)):
    try:
      validate()
    except UserError:
      raise
    except ValueError as err:
      raise ConfigError(str(err)) from err
  return config


def to_dict(config) -> dict:
  """A JSON-ready dict of the config tree (the run directory's config.json)."""
  return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def from_dict(cls, data: dict):
  """Rebuilds a config tree of class `cls` from `to_dict`'s output; unknown keys are errors."""
  hints = _field_types(cls)
  names = {field.name for field in dataclasses.fields(cls)}
  unknown = sorted(set(data) - names)
  if unknown:
    raise ConfigError(f"{cls.__name__}: unknown keys {unknown}")
  values = {}
  for name, value in data.items():
    hint = hints[name]
    if dataclasses.is_dataclass(hint):
      value = from_dict(hint, value)
    elif typing.get_origin(hint) is tuple and isinstance(value, list):
      value = tuple(value)
    values[name] = value
  return cls(**values)


def _experiment_error(path: pathlib.Path, doing: str, err: BaseException) -> ConfigError:
  """`err` (raised while importing or calling an experiment file) as a ConfigError naming the
  file and the line of that file where it happened."""
  def is_the_file(filename):
    return bool(filename) and pathlib.Path(filename).resolve() == path.resolve()

  if isinstance(err, SyntaxError) and is_the_file(err.filename):
    return ConfigError(f"expected valid Python, got a syntax error: {err.msg}",
                       where=f"{path}:{err.lineno}")
  line = None
  for frame in traceback.extract_tb(err.__traceback__):
    if is_the_file(frame.filename):
      line = frame.lineno  # the innermost line of the experiment file
  where = f"{path}:{line}" if line is not None else str(path)
  return ConfigError(f"{doing} raised {type(err).__name__}: {err}", where=where)


def load_experiment(path: str | pathlib.Path, arg: str | None = None):
  """Imports an experiment file and returns its `get_config(arg)`.

  The file's own faults (a syntax error, no get_config, an exception while importing it or
  calling get_config) are ConfigErrors naming the file and line.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise ConfigError(f"experiment file {str(path)!r} does not exist")
  spec = importlib.util.spec_from_file_location(f"rlhf_jax_experiment_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except UserError:
    raise
  except Exception as err:  # noqa: BLE001 — any fault of the user's file is reported as theirs
    raise _experiment_error(path, "importing it", err) from err
  get_config = getattr(module, "get_config", None)
  if not callable(get_config):
    found = "a non-callable get_config" if get_config is not None else "no get_config"
    raise ConfigError(f"an experiment file must define get_config(arg=None) returning a "
                      f"config, got {found}", where=str(path))

  def call(*args):
    try:
      return get_config(*args)
    except UserError:
      raise
    except Exception as err:  # noqa: BLE001
      raise _experiment_error(path, f"get_config({', '.join(map(repr, args))})", err) from err

  config = call(arg) if arg is not None else call()
  if not dataclasses.is_dataclass(config) or not hasattr(config, "trainer"):
    raise ConfigError(f"{path}: get_config() must return a config dataclass with a 'trainer' "
                      f"field, got {type(config).__name__}")
  if arg is not None and to_dict(config) == to_dict(call()):
    # get_config ignores args it does not know: a typo would silently run the default.
    documented = sorted(set(re.findall(r"--arg[ =](\w+)", module.__doc__ or "")))
    raise ConfigError(f"--arg {arg!r} changes nothing in {path.name}"
                      + (f"; it documents: {', '.join(documented)}" if documented else ""))
  return config
