"""The README's main job, shrunk: every stage runs and the comparison is written."""

import dataclasses
import json

import numpy as np
import pytest

from rlhf_jax import embedded
from rlhf_jax.eval import diagnostics
from rlhf_jax.parallel import MeshConfig
from rlhf_jax.pipeline import PipelineConfig, Stage


@pytest.mark.slow
def test_pipeline_runs_every_stage_and_writes_the_comparison(tmp_path):
  base = embedded.ensure_assets(tmp_path / "base", hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2)
  config = dataclasses.replace(
      PipelineConfig(), output_dir=str(tmp_path / "run"), model=base, num_demonstrations=512,
      num_pairs=512, eval_prompts=32, max_new_tokens=16, eval_points=2,
      sft=Stage(steps=20, lr=3e-3), reward=Stage(steps=20),
      ppo=Stage(steps=2, batch_size=16), direct=Stage(steps=4), best_of_n=(2, 4),
      best_of_n_reference=32, mesh=MeshConfig(1, 1, 1))
  result = run(config)
  methods = [row["method"] for row in result["rows"]]
  assert methods == ["SFT", "PPO kl=0.05", "DPO β=0.1", "IPO β=0.5"]
  sft = result["rows"][0]
  assert sft["kl"] == 0.0 and sft["win_rate"] == 0.5  # the reference against itself
  for row in result["rows"][1:]:
    assert np.isfinite([row["gold_reward"], row["proxy_reward"], row["kl"]]).all()
    assert row["trajectory"], row["method"]  # evaluated during training
  assert [p["n"] for p in result["best_of_n"]] == [2, 4]
  assert result["best_of_n"][1]["kl"] == pytest.approx(diagnostics.best_of_n_kl_analytic(4))
  for point in result["best_of_n"]:  # length and cost are measured, the estimate's M reported
    assert point["reference_samples"] == 32 and 0 < point["length"] <= 16
    assert point["seconds"] > 0 and point["rm_seconds"] == result["rm_seconds"]
    assert point["kl_estimate_bias"] == pytest.approx(
        diagnostics.best_of_n_kl_estimate_bias(point["n"], 32))
  assert result["best_of_n"][1]["seconds"] == pytest.approx(2 * result["best_of_n"][0]["seconds"])
  assert result["rows"][1]["rm_seconds"] == result["rm_seconds"] > 0  # PPO needs the RM
  out = tmp_path / "run"
  table = (out / "table.md").read_text()
  assert "| PPO kl=0.05 |" in table and "s RM |" in table and "M = 32" in table
  assert json.loads((out / "results.json").read_text())["rows"][0]["method"] == "SFT"
  for figure in ("frontier.png", "overoptimization.png"):
    assert (out / figure).stat().st_size > 10_000


def run(config):
  from rlhf_jax.pipeline import run as run_pipeline
  return run_pipeline(config)
