"""End-of-run report: the summary table and PNG plots of a run."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def perplexities(domain_loss: dict[str, float]) -> dict[str, float]:
  """Per-domain perplexity and the aggregates of the summary.

  ``average`` is ``exp(mean over domains of the domain's mean token loss)``:
  every domain counts equally, whatever its size (the geometric mean of the
  domain perplexities); ``worst`` is the largest domain perplexity.
  """
  ppl = {name: math.exp(loss) for name, loss in domain_loss.items()}
  return {"per_domain": ppl,
          "average": math.exp(float(np.mean(list(domain_loss.values())))),
          "worst_domain": max(ppl, key=ppl.get),
          "worst": max(ppl.values())}


def summary_table(title: str, domain_loss: dict[str, float], steps_per_s: float) -> str:
  p = perplexities(domain_loss)
  width = max(12, *(len(n) for n in domain_loss))
  lines = [title, f"{'domain':<{width}}  {'val loss':>9}  {'val ppl':>9}",
           "-" * (width + 22)]
  for name, loss in domain_loss.items():
    lines.append(f"{name:<{width}}  {loss:9.4f}  {p['per_domain'][name]:9.3f}")
  lines.append("-" * (width + 22))
  lines.append(f"{'average':<{width}}  {'':>9}  {p['average']:9.3f}")
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
