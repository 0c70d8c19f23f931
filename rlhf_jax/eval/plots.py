"""Figures and tables of a comparison run: the reward-vs-KL frontier and over-optimisation.

`rows` are per-method results: {"method", "gold_reward", "proxy_reward", "kl", "length",
"win_rate", "seconds", "trajectory": [eval records with gold_reward, proxy_reward, kl]}.
`best_of_n` are points {"n", "kl", "kl_estimate", "gold_reward", "proxy_reward"}.
"""

from __future__ import annotations

import pathlib

import numpy as np

__all__ = ["comparison_table", "frontier", "overoptimization"]


def comparison_table(rows: list[dict], best_of_n: list[dict] = ()) -> str:
  lines = ["| method | gold reward | proxy reward | KL to SFT | length | gold win rate vs SFT "
           "| length bias | wall time |", "|---|---|---|---|---|---|---|---|"]
  fmt = lambda row, key, spec: format(row[key], spec) if row.get(key) is not None else "-"
  for row in rows:
    lines.append(f"| {row['method']} | {fmt(row, 'gold_reward', '.3f')} | "
                 f"{fmt(row, 'proxy_reward', '.3f')} | {fmt(row, 'kl', '.2f')} | "
                 f"{fmt(row, 'length', '.1f')} | {fmt(row, 'win_rate', '.3f')} | "
                 f"{fmt(row, 'length_bias', '+.2f')} | {fmt(row, 'seconds', '.0f')}s |")
  for point in best_of_n:
    lines.append(f"| best-of-{point['n']} | {point['gold_reward']:.3f} | "
                 f"{point['proxy_reward']:.3f} | {point['kl']:.2f} (est. "
                 f"{point['kl_estimate']:.2f}) | - | - | - | - |")
  return "\n".join(lines)


def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def frontier(rows: list[dict], best_of_n: list[dict], path: str | pathlib.Path):
  """Gold reward against KL to the SFT policy: each method's evaluations during training."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(7, 5))
  sft = next((r for r in rows if r["method"] == "SFT"), None)
  for i, row in enumerate(r for r in rows if r["method"] != "SFT"):
    points = [(t["kl"], t["gold_reward"]) for t in row.get("trajectory", [])]
    points.append((row["kl"], row["gold_reward"]))
    if sft is not None:
      points.insert(0, (0.0, sft["gold_reward"]))
    kl, gold = np.array(points).T
    ax.plot(kl, gold, "o-", color=f"C{i}", label=row["method"], markersize=4)
  if best_of_n:
    kl = [0.0] + [p["kl"] for p in best_of_n]
    gold = ([sft["gold_reward"]] if sft else [np.nan]) + [p["gold_reward"] for p in best_of_n]
    ax.plot(kl, gold, "s--", color="k", label="best-of-N (proxy)", markersize=4)
  if sft is not None:
    ax.axhline(sft["gold_reward"], color="gray", linewidth=0.8, linestyle=":")
  ax.set_xlabel("KL(π ‖ π_SFT), nats per response")
  ax.set_ylabel("gold reward")
  ax.set_title("Reward-KL frontier on the synthetic task")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _family(method: str) -> str:
  return method.split()[0]


def overoptimization(rows: list[dict], path: str | pathlib.Path, best_of_n: list[dict] = ()):
  """Proxy (left) and gold (right) reward against sqrt(KL to SFT), Gao et al. 2022's axes.

  Every evaluation of every run of a method family (e.g. PPO at several KL coefficients, each
  evaluated during training) is one point; best-of-N uses its analytic KL. Where the proxy keeps
  rising but gold turns down, the policy is exploiting the reward model.
  """
  plt = _plt()
  fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), sharex=True)
  sft = next((r for r in rows if r["method"] == "SFT"), None)
  families: dict[str, list] = {}
  for row in rows:
    if row["method"] == "SFT":
      continue
    points = [(t["kl"], t["proxy_reward"], t["gold_reward"]) for t in row.get("trajectory", [])]
    points.append((row["kl"], row["proxy_reward"], row["gold_reward"]))
    families.setdefault(_family(row["method"]), []).extend(points)
  if best_of_n:
    families["best-of-N"] = [(p["kl"], p["proxy_reward"], p["gold_reward"]) for p in best_of_n]
  for i, (family, points) in enumerate(families.items()):
    if sft is not None:
      points = points + [(0.0, sft["proxy_reward"], sft["gold_reward"])]
    kl, proxy, gold = np.array(sorted(points)).T
    root = np.sqrt(np.maximum(kl, 0))
    style = dict(color=f"C{i}", marker="o", markersize=4, label=family)
    left.plot(root, proxy, "--", **style)
    right.plot(root, gold, "-", **style)
  left.set_title("proxy reward (the reward model being optimised)")
  right.set_title("gold reward (the truth)")
  for ax in (left, right):
    ax.set_xlabel("sqrt(KL(π ‖ π_SFT))")
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
