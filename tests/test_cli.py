"""The CLI runs a tiny experiment end to end and rejects bad configs with a clear message."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from rlhf_jax import embedded

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1)


def _cli(*args, cwd=None):
  return subprocess.run([sys.executable, "-m", "rlhf_jax", *args], capture_output=True, text=True,
                        cwd=cwd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=600)


@pytest.mark.slow
def test_cli_runs_a_tiny_dpo_experiment_end_to_end(tmp_path):
  model_dir = embedded.ensure_assets(tmp_path / "model", **TINY)
  out = tmp_path / "run"
  result = _cli("run", str(EXPERIMENTS / "dpo.py"), "--arg", "runlocal",
                "--set", f"model.path={model_dir}", "--set", f"run.output_dir={out}",
                "--set", "run.steps=3", "--set", "run.batch_size=8", "--set", "data.num_rows=64",
                "--set", "loss.beta=0.05")
  assert result.returncode == 0, result.stderr[-3000:]
  printed = json.loads(result.stdout[:result.stdout.index("\n}\n") + 2])  # the final config
  assert printed["loss"]["beta"] == 0.05
  steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
           if json.loads(line)["split"] == "train"]
  assert steps == [1, 2, 3]
  assert json.loads((out / "config.json").read_text())["loss"]["beta"] == 0.05
  from transformers import AutoModelForCausalLM, AutoTokenizer
  AutoModelForCausalLM.from_pretrained(out / "hf")  # the export loads in transformers
  assert AutoTokenizer.from_pretrained(out / "hf").chat_template is not None


def test_cli_rejects_unknown_keys_with_a_suggestion():
  result = _cli("run", str(EXPERIMENTS / "dpo.py"), "--set", "loss.bta=0.2")
  assert result.returncode == 2
  assert "unknown config key 'loss.bta'; did you mean 'loss.beta'?" in result.stderr


def test_an_unknown_arg_is_an_error_not_the_default_run():
  result = _cli("run", str(EXPERIMENTS / "dpo.py"), "--arg", "runlcoal", "--print-config")
  assert result.returncode == 2
  assert "--arg 'runlcoal' changes nothing in dpo.py; it documents: rpo, runlocal" in result.stderr


def test_cli_rejects_bad_values_and_files():
  result = _cli("run", str(EXPERIMENTS / "dpo.py"), "--set", "loss.name=dpoo")
  assert result.returncode == 2 and "did you mean 'dpo'" in result.stderr
  result = _cli("run", str(EXPERIMENTS / "missing.py"))
  assert result.returncode == 2 and "does not exist" in result.stderr


def test_print_config_shows_the_final_config():
  # The issue's own example command.
  result = _cli("run", str(EXPERIMENTS / "dpo.py"), "--set", "optimizer.lr=1e-5",
                "--set", "loss.beta=0.05", "--print-config")
  assert result.returncode == 0
  printed = json.loads(result.stdout)
  assert printed["optimizer"]["lr"] == 1e-5 and printed["loss"]["beta"] == 0.05


def test_an_incomplete_multi_process_launch_is_a_clear_error():
  result = subprocess.run(
      [sys.executable, "-m", "rlhf_jax", "run", str(EXPERIMENTS / "grpo.py"), "--arg", "runlocal"],
      capture_output=True, text=True, timeout=600,
      env={**os.environ, "JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234"})
  assert result.returncode == 2
  assert ("error: a multi-process launch with JAX_COORDINATOR_ADDRESS also needs --num-processes "
          "(or JAX_NUM_PROCESSES) and --process-id (or JAX_PROCESS_ID)") in result.stderr


def test_the_synthetic_gold_reward_is_not_the_default_for_real_data():
  # A real prompt file with the embedded task's reward left at 'auto': refused before loading.
  result = _cli("run", str(EXPERIMENTS / "grpo.py"), "--set", "data.train=prompts.jsonl",
                "--print-config")
  assert result.returncode == 2
  assert ("reward.functions='auto' is the embedded task's gold reward, which applies only to "
          "synthetic:* data, but data.train is 'prompts.jsonl'") in result.stderr
  result = _cli("run", str(EXPERIMENTS / "grpo.py"), "--set", "data.train=prompts.jsonl",
                "--set", "reward.functions=rlhf_jax.rewards:math_answer", "--print-config")
  assert result.returncode == 0, result.stderr
  assert json.loads(result.stdout)["reward"]["gold_function"] == "auto"  # resolves to none


def _one_error_line(result) -> str:
  """A user error through the CLI: exit 2 and one stderr line, `error: ...`, no traceback."""
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
  return lines[0]


def test_an_unknown_config_key_is_one_line():
  line = _one_error_line(_cli("run", str(EXPERIMENTS / "dpo.py"), "--set", "optimizer.lrr=1"))
  assert line == "error: unknown config key 'optimizer.lrr'; did you mean 'optimizer.lr'?"


def test_a_wrong_choice_is_one_line_naming_the_key_and_the_choices():
  line = _one_error_line(_cli("run", str(EXPERIMENTS / "ppo.py"), "--set",
                              "loss.kl_estimator=k4", "--print-config"))
  assert line == "error: loss.kl_estimator: expected one of 'k1', 'k2', 'k3', got 'k4'"


def test_experiment_file_faults_name_the_file_and_line(tmp_path):
  (tmp_path / "no_function.py").write_text('"""An experiment without get_config."""\nX = 1\n')
  (tmp_path / "syntax.py").write_text("import dataclasses\n\ndef get_config(:\n  pass\n")
  (tmp_path / "raises.py").write_text(
      "import os\n\n\ndef get_config(arg=None):\n  settings = {}\n  return settings['model']\n")
  (tmp_path / "import_fails.py").write_text("import os\nVALUE = 1 / 0\n")
  line = _one_error_line(_cli("run", "no_function.py", cwd=tmp_path))
  assert line == ("error: no_function.py: an experiment file must define get_config(arg=None) "
                  "returning a config, got no get_config")
  line = _one_error_line(_cli("run", "syntax.py", cwd=tmp_path))
  assert line.startswith("error: syntax.py:3: expected valid Python, got a syntax error: ")
  line = _one_error_line(_cli("run", "raises.py", cwd=tmp_path))
  assert line == "error: raises.py:6: get_config() raised KeyError: 'model'"
  line = _one_error_line(_cli("run", "import_fails.py", cwd=tmp_path))
  assert line == "error: import_fails.py:2: importing it raised ZeroDivisionError: division by zero"


def test_debug_shows_the_traceback_of_a_user_error(tmp_path):
  (tmp_path / "raises.py").write_text("def get_config(arg=None):\n  return {}['model']\n")
  result = _cli("run", "raises.py", "--debug", cwd=tmp_path)
  assert result.returncode != 0 and result.returncode != 2
  assert "Traceback (most recent call last)" in result.stderr
  assert "KeyError: 'model'" in result.stderr  # the experiment's own exception, chained
  assert "rlhf_jax.config.ConfigError: raises.py:2: get_config() raised KeyError" in result.stderr


@pytest.mark.slow
def test_a_bad_data_row_names_the_file_line_and_field(tmp_path):
  # Line 2 is blank (it holds no row): the bad row is the third row, on line 4 of the file.
  (tmp_path / "data.jsonl").write_text('{"prompt": "a", "completion": "b"}\n\n'
                                       '{"prompt": "c", "completion": "d"}\n{"prompt": "e"}\n')
  model_dir = embedded.ensure_assets(tmp_path / "model", **TINY)
  result = subprocess.run(
      [sys.executable, "-m", "rlhf_jax", "run", str(EXPERIMENTS / "sft.py"),
       "--set", "data.train=data.jsonl", "--set", f"model.path={model_dir}",
       "--set", f"run.output_dir={tmp_path / 'run'}"], capture_output=True, text=True,
      cwd=tmp_path, timeout=600,
      # datasets' own progress bar would be a second stderr line; it is not ours to test.
      env={**os.environ, "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"})
  line = _one_error_line(result)
  assert line == ("error: data.jsonl, line 4, field 'completion': missing (expected a string or "
                  "a list of {role, content} messages)")


def test_a_missing_data_file_is_one_line(tmp_path):
  model_dir = embedded.ensure_assets(tmp_path / "model", **TINY)
  result = subprocess.run(
      [sys.executable, "-m", "rlhf_jax", "run", str(EXPERIMENTS / "sft.py"),
       "--set", "data.train=missing.jsonl", "--set", f"model.path={model_dir}",
       "--set", f"run.output_dir={tmp_path / 'run'}"], capture_output=True, text=True,
      cwd=tmp_path, timeout=600)
  assert _one_error_line(result) == "error: missing.jsonl: the data file does not exist"


def test_a_missing_model_directory_is_one_line(tmp_path):
  result = _cli("run", str(EXPERIMENTS / "sft.py"), "--set", "model.path=runs/absent/hf",
                "--set", f"run.output_dir={tmp_path / 'run'}", cwd=tmp_path)
  assert _one_error_line(result) == ("error: runs/absent/hf: expected a model directory, got "
                                     "nothing at that path")


def test_a_bug_keeps_its_traceback_and_a_user_error_does_not(monkeypatch, capsys):
  from rlhf_jax import cli
  from rlhf_jax.data import DataError

  def buggy(config):
    raise ZeroDivisionError("a bug in a trainer")

  monkeypatch.setattr(cli, "run_config", buggy)
  with pytest.raises(ZeroDivisionError, match="a bug in a trainer"):  # not turned into exit 2
    cli.main(["run", str(EXPERIMENTS / "sft.py")])

  def bad_row(config):
    raise DataError("rows.jsonl", 0, "prompt", "missing (expected a string)", line=1)

  monkeypatch.setattr(cli, "run_config", bad_row)
  capsys.readouterr()
  assert cli.main(["run", str(EXPERIMENTS / "sft.py")]) == 2
  assert capsys.readouterr().err == ("error: rows.jsonl, line 1, field 'prompt': missing "
                                     "(expected a string)\n")
  with pytest.raises(DataError):
    cli.main(["run", str(EXPERIMENTS / "sft.py"), "--debug"])


def test_a_trainer_is_tied_to_its_config_class():
  from rlhf_jax import cli, config as config_lib
  from rlhf_jax.config import ConfigError

  def error(experiment, trainer):
    config = config_lib.load_experiment(EXPERIMENTS / experiment)
    with pytest.raises(ConfigError) as info:
      config_lib.apply_overrides(config, [f"trainer={trainer}"], check=cli.check_trainer)
    return str(info.value)

  assert error("dpo.py", "sft") == (
      "trainer: expected a trainer that PreferenceConfig serves (preference), got 'sft', whose "
      "config class is SFTConfig (start from an experiment of that trainer)")
  # Checked before GRPOConfig.validate(), whose own complaint would not name the classes.
  assert error("grpo.py", "ppo") == (
      "trainer: expected a trainer that GRPOConfig serves (grpo, rloo), got 'ppo', whose config "
      "class is PPOConfig (start from an experiment of that trainer)")
  assert error("sft.py", "spf").startswith("trainer: expected one of the trainers ['bandit', ")
  for path in sorted(EXPERIMENTS.glob("*.py")):  # every experiment's own trainer is its config's
    cli.check_trainer(config_lib.load_experiment(path))
  assert set(cli.CONFIGS) == set(cli.TRAINERS)


def test_the_cli_refuses_another_trainers_config_in_one_line():
  result = _cli("run", str(EXPERIMENTS / "dpo.py"), "--set", "trainer=sft", "--print-config")
  assert result.returncode == 2 and result.stdout == ""
  assert _one_error_line(result) == (
      "error: trainer: expected a trainer that PreferenceConfig serves (preference), got 'sft', "
      "whose config class is SFTConfig (start from an experiment of that trainer)")


def test_a_real_model_with_the_toy_settings_gets_a_warning_naming_them():
  from rlhf_jax import cli
  from rlhf_jax.config import apply_overrides
  from rlhf_jax.train import preference
  overrides = ["model.path=Qwen/Qwen2.5-0.5B-Instruct", "optimizer.lr=5e-7"]
  config = apply_overrides(preference.PreferenceConfig(), overrides)
  warning = cli.toy_settings_warning(config, overrides)
  assert warning.startswith("model.path='Qwen/Qwen2.5-0.5B-Instruct' is a real checkpoint, but "
                            "these settings keep the experiment's values for the embedded tiny "
                            "model: run.steps=")
  assert "optimizer.lr" not in warning and "data.max_length=" in warning
  assert "generation" not in warning  # DPO has no generation section
  assert cli.toy_settings_warning(preference.PreferenceConfig(), []) is None
  every = overrides[:1] + [f"{key}=1" for key in cli.TOY_TUNED]
  assert cli.toy_settings_warning(config, every) is None


def test_a_tiny_model_built_by_embedded_gets_no_toy_settings_warning(tmp_path):
  from rlhf_jax import cli
  from rlhf_jax.config import apply_overrides
  from rlhf_jax.train import preference
  model_dir = embedded.ensure_assets(tmp_path / "model", **TINY)
  overrides = [f"model.path={model_dir}"]
  config = apply_overrides(preference.PreferenceConfig(), overrides)
  assert cli.toy_settings_warning(config, overrides) is None


def _weightless_checkpoint(path):
  """A directory that looks like a real checkpoint (a tokenizer and a config.json, not built by
  embedded) but holds no weights."""
  from rlhf_jax.data import synthetic
  synthetic.build_tokenizer().save_pretrained(path)
  (path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 128}))
  return path


def test_a_real_checkpoint_run_that_fails_prints_its_error_alone(tmp_path):
  """The toy-settings warning waits until the model has loaded: a run that fails a check
  before then (the data file) prints one line, the error; so does one whose loading fails
  (after the data's summary, an INFO line)."""
  model_dir = _weightless_checkpoint(tmp_path / "model")
  run = ["--set", f"model.path={model_dir}", "--set", f"run.output_dir={tmp_path / 'run'}"]
  result = _cli("run", str(EXPERIMENTS / "sft.py"), *run, "--set", "data.train=missing.jsonl",
                cwd=tmp_path)
  assert _one_error_line(result) == "error: missing.jsonl: the data file does not exist"
  result = _cli("run", str(EXPERIMENTS / "sft.py"), *run, cwd=tmp_path)
  assert result.returncode == 2 and "real checkpoint" not in result.stderr
  lines = result.stderr.strip().splitlines()
  assert [line.split(": ")[0].split(" ")[-1] for line in lines[:-1]] == ["rlhf_jax.data.loading"]
  assert lines[-1] == (f"error: no model.safetensors or model.safetensors.index.json in "
                       f"'{model_dir}' (only safetensors checkpoints are supported)")


def test_the_toy_settings_warning_is_logged_once_the_model_has_loaded(tiny_cli_model, caplog):
  from rlhf_jax.train import common
  common.warn_once_loaded("toy settings")
  common.resolve_model_path(str(tiny_cli_model))
  assert "toy settings" not in caplog.text  # held
  common.load_policy(common.ModelSpec(path=str(tiny_cli_model)))
  assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == ["toy settings"]
  common.load_policy(common.ModelSpec(path=str(tiny_cli_model)))  # once
  assert caplog.text.count("toy settings") == 1
  common.warn_once_loaded("dropped")
  common.discard_warnings()
  common.flush_warnings()
  assert "dropped" not in caplog.text


@pytest.fixture
def tiny_cli_model(tmp_path):
  return embedded.ensure_assets(tmp_path / "tiny", **TINY)
