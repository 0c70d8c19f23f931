"""`python -m rlhf_jax export`: any kept checkpoint of a run as a Hugging Face directory."""

import json
import pathlib

import numpy as np
import pytest

from rlhf_jax import cli, embedded
from rlhf_jax.models import hf_io

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[2] / "experiments"
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("export")
  model_dir = embedded.ensure_assets(root / "model", **TINY)
  out = root / "run"
  code = cli.main(["run", str(EXPERIMENTS / "sft.py"), "--arg", "runlocal",
                   "--set", f"model.path={model_dir}", "--set", f"run.output_dir={out}",
                   "--set", "run.steps=4", "--set", "run.checkpoint_every=2",
                   "--set", "data.eval_fraction=0", "--set", "run.progress=false"])
  assert code == 0
  return out


def test_export_of_the_last_step_is_the_runs_own_export(sft_run, tmp_path, capsys):
  assert cli.main(["export", str(sft_run), str(tmp_path / "last")]) == 0
  assert f"exported step 4 of {sft_run}" in capsys.readouterr().out
  ours, runs = (hf_io.read_safetensors(str(d)) for d in (tmp_path / "last", sft_run / "hf"))
  assert ours.keys() == runs.keys()
  for name in ours:
    np.testing.assert_array_equal(ours[name], runs[name], err_msg=name)
  assert (tmp_path / "last" / "tokenizer_config.json").exists()
  from transformers import AutoModelForCausalLM
  AutoModelForCausalLM.from_pretrained(tmp_path / "last")


def test_an_earlier_kept_step_exports_its_own_weights(sft_run, tmp_path):
  assert cli.main(["export", str(sft_run), str(tmp_path / "two"), "--step", "2"]) == 0
  early, last = (hf_io.read_safetensors(str(d)) for d in (tmp_path / "two", sft_run / "hf"))
  assert any(not np.array_equal(early[name], last[name]) for name in early)
  assert json.loads((tmp_path / "two" / "config.json").read_text())["model_type"] == "llama"


def test_export_errors_name_the_directory_and_the_steps(sft_run, tmp_path, capsys):
  assert cli.main(["export", str(sft_run), str(tmp_path / "x"), "--step", "3"]) == 2
  assert f"--step 3: {sft_run / 'checkpoints'} holds steps [2, 4]" in capsys.readouterr().err
  assert cli.main(["export", str(tmp_path), str(tmp_path / "x")]) == 2
  assert f"{tmp_path / 'config.json'}: no config.json" in capsys.readouterr().err
  (tmp_path / "pipe").mkdir()
  (tmp_path / "pipe" / "config.json").write_text(json.dumps({"trainer": "pipeline"}))
  assert cli.main(["export", str(tmp_path / "pipe"), str(tmp_path / "x")]) == 2
  assert "trainer 'pipeline' has no single policy to export" in capsys.readouterr().err
