"""A preference bandit: every loss in PREFERENCE_LOSSES on a tabular softmax policy.

Prompts x and responses y are table indices; the policy is softmax(θ[x]) and the reference is
uniform. A gold reward r*(x, y) is drawn once; preference data is a finite sample of pairs labelled
by Bradley-Terry on r*. One prompt (the "one-sided" prompt) only ever has the pair (y0, y1)
observed, and always as y0 ≻ y1. Every loss is trained on the same data with optax.

This is Azar et al. 2023 (arXiv 2310.12036), section 5.1, made runnable: with a preference that is
only ever observed one way, the DPO loss -log σ(β h) has no finite minimiser, so π(y0) → 1 whatever
β (the KL regulariser is ignored), while IPO's (h - 1/(2β))² stops at h = 1/(2β), a regularised,
β-dependent solution.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax import losses

__all__ = ["BanditConfig", "PreferenceData", "make_data", "train_loss", "run"]


@dataclasses.dataclass(frozen=True)
class BanditConfig:
  trainer: str = "bandit"
  num_prompts: int = 3
  num_responses: int = 4
  pairs_per_prompt: int = 24  # for every prompt but the one-sided one
  one_sided_count: int = 3  # how often y0 ≻ y1 is observed on the one-sided prompt
  betas: tuple[float, ...] = (0.1, 1.0)
  losses: tuple[str, ...] = ()  # empty: every registered pairwise loss
  steps: int = 3000
  lr: float = 0.05
  log_every: int = 25
  seed: int = 0
  output_dir: str = "runs/bandit"

  def validate(self):
    if self.num_responses < 2:
      raise ValueError(f"num_responses must be >= 2, got {self.num_responses}")
    unknown = sorted(set(self.losses) - set(losses.PREFERENCE_LOSSES))
    if unknown:
      raise ValueError(f"unknown losses {unknown}; known: {sorted(losses.PREFERENCE_LOSSES)}")


@dataclasses.dataclass(frozen=True)
class PreferenceData:
  """Finite pairwise data. `prompt`, `chosen`, `rejected` are int arrays [N]."""
  gold_reward: np.ndarray  # [num_prompts, num_responses]
  prompt: np.ndarray
  chosen: np.ndarray
  rejected: np.ndarray


def make_data(config: BanditConfig) -> PreferenceData:
  """Draws gold rewards and Bradley-Terry-labelled pairs; prompt 0 is the one-sided prompt."""
  rng = np.random.default_rng(config.seed)
  gold = rng.normal(size=(config.num_prompts, config.num_responses))
  gold[0, 0], gold[0, 1] = 1.0, 0.0  # y0 is truly better on the one-sided prompt
  prompt, chosen, rejected = [], [], []
  for _ in range(config.one_sided_count):
    prompt.append(0), chosen.append(0), rejected.append(1)
  for x in range(1, config.num_prompts):
    for _ in range(config.pairs_per_prompt):
      a, b = rng.choice(config.num_responses, size=2, replace=False)
      a_wins = rng.random() < 1.0 / (1.0 + np.exp(gold[x, b] - gold[x, a]))
      prompt.append(x)
      chosen.append(a if a_wins else b)
      rejected.append(b if a_wins else a)
  return PreferenceData(gold, np.array(prompt), np.array(chosen), np.array(rejected))


def _hparams_for(name: str, beta: float) -> dict:
  entry = losses.PREFERENCE_LOSSES[name]
  return {"beta": beta} if "beta" in entry.defaults else {}


def train_loss(name: str, beta: float, data: PreferenceData, config: BanditConfig):
  """Trains tabular logits with one loss; returns the policy's probabilities every log_every steps.

  Returns: probs [num_logs + 1, num_prompts, num_responses] (the first row is the reference).
  """
  loss_fn = losses.PREFERENCE_LOSSES[name]
  hparams = _hparams_for(name, beta)
  num_prompts, num_responses = data.gold_reward.shape
  ref_logps = jnp.full((num_prompts, num_responses), -np.log(num_responses), jnp.float32)
  prompt, chosen, rejected = (jnp.asarray(a) for a in (data.prompt, data.chosen, data.rejected))
  optimizer = optax.adam(config.lr)

  def objective(logits):
    logps = jax.nn.log_softmax(logits, axis=-1)
    pc, pr = logps[prompt, chosen], logps[prompt, rejected]
    rc, rr = ref_logps[prompt, chosen], ref_logps[prompt, rejected]
    return jnp.mean(loss_fn(pc, pr, rc, rr, **hparams))

  def step(carry, _):
    logits, opt_state = carry
    grads = jax.grad(objective)(logits)
    updates, opt_state = optimizer.update(grads, opt_state, logits)
    return (optax.apply_updates(logits, updates), opt_state), None

  def block(carry, _):
    carry, _ = jax.lax.scan(step, carry, None, length=config.log_every)
    return carry, jax.nn.softmax(carry[0], axis=-1)

  @jax.jit
  def train(logits):
    num_blocks = config.steps // config.log_every
    _, probs = jax.lax.scan(block, (logits, optimizer.init(logits)), None, length=num_blocks)
    return jnp.concatenate([jax.nn.softmax(logits, axis=-1)[None], probs])

  return np.asarray(train(jnp.zeros((num_prompts, num_responses), jnp.float32)))


def summarise(probs: np.ndarray, gold: np.ndarray) -> dict:
  """Final-policy figures: probabilities on the one-sided prompt, KL to uniform, gold reward."""
  final = probs[-1].astype(np.float64)
  safe = np.where(final > 0, final, 1.0)  # 0·log 0 = 0
  kl = np.sum(final * (np.log(safe) + np.log(final.shape[-1])), axis=-1)
  return {
      "one_sided_probs": final[0].tolist(),
      "kl_to_ref": float(kl.mean()),
      "gold_reward": float(np.sum(final * gold, axis=-1).mean()),
  }


def _table(rows: list[dict]) -> str:
  lines = ["| loss | beta | π(y0) π(y1) π(y2).. on one-sided prompt | KL to ref | gold reward |",
           "|---|---|---|---|---|"]
  for row in rows:
    probs = " ".join(f"{p:.3f}" for p in row["one_sided_probs"])
    beta = "-" if row["beta"] is None else f"{row['beta']:g}"
    lines.append(f"| {row['loss']} | {beta} | {probs} | {row['kl_to_ref']:.3f} | "
                 f"{row['gold_reward']:.3f} |")
  return "\n".join(lines)


def _plot(trajectories: dict, config: BanditConfig, path: pathlib.Path):
  """Left: DPO vs IPO at every β, with IPO's closed-form optimum. Right: every loss at one β."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [1, 1.3]})
  steps = np.arange(next(iter(trajectories.values())).shape[0]) * config.log_every
  for i, beta in enumerate(config.betas):
    for name, style in (("dpo", "-"), ("ipo", "--")):
      if (name, beta) in trajectories:
        left.plot(steps, trajectories[name, beta][:, 0, 0], style, color=f"C{i}", linewidth=2,
                  label=f"{name.upper()} β={beta:g}")
    # IPO's minimiser h = 1/(2β), with θ0 and θ1 moving symmetrically and y2, y3 untouched.
    e = np.exp(1 / (4 * beta))
    left.axhline(e / (e + 1 / e + config.num_responses - 2), color=f"C{i}", linewidth=0.8,
                 linestyle=":")
  left.set_title("One-sided preference y0 ≻ y1 (Azar et al. 2023, §5.1)\n"
                 "dotted: IPO's closed-form optimum", fontsize=10)
  beta = config.betas[0]
  colors = plt.get_cmap("tab20")
  for i, ((name, b), probs) in enumerate(sorted((k, v) for k, v in trajectories.items()
                                              if k[1] in (beta, None))):
    right.plot(steps, probs[:, 0, 0], color=colors(i % 20), linewidth=1.5,
               linestyle="-" if i < 20 else "--", label=name)
  right.set_title(f"Every registered loss, β={beta:g}", fontsize=10)
  right.legend(fontsize=7, ncol=1, loc="center left", bbox_to_anchor=(1.01, 0.5))
  for ax in (left, right):
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("π(y0 | one-sided prompt)")
    ax.set_ylim(0, 1.02)
  left.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def run(config: BanditConfig) -> dict:
  """Trains every loss at every β, prints the table, writes table.md, results.json and a PNG."""
  config.validate()
  start = time.time()
  data = make_data(config)
  names = config.losses or tuple(sorted(losses.PREFERENCE_LOSSES))
  rows, trajectories = [], {}
  for name in names:
    takes_beta = "beta" in losses.PREFERENCE_LOSSES[name].defaults
    for beta in (config.betas if takes_beta else (None,)):
      probs = train_loss(name, beta if beta is not None else 0.0, data, config)
      trajectories[name, beta] = probs
      rows.append({"loss": name, "beta": beta, **summarise(probs, data.gold_reward)})
  table = _table(rows)
  print(table)
  out = pathlib.Path(config.output_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / "table.md").write_text(table + "\n")
  (out / "results.json").write_text(json.dumps(rows, indent=2))
  _plot(trajectories, config, out / "trajectories.png")
  print(f"wrote {out / 'table.md'}, {out / 'results.json'}, {out / 'trajectories.png'} "
        f"({time.time() - start:.1f}s)")
  return {"rows": rows, "trajectories": trajectories}
