"""End-of-run report: the summary table and PNG plots of a run."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np

log = logging.getLogger("reporting")


def natural_weights(names, shares: Mapping[str, float]) -> dict[str, float]:
  """The corpus's token shares of the domains ``names``, renormalised to sum to 1.

  ``shares``: ``{domain: share}`` (a run's ``token_shares``: each domain's
  fraction of the corpus's tokens). Domains of ``shares`` not in ``names``
  (e.g. a training domain without validation rows) are dropped before the
  renormalisation, so the weights describe the mixture of what was evaluated.

  Raises:
    ValueError: a domain of ``names`` has no share, or its share is not a
      positive finite number.
  """
  names = list(names)
  missing = [n for n in names if n not in shares]
  if missing:
    raise ValueError(f"token shares miss the evaluated domain(s) {missing} (shares given for "
                     f"{sorted(shares)}): the natural-mixture perplexity needs every one")
  values, bad = {}, {}
  for n in names:
    try:
      values[n] = float(shares[n])
    except (TypeError, ValueError):
      values[n] = math.nan
    if not (math.isfinite(values[n]) and values[n] > 0):
      bad[n] = shares[n]
  if bad:
    raise ValueError(f"token shares must be positive and finite numbers; got {bad}")
  total = math.fsum(values.values())
  return {n: v / total for n, v in values.items()}


def perplexities(domain_loss: dict[str, float],
                 shares: Mapping[str, float] | None = None) -> dict:
  """Per-domain perplexity and the aggregates of the summary.

  With ``loss_d`` the mean token loss of domain ``d`` on its validation rows
  (nats/token) and ``D`` the evaluated domains:

  * ``average`` = ``exp(mean_d loss_d)``: every domain counts equally,
    whatever its size (the geometric mean of the domain perplexities);
  * ``worst`` = ``max_d exp(loss_d)``, the largest domain perplexity, and
    ``worst_domain`` its name;
  * ``natural`` (only when ``shares`` is given) = ``exp(sum_d s_d loss_d)``
    with ``s_d`` the corpus's token shares renormalised over ``D``
    (:func:`natural_weights`): the perplexity of the corpus as a whole, its
    big domains counting as much as they weigh. A method that lifts the small
    domains by giving up the big ones shows it here.

  Raises:
    ValueError: ``shares`` misses an evaluated domain or has a share that is
      not positive and finite.
  """
  ppl = {name: math.exp(loss) for name, loss in domain_loss.items()}
  out = {"per_domain": ppl,
         "average": math.exp(float(np.mean(list(domain_loss.values())))),
         "worst_domain": max(ppl, key=ppl.get),
         "worst": max(ppl.values())}
  if shares is not None:
    w = natural_weights(domain_loss, shares)
    out["natural"] = math.exp(math.fsum(w[n] * float(loss) for n, loss in domain_loss.items()))
  return out


def run_natural(summary: Mapping) -> float | None:
  """The natural-mixture perplexity of a finished run, recomputed from its
  ``summary.json`` (``val_loss`` and ``token_shares``) rather than read from
  a stored number, so runs of every version are treated alike.

  ``None`` where it cannot be computed: a run from before ``token_shares``
  existed, or shares that do not cover its evaluated domains (logged).
  """
  shares = summary.get("token_shares")
  if not shares:
    return None
  try:
    return perplexities(summary["val_loss"], shares)["natural"]
  except ValueError as e:
    log.warning("natural-mixture perplexity left out: %s", e)
    return None


def summary_table(title: str, domain_loss: dict[str, float], steps_per_s: float,
                  shares: Mapping[str, float] | None = None) -> str:
  """The end-of-run table: loss and perplexity per domain, then the average,
  the natural mixture (when ``shares``, the token shares, are given; see
  :func:`perplexities`) and the worst domain."""
  p = perplexities(domain_loss, shares)
  width = max(15 if "natural" in p else 12, *(len(n) for n in domain_loss))
  lines = [title, f"{'domain':<{width}}  {'val loss':>9}  {'val ppl':>9}",
           "-" * (width + 22)]
  for name, loss in domain_loss.items():
    lines.append(f"{name:<{width}}  {loss:9.4f}  {p['per_domain'][name]:9.3f}")
  lines.append("-" * (width + 22))
  lines.append(f"{'average':<{width}}  {'':>9}  {p['average']:9.3f}")
  if "natural" in p:
    lines.append(f"{'natural mixture':<{width}}  {'':>9}  {p['natural']:9.3f}")
  lines.append(f"{'worst':<{width}}  {p['worst_domain']:>9}  {p['worst']:9.3f}")
  lines.append(f"steps/s: {steps_per_s:.2f}")
  return "\n".join(lines)


def write_plots(records: list[dict], out_dir: Path, domain_names: list[str],
                contingency: np.ndarray | None, weight_labels: list[str] | None = None,
                ) -> list[Path]:
  """PNG plots: validation loss per domain, the domain weights over time
  (DoGraph's model-centric domains, or with ``weight_labels`` a baseline's
  weights of the human domains), and the cluster-versus-domain heatmap.
  Returns the written paths."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  written = []
  evals = [r for r in records if "val_loss" in r]
  train = [r for r in records if "loss" in r]
  fig, ax = plt.subplots(figsize=(7, 4.5))
  if train:
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], color="0.7",
            lw=1, label="train (batch mean)")
  for name in domain_names:
    pts = [(r["step"], r["val_loss"][name]) for r in evals if name in r["val_loss"]]
    if pts:
      ax.plot(*zip(*pts), marker="o", ms=3, label=f"val {name}")
  ax.set(xlabel="step", ylabel="loss (nats/token)", title="Loss per domain")
  ax.legend(fontsize=7)
  fig.tight_layout()
  written.append(out_dir / "loss_per_domain.png")
  fig.savefig(written[-1], dpi=120)
  plt.close(fig)

  weighted = [r for r in records if "weights" in r]
  if weighted:
    steps = [r["step"] for r in weighted]
    w = np.asarray([r["weights"] for r in weighted]).T
    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = weight_labels or [f"domain {j}" for j in range(len(w))]
    ax.stackplot(steps, w, labels=labels)
    ax.set(xlabel="step", ylabel="weight", ylim=(0, 1),
           title=("Weights of the human domains" if weight_labels else
                  "DoGraph weights of the model-centric domains"))
    ax.legend(fontsize=6, ncol=2, loc="upper right")
    fig.tight_layout()
    written.append(out_dir / "domain_weights.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

  if contingency is not None and contingency.sum() > 0:
    share = contingency / np.maximum(contingency.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.5 + 0.5 * share.shape[1], 1.2 + 0.45 * share.shape[0]))
    im = ax.imshow(share, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_yticks(range(len(domain_names)), domain_names)
    ax.set_xticks(range(share.shape[1]))
    ax.set(xlabel="model-centric domain (cluster)",
           title="Share of each human domain's samples per cluster")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    written.append(out_dir / "clusters_vs_domains.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
  return written
