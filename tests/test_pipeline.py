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


def test_the_seeds_table_gives_means_with_intervals_over_seeds_and_prompts():
  from rlhf_jax.pipeline import seeds_table
  rng = np.random.default_rng(0)

  def row(method, shift):
    gold = rng.normal(shift, 0.1, 64)
    return {"method": method, "per_prompt": {
        "gold_reward": gold.tolist(), "proxy_reward": (gold + 1).tolist(),
        "kl": np.full(64, 2.0).tolist(), "length": np.full(64, 10.0).tolist(),
        "win_rate": (gold > 0).astype(float).tolist()}}

  results = [{"rows": [row("SFT", 0.0), row("PPO kl=0.05", 0.5 + 0.1 * s)],
              "best_of_n": [{"n": 4, "gold_reward": 0.3 + 0.01 * s, "proxy_reward": 1.0,
                             "kl": 0.64, "length": 12.0}]} for s in range(3)]
  table = seeds_table(results, (0, 1, 2))
  lines = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines()
           if line.startswith("| ") and "---" not in line}
  ppo = lines["PPO kl=0.05"].split(" | ")
  mean, interval = ppo[1].split(" [")
  low, high = map(float, interval.rstrip("]").split(", "))
  # Seed means 0.5, 0.6, 0.7: the pooled mean ~0.6 and an interval wider than the prompts' alone.
  assert float(mean) == pytest.approx(0.6, abs=0.03) and low < 0.55 and high > 0.65
  assert ppo[3].startswith("2.00 [2.00, 2.00]")
  assert lines["SFT"].split(" | ")[3] == "-"  # its KL to itself is trivial
  assert lines["best-of-4"].split(" | ")[1].startswith("0.310 [")
  assert "two-level bootstrap over seeds and held-out prompts" in table
