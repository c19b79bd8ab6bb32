"""End-of-run report: the summary table and PNG plots of a run."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np

log = logging.getLogger("reporting")


def perplexity(loss: float) -> float:
  """``exp(loss)``, ``inf`` where it overflows (a diverged run's perplexity
  is a result to report, not an error)."""
  try:
    return math.exp(loss)
  except OverflowError:
    return math.inf


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
  ppl = {name: perplexity(loss) for name, loss in domain_loss.items()}
  out = {"per_domain": ppl,
         "average": perplexity(float(np.mean(list(domain_loss.values())))),
         "worst_domain": max(ppl, key=ppl.get),
         "worst": max(ppl.values())}
  if shares is not None:
    w = natural_weights(domain_loss, shares)
    out["natural"] = perplexity(math.fsum(w[n] * float(loss) for n, loss in domain_loss.items()))
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


def _palette(n: int) -> list:
  """``n`` distinct colours, in the order the series are drawn.

  matplotlib's default cycle has 10 colours, so an 11th series repeats the
  first (two clusters looked like one). Up to 10: tab10; up to 20: tab20's
  dark shades first, then its light ones (so 11 series get 10 hues and one
  light blue, not five near-identical pairs); beyond: evenly spaced samples
  of a continuous map (turbo), distinct even where neighbours are close.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  if n <= 10:
    return [matplotlib.colormaps["tab10"](i) for i in range(n)]
  if n <= 20:
    tab20 = matplotlib.colormaps["tab20"]
    return [tab20(i) for i in [*range(0, 20, 2), *range(1, 20, 2)][:n]]
  turbo = matplotlib.colormaps["turbo"]
  return [turbo(x) for x in np.linspace(0.05, 0.95, n)]


def _legend_outside(ax, handles=None, labels=None):
  """A legend to the right of the axes, never over the data: anchored just
  outside the axes' right edge; the figure's constrained layout shrinks the
  axes to make room. Long lists go in several columns (20 entries each)."""
  if handles is None:
    handles, labels = ax.get_legend_handles_labels()
  return ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                   borderaxespad=0.0, fontsize=7, ncol=1 + (len(handles) - 1) // 20)


def _pyplot():
  """pyplot on the Agg backend: files only, no display needed (runs are
  headless, and a GUI backend would open windows)."""
  # pylint: disable=g-import-not-at-top
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _loss_figure(records: list[dict], domain_names: list[str]):
  """Validation loss per domain over the steps, with the training loss."""
  plt = _pyplot()

  evals = [r for r in records if "val_loss" in r]
  train = [r for r in records if "loss" in r]
  # Wider than the axes need: the legend sits on the right.
  fig, ax = plt.subplots(figsize=(8.5, 4.5), layout="constrained")
  if train:
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], color="0.7",
            lw=1, label="train (batch mean)")
  for name, color in zip(domain_names, _palette(len(domain_names))):
    pts = [(r["step"], r["val_loss"][name]) for r in evals if name in r["val_loss"]]
    if pts:
      ax.plot(*zip(*pts), marker="o", ms=3, color=color, label=f"val {name}")
  ax.set(xlabel="step", ylabel="loss (nats/token)", title="Loss per domain")
  if ax.get_legend_handles_labels()[0]:
    _legend_outside(ax)
  return fig


def _weights_figure(weighted: list[dict], weight_labels: list[str] | None):
  """The domain weights over the steps, stacked; ``weighted`` are the records
  with ``weights``."""
  plt = _pyplot()

  steps = [r["step"] for r in weighted]
  w = np.asarray([r["weights"] for r in weighted]).T
  labels = weight_labels or [f"domain {j}" for j in range(len(w))]
  fig, ax = plt.subplots(figsize=(8.5, 4.5), layout="constrained")
  polys = ax.stackplot(steps, w, labels=labels, colors=_palette(len(w)))
  if len(set(steps)) > 1:  # no margin left and right of the bands
    ax.set_xlim(min(steps), max(steps))
  ax.set(xlabel="step", ylabel="weight", ylim=(0, 1),
         title=("Weights of the human domains" if weight_labels else
                "DoGraph weights of the model-centric domains"))
  # Top of the legend = top of the stack, as the eye reads the bands.
  _legend_outside(ax, polys[::-1], labels[::-1])
  return fig


def _heatmap_figure(contingency: np.ndarray, domain_names: list[str]):
  """Each human domain's share of samples per cluster (rows sum to 1)."""
  plt = _pyplot()

  share = contingency / np.maximum(contingency.sum(1, keepdims=True), 1)
  n_domains, n_clusters = share.shape
  longest = max((len(n) for n in domain_names), default=0)
  # Grows with the clusters (columns), the domains (rows) and the longest
  # domain name (tick labels); never narrower than the title, which was cut
  # at 3 clusters when the width followed the columns alone.
  width = max(5.5, 2.0 + 0.08 * longest + 0.45 * n_clusters)
  height = max(3.0, 1.6 + 0.4 * n_domains)
  fig, ax = plt.subplots(figsize=(width, height), layout="constrained")
  im = ax.imshow(share, cmap="viridis", vmin=0, vmax=1, aspect="auto")
  ax.set_yticks(range(n_domains), domain_names)
  ax.set_xticks(range(n_clusters))
  ax.set_xlabel("model-centric domain (cluster)")
  ax.set_title("Share of each human domain's samples per cluster", fontsize=10)
  fig.colorbar(im, ax=ax)
  return fig


def write_plots(records: list[dict], out_dir: Path, domain_names: list[str],
                contingency: np.ndarray | None, weight_labels: list[str] | None = None,
                ) -> list[Path]:
  """PNG plots: validation loss per domain, the domain weights over time
  (DoGraph's model-centric domains, or with ``weight_labels`` a baseline's
  weights of the human domains), and the cluster-versus-domain heatmap.
  Returns the written paths.

  Every series has its own colour (:func:`_palette`), legends sit outside the
  axes, and the figures are laid out (and saved with ``bbox_inches="tight"``)
  so that no title or label is cut.
  """
  plt = _pyplot()
  figures = [("loss_per_domain.png", _loss_figure(records, domain_names))]
  weighted = [r for r in records if "weights" in r]
  if weighted:
    figures.append(("domain_weights.png", _weights_figure(weighted, weight_labels)))
  if contingency is not None and contingency.sum() > 0:
    figures.append(("clusters_vs_domains.png", _heatmap_figure(contingency, domain_names)))
  written = []
  for name, fig in figures:
    written.append(out_dir / name)
    fig.savefig(written[-1], dpi=120, bbox_inches="tight")
    plt.close(fig)
  return written
