"""The end-of-run plots (``reporting.write_plots``): distinct colours, legends
beside the data, nothing cut.

The figures are those ``write_plots`` itself draws and saves: ``plt.close`` is
intercepted to keep them, then inspected with the Agg renderer.
"""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from dograph_jax.train import reporting  # pylint: disable=g-import-not-at-top,wrong-import-position

DOMAINS = ["RedPajamaC4", "RedPajamaGithub", "RedPajamaStackExchange"]


def _records(n_clusters, steps=range(0, 50, 5), seed=0):
  """Fake training records: train loss, validation loss per domain and the
  weights of ``n_clusters`` model-centric domains."""
  rng = np.random.default_rng(seed)
  records = []
  for step in steps:
    w = rng.random(n_clusters)
    records.append({"step": step, "loss": 5.0 - step / 20, "weights": list(w / w.sum())})
    records.append({"step": step,
                    "val_loss": {n: 5.0 - step / 25 + i for i, n in enumerate(DOMAINS)}})
  return records


@pytest.fixture
def figures(monkeypatch):
  """``{file name: figure}`` of what ``write_plots`` saved, kept open."""
  kept = {}
  saved = {}
  original_savefig = matplotlib.figure.Figure.savefig

  def savefig(fig, fname, *args, **kwargs):
    saved[id(fig)] = str(fname).rsplit("/", 1)[-1]
    return original_savefig(fig, fname, *args, **kwargs)

  monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
  monkeypatch.setattr(plt, "close", lambda fig=None: kept.__setitem__(saved[id(fig)], fig))
  yield kept
  monkeypatch.undo()
  for fig in kept.values():
    plt.close(fig)


def _draw(fig):
  fig.canvas.draw()
  return fig.canvas.get_renderer()


def _inside(inner, outer, slack=1.0):
  return (inner.x0 >= outer.x0 - slack and inner.y0 >= outer.y0 - slack
          and inner.x1 <= outer.x1 + slack and inner.y1 <= outer.y1 + slack)


def test_weight_plot_of_11_clusters(tmp_path, figures):
  written = reporting.write_plots(_records(11), tmp_path, DOMAINS,
                                  np.ones((3, 11)))
  assert [p.name for p in written] == ["loss_per_domain.png", "domain_weights.png",
                                       "clusters_vs_domains.png"]
  assert all(p.stat().st_size > 0 for p in written)
  fig = figures["domain_weights.png"]
  ax, = [a for a in fig.axes if a.get_legend()]
  renderer = _draw(fig)
  # One colour per cluster (the default cycle has 10: the 11th repeated the first).
  colours = {tuple(np.round(c.get_facecolor()[0], 4)) for c in ax.collections}
  assert len(ax.collections) == 11 and len(colours) == 11
  legend = ax.get_legend()
  assert len(legend.get_texts()) == 11
  # The legend lies beside the axes, not over the data, and inside the figure.
  box, axes_box = legend.get_window_extent(renderer), ax.get_window_extent(renderer)
  assert box.x0 >= axes_box.x1, (box, axes_box)
  assert _inside(box, fig.bbox), (box, fig.bbox)


def test_loss_plot_legend_beside_the_axes(tmp_path, figures):
  reporting.write_plots(_records(2), tmp_path, DOMAINS, None)
  fig = figures["loss_per_domain.png"]
  ax = fig.axes[0]
  renderer = _draw(fig)
  box = ax.get_legend().get_window_extent(renderer)
  assert box.x0 >= ax.get_window_extent(renderer).x1 and _inside(box, fig.bbox)
  assert "clusters_vs_domains.png" not in figures  # no contingency, no heatmap


@pytest.mark.parametrize("n_clusters", [3, 24])
def test_heatmap_title_and_labels_inside_the_figure(tmp_path, figures, n_clusters):
  contingency = np.arange(3 * n_clusters).reshape(3, n_clusters) % 7
  reporting.write_plots(_records(n_clusters), tmp_path, DOMAINS, contingency)
  fig = figures["clusters_vs_domains.png"]
  ax = fig.axes[0]
  renderer = _draw(fig)
  texts = [ax.title, ax.xaxis.label, *ax.get_yticklabels(), *ax.get_xticklabels()]
  assert ax.title.get_text() and ax.xaxis.label.get_text()
  for text in texts:
    assert _inside(text.get_window_extent(renderer), fig.bbox), text.get_text()
  # One column per cluster; the figure grows with them.
  assert len(ax.get_xticks()) == n_clusters
  if n_clusters == 24:
    assert fig.get_figwidth() > 10


def test_palette_is_distinct_for_many_series():
  for n in (1, 10, 11, 20, 21, 40):
    colours = reporting._palette(n)  # pylint: disable=protected-access
    assert len({tuple(np.round(c, 4)) for c in colours}) == n, n
