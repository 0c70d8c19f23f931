"""Figures and tables of a comparison run: the reward-vs-KL frontier and over-optimisation.

`rows` are per-method results: {"method", "gold_reward", "proxy_reward", "kl", "length",
"win_rate", "seconds", optional "rm_seconds" (the reward model a method needed, trained
separately), "trajectory": [eval records with gold_reward, proxy_reward, kl]}.
`best_of_n` are points {"n", "kl", "kl_estimate", "gold_reward", "proxy_reward", and optionally
"length", "seconds", "kl_estimate_bias"}.
"""

from __future__ import annotations

import pathlib

import numpy as np

__all__ = ["comparison_table", "frontier", "gao_fit", "overoptimization"]


def comparison_table(rows: list[dict], best_of_n: list[dict] = (), *,
                     reference_samples: int | None = None) -> str:
  """A Markdown table; wall time adds "+ Ns RM" where a method needed the reward model."""
  lines = ["| method | gold reward | proxy reward | KL to SFT | length | gold win rate vs SFT "
           "| length bias | wall time |", "|---|---|---|---|---|---|---|---|"]
  fmt = lambda row, key, spec: format(row[key], spec) if row.get(key) is not None else "-"

  def wall(row):
    if row.get("seconds") is None:
      return "-"
    extra = f" + {row['rm_seconds']:.0f}s RM" if row.get("rm_seconds") is not None else ""
    return f"{row['seconds']:.{1 if row['seconds'] < 10 else 0}f}s{extra}"

  for row in rows:
    lines.append(f"| {row['method']} | {fmt(row, 'gold_reward', '.3f')} | "
                 f"{fmt(row, 'proxy_reward', '.3f')} | {fmt(row, 'kl', '.2f')} | "
                 f"{fmt(row, 'length', '.1f')} | {fmt(row, 'win_rate', '.3f')} | "
                 f"{fmt(row, 'length_bias', '+.2f')} | {wall(row)} |")
  for point in best_of_n:
    lines.append(f"| best-of-{point['n']} | {point['gold_reward']:.3f} | "
                 f"{point['proxy_reward']:.3f} | {point['kl']:.2f} (est. "
                 f"{point['kl_estimate']:.2f}) | {fmt(point, 'length', '.1f')} | - | - | "
                 f"{wall(point)} |")
  notes = []
  alarmed = [f"{row['method']}: {', '.join(row['alarms'])}" for row in rows if row.get("alarms")]
  if alarmed:
    notes.append("Training alarms that fired (train/alarms.py): " + "; ".join(alarmed) + ".")
  if any(row.get("rm_seconds") is not None for row in [*rows, *best_of_n]):
    notes.append("\"+ Ns RM\": the reward model's training, which the method needs, is extra.")
  if best_of_n:
    note = ("best-of-N: KL analytic, log N - (N-1)/N (est.: from the proxy's empirical CDF"
            + (f" on M = {reference_samples} fresh samples per prompt" if reference_samples
               else ""))
    biases = [p["kl_estimate_bias"] for p in best_of_n if p.get("kl_estimate_bias") is not None]
    if biases:
      note += f", biased by {min(biases):+.2f}..{max(biases):+.2f} for a continuous reward"
    notes.append(note + "); wall time: sampling and scoring N candidates per prompt.")
  return "\n".join(lines + ([""] + notes if notes else []))


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


def gao_fit(d: np.ndarray, gain: np.ndarray, form: str) -> tuple[float, float]:
  """Least-squares (alpha, beta) of Gao et al. 2022's scaling forms, d = sqrt(KL to the start).

  form "best_of_n": gain(d) = d (alpha - beta d);  form "rl": gain(d) = d (alpha - beta log d),
  gain = reward - reward at d = 0. Both are linear in (alpha, beta); points with d = 0 carry no
  information and are dropped. Gao, Schulman & Hilton 2022, "Scaling Laws for Reward Model
  Overoptimization", eqs. 1-2.
  """
  d, gain = np.asarray(d, np.float64), np.asarray(gain, np.float64)
  keep = d > 0
  d, gain = d[keep], gain[keep]
  if form == "best_of_n":
    features = np.stack([d, -d * d], axis=1)
  elif form == "rl":
    features = np.stack([d, -d * np.log(d)], axis=1)
  else:
    raise ValueError(f"form={form!r}: expected 'best_of_n' or 'rl'")
  if len(d) < 2:
    raise ValueError(f"gao_fit needs at least 2 points with KL > 0, got {len(d)}")
  (alpha, beta), *_ = np.linalg.lstsq(features, gain, rcond=None)
  return float(alpha), float(beta)


def _gao_curve(d: np.ndarray, alpha: float, beta: float, form: str) -> np.ndarray:
  with np.errstate(divide="ignore", invalid="ignore"):
    shape = d * d if form == "best_of_n" else np.where(d > 0, d * np.log(d), 0.0)
  return alpha * d - beta * shape


def overoptimization(rows: list[dict], path: str | pathlib.Path, best_of_n: list[dict] = ()):
  """Proxy (left) and gold (right) reward against sqrt(KL to SFT), Gao et al. 2022's axes.

  Every evaluation of every run of a method family (e.g. PPO at several KL coefficients, each
  evaluated during training) is one point; best-of-N uses its analytic KL. Each family's points
  get the fitted curve of Gao et al.'s functional form (`gao_fit`: "best_of_n" for best-of-N,
  "rl" for the trained policies) through the SFT point. Where the proxy keeps rising but gold
  turns down, the policy is exploiting the reward model.
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
    kl, proxy, gold = np.array(sorted(points)).T
    root = np.sqrt(np.maximum(kl, 0))
    form = "best_of_n" if family == "best-of-N" else "rl"
    for ax, values, fit_style in ((left, proxy, "--"), (right, gold, "-")):
      ax.plot(root, values, "o", color=f"C{i}", markersize=4, alpha=0.7, label=family)
      if sft is None or (root > 0).sum() < 2:
        continue
      start = sft["proxy_reward"] if values is proxy else sft["gold_reward"]
      alpha, beta = gao_fit(root, values - start, form)
      grid = np.linspace(0.0, root.max(), 100)
      ax.plot(grid, start + _gao_curve(grid, alpha, beta, form), fit_style, color=f"C{i}")
  for ax, title in ((left, "proxy reward (the reward model being optimised)"),
                    (right, "gold reward (the truth)")):
    if sft is not None:
      ax.plot([0.0], [sft["proxy_reward" if ax is left else "gold_reward"]], "k*",
              markersize=9, label="SFT")
    ax.set_title(title)
    ax.set_xlabel("sqrt(KL(π ‖ π_SFT))")
    ax.legend(fontsize=8)
  fig.suptitle("points: evaluations during training; curves: Gao et al. 2022 fits", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
