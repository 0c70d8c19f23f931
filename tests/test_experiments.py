"""Every command that the experiment files and the README document parses into a valid config.

A documented recipe that no longer matches the config (a renamed key, a removed --arg, a value
its validate() rejects) fails here, without training anything.
"""

import pathlib
import re
import shlex

import pytest

from rlhf_jax import cli
from rlhf_jax import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((ROOT / "experiments").glob("*.py"))


def _documented_commands(text: str) -> list[str]:
  """`python -m rlhf_jax run ...` commands in `text`, continuation lines joined, comments cut."""
  joined = re.sub(r"\\\n\s*", " ", text)
  commands = []
  for line in joined.splitlines():
    match = re.search(r"python -m rlhf_jax run (\S+\.py.*)", line)
    if match:
      command = match.group(1).split(" #")[0].split("`")[0].strip()
      if command.count('"') % 2:  # the end of a quoted --command "..." around it
        command = command[:command.rindex('"')]
      commands.append(command)
  return commands


def _words(command: str) -> list[str]:
  """The command's words, up to the shell around it (&, ;, |)."""
  lexer = shlex.shlex(command, posix=True, punctuation_chars="&;|")
  lexer.whitespace_split = True
  words = []
  for word in lexer:
    if word and set(word) <= set("&;|"):
      break
    words.append(word)
  return words


def _cases():
  cases = []
  for path in EXPERIMENTS:
    text = path.read_text()
    docstring = text.split('"""')[1]
    cases += [(path.name, command) for command in _documented_commands(docstring)]
  cases += [("README.md", command) for command in
            _documented_commands((ROOT / "README.md").read_text())]
  return cases


CASES = _cases()


def test_every_experiment_documents_how_to_run_it():
  documented = {pathlib.Path(_words(command)[0]).name for _, command in CASES}
  assert documented >= {path.name for path in EXPERIMENTS}


@pytest.mark.parametrize("where, command", CASES, ids=[f"{w}:{c[:60]}" for w, c in CASES])
def test_documented_command_gives_a_valid_config(where, command):
  words = _words(command)
  path = ROOT / "experiments" / pathlib.Path(words[0]).name
  assert path.exists(), f"{where} names a missing experiment {words[0]}"
  try:  # the CLI's own parser: an unknown option fails as it would for a user
    args = cli._parser().parse_args(["run", *words])
  except SystemExit:
    pytest.fail(f"{where}: the CLI does not parse {command!r}")
  config = config_lib.load_experiment(path, args.arg)
  config = config_lib.apply_overrides(config, args.overrides)
  if hasattr(config, "validate"):
    config.validate()
  assert config.trainer in cli.TRAINERS


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.name for p in EXPERIMENTS])
def test_runlocal_shrinks_every_experiment(path):
  full, local = config_lib.load_experiment(path), config_lib.load_experiment(path, "runlocal")
  assert local.trainer == full.trainer
  assert config_lib.to_dict(local) != config_lib.to_dict(full)
