"""Micro-benchmarks of dograph_jax's core pieces on the local (CPU) backend.

Run as ``python benchmarks/bench_core.py`` (``--quick`` for a smoke run,
``--help`` for the options). Three sections, printed as tables:

1. **Update cost.** A 2-layer MLP (512 -> 512 -> 64, ReLU, softmax
   cross-entropy; ~295k parameters) on a batch of ``B = 64`` examples.

   * *Update only*, the gradients already computed: one
     ``dograph_transform().update`` on the per-sample gradients (every leaf
     ``(B, *param.shape)``, defaults: ``M = 11`` domains, ``K = 256`` dense
     Gaussian sketch, 10 Lloyd iterations, ``"uncertainty"`` weights) against
     one ``optax.adamw(...).update`` on the batch-mean gradient. Also shown:
     the sketch ``z = R g`` alone (``R`` is regenerated from its key on every
     call, by design), the transform with ``sketch_kind="kronecker"`` and the
     chain ``dograph_transform -> adamw``. The DoGraph state is the one after
     a first update (warm-started centroids), as in training.
   * *Whole step*, from parameters and batch to new parameters and state:
     ``per_sample_grads`` + ``chain(dograph_transform, adamw)`` +
     ``apply_updates`` against ``jax.grad`` of the mean loss + ``adamw`` +
     ``apply_updates``.

2. **K-means.** ``dograph_jax.kmeans`` against scikit-learn's
   ``KMeans(algorithm="lloyd", n_init=1, init=C0, max_iter=iters, tol=0)`` on
   ``B = 4096`` points in ``K = 256`` dimensions, ``M = 11`` clusters, both
   started from the same centroids ``C0`` (``M`` distinct data points) and run
   for the same number of Lloyd iterations. The points are an overlapping
   Gaussian mixture (centres of scale 0.15 under unit noise), so Lloyd does
   not reach a fixed point early; scikit-learn stops as soon as the labels stop
   changing even with ``tol=0``, so its ``n_iter_`` is printed and the time
   per iteration is shown as well. Both inertias (sum of squared distances to
   the final centroids) are printed. scikit-learn runs Lloyd on OpenMP threads
   (all cores by default); it is also timed with one OpenMP thread, a stable
   reference when the cores are contended (on a small shared VM the
   multi-threaded time can jump by an order of magnitude for a while).

3. **Weight solver.** ``solve_weights`` (jitted, one function per objective
   and ``lambda_graph``, hyperparameters closed over as in
   ``dograph_transform``) for every objective in ``OBJECTIVES``, with
   ``lambda_graph = 0`` and ``0.1`` (``--lambda-graphs``), on the domain
   statistics of a realistic batch: per-sample gradients of the MLP on
   ``B = 48`` examples from 11 synthetic input distributions, sketched to
   ``K = 256`` (``--solver-sketch-dim``), clustered into ``M = 11`` domains
   (k-means++ then 10 Lloyd iterations), with per-sample losses (needed by
   ``"robust"``). The L1 distance of the weights to those of
   ``lambda_graph = 0`` shows how much the graph term moved them.

``--json PATH`` also writes section 1's AdamW update time and section 3's
solver times (``experiments/analyses.py objectives`` reads them).

Timing: every function is jitted, called once to compile and once more to
warm up, then timed with ``time.perf_counter`` around calls that each end in
``jax.block_until_ready``. A fast function is called several times per sample
(enough for ``--min-time`` seconds) and the sample is the mean per call. The
candidates of a table are timed in interleaved rounds (the order rotates each
round), ``--repeats`` rounds, and the median and the minimum of each
candidate's samples are reported. Ratios are of medians. A warning is printed
under a table when a candidate's slowest sample is over 3x its fastest (a busy
machine).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import dograph_jax as dg

# Model and DoGraph sizes.
D_IN, HIDDEN, N_CLASSES = 512, 512, 64
BATCH = 64
NUM_DOMAINS, SKETCH_DIM = 11, 256
# K-means comparison.
KM_POINTS, KM_DIM, KM_SPREAD = 4096, 256, 0.15
# Weight-solver batch.
SOLVER_BATCH = 48
LAMBDA_GRAPHS = (0.0, 0.1)


# --------------------------------------------------------------------------
# Timing and printing helpers.

def _run_once(fn: Callable[[], Any]) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


class Timing(NamedTuple):
  median: float  # seconds per call
  min: float
  max: float


def bench(fns: dict[Any, Callable[[], Any]], repeats: int,
          min_time: float) -> dict[Any, Timing]:
  """Seconds per call of each zero-argument ``fn``, in interleaved rounds."""
  calls = {}
  for name, fn in fns.items():
    _run_once(fn)                  # compile
    warm = _run_once(fn)           # warm-up, and a first estimate
    calls[name] = max(1, math.ceil(min_time / max(warm, 1e-9)))
  samples = {name: [] for name in fns}
  names = list(fns)
  for r in range(repeats):
    shift = r % len(names)
    for name in names[shift:] + names[:shift]:
      fn, n = fns[name], calls[name]
      start = time.perf_counter()
      for _ in range(n):
        jax.block_until_ready(fn())
      samples[name].append((time.perf_counter() - start) / n)
  return {name: Timing(statistics.median(s), min(s), max(s))
          for name, s in samples.items()}


def warn_if_unstable(times: dict[Any, Timing], factor: float = 3.0) -> None:
  """Flag candidates whose slowest sample is ``factor`` times their fastest."""
  unstable = [str(name) for name, t in times.items() if t.max > factor * t.min]
  if unstable:
    print(f"warning: samples vary by more than {factor:g}x (max/min) for "
          f"{', '.join(unstable)}: the machine was probably busy; compare the "
          f"min column or rerun.")


def fmt_time(seconds: float) -> str:
  if seconds >= 1.0:
    return f"{seconds:.3f} s"
  if seconds >= 1e-3:
    return f"{seconds * 1e3:.2f} ms"
  return f"{seconds * 1e6:.1f} us"


def fmt_ratio(x: float) -> str:
  return f"{x:.2f}x" if x < 100 else f"{x:.0f}x"


def print_table(header: list[str], rows: list[list[str]]) -> None:
  """Left-aligned first column, right-aligned others."""
  widths = [max(len(str(row[i])) for row in [header] + rows)
            for i in range(len(header))]

  def line(row):
    cells = [str(row[0]).ljust(widths[0])]
    cells += [str(c).rjust(w) for c, w in zip(row[1:], widths[1:])]
    return "  ".join(cells)

  print(line(header))
  print("  ".join("-" * w for w in widths))
  for row in rows:
    print(line(row))


def section(title: str) -> None:
  print()
  print(title)
  print("=" * len(title))


# --------------------------------------------------------------------------
# The model.

def init_mlp(key: jax.Array) -> dict[str, jax.Array]:
  k1, k2 = jax.random.split(key)
  return {
      "w1": jax.random.normal(k1, (D_IN, HIDDEN)) / math.sqrt(D_IN),
      "b1": jnp.zeros((HIDDEN,)),
      "w2": jax.random.normal(k2, (HIDDEN, N_CLASSES)) / math.sqrt(HIDDEN),
      "b2": jnp.zeros((N_CLASSES,)),
  }


def example_loss(params, example) -> jax.Array:
  """Cross-entropy of ONE example ``{"x": (D_IN,), "y": ()}``."""
  h = jax.nn.relu(example["x"] @ params["w1"] + params["b1"])
  logits = h @ params["w2"] + params["b2"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, example["y"])


def mean_loss(params, batch) -> jax.Array:
  return jnp.mean(jax.vmap(example_loss, in_axes=(None, 0))(params, batch))


def make_batch(key: jax.Array, size: int, num_sources: int = NUM_DOMAINS):
  """Examples from ``num_sources`` input distributions (shifted, rescaled)."""
  k_src, k_mu, k_scale, k_x, k_y = jax.random.split(key, 5)
  source = jax.random.randint(k_src, (size,), 0, num_sources)
  mu = jax.random.normal(k_mu, (num_sources, D_IN))
  scale = jax.random.uniform(k_scale, (num_sources, 1), minval=0.5, maxval=2.0)
  x = mu[source] + scale[source] * jax.random.normal(k_x, (size, D_IN))
  # Each source favours its own few classes.
  y = (source * 5 + jax.random.randint(k_y, (size,), 0, 5)) % N_CLASSES
  return {"x": x, "y": y}


# --------------------------------------------------------------------------
# Section 1: update and whole-step cost.

def bench_update(args) -> float:
  """Returns the median adamw update time (the reference of section 3)."""
  section(f"1. Update cost: 2-layer MLP, B={BATCH}, M={NUM_DOMAINS}, "
          f"K={SKETCH_DIM}")
  key = jax.random.PRNGKey(args.seed)
  params = init_mlp(key)
  batch = make_batch(jax.random.fold_in(key, 1), BATCH)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  print(f"params: {n_params:,} ({D_IN}->{HIDDEN}->{N_CLASSES}); "
        f"per-sample gradients: {BATCH * n_params * 4 / 2**20:.0f} MiB")

  psg = jax.jit(functools.partial(dg.per_sample_grads, example_loss))(
      params, batch)
  mean_grad = jax.tree.map(lambda g: jnp.mean(g, 0), psg)

  adamw = optax.adamw(1e-3, weight_decay=0.01)
  dograph = dg.dograph_transform(NUM_DOMAINS, SKETCH_DIM, batch_size=BATCH,
                                 seed=args.seed)
  kronecker = dg.dograph_transform(NUM_DOMAINS, SKETCH_DIM, batch_size=BATCH,
                                   seed=args.seed, sketch_kind="kronecker")
  chain = optax.chain(dograph, adamw)

  adamw_update = jax.jit(adamw.update)
  dograph_update = jax.jit(dograph.update)
  kronecker_update = jax.jit(kronecker.update)
  chain_update = jax.jit(chain.update)
  # The projection key that dograph_transform derives from its seed.
  proj_key = jax.random.fold_in(jax.random.PRNGKey(args.seed), 0)
  sketch_only = jax.jit(lambda g: dg.sketch(g, proj_key, SKETCH_DIM))

  adamw_state = adamw.init(params)
  # Steady state: after one update the centroids are warm-started.
  _, dograph_state = dograph_update(psg, dograph.init(params), params)
  _, kronecker_state = kronecker_update(psg, kronecker.init(params), params)
  _, chain_state = chain_update(psg, chain.init(params), params)

  @jax.jit
  def plain_step(params, opt_state, batch):
    grads = jax.grad(mean_loss)(params, batch)
    updates, opt_state = adamw.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  @jax.jit
  def dograph_step(params, opt_state, batch):
    grads = dg.per_sample_grads(example_loss, params, batch)
    updates, opt_state = chain.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  times = bench({
      "adamw": lambda: adamw_update(mean_grad, adamw_state, params),
      "dograph": lambda: dograph_update(psg, dograph_state, params),
      "sketch": lambda: sketch_only(psg),
      "kronecker": lambda: kronecker_update(psg, kronecker_state, params),
      "chain": lambda: chain_update(psg, chain_state, params),
      "plain_step": lambda: plain_step(params, adamw_state, batch),
      "dograph_step": lambda: dograph_step(params, chain_state, batch),
  }, args.repeats, args.min_time)

  def row(label, name, ref):
    t = times[name]
    return [label, fmt_time(t.median), fmt_time(t.min),
            fmt_ratio(t.median / times[ref].median)]

  rows = [
      ["update, gradients given:", "", "", ""],
      row("  adamw on the mean gradient (reference)", "adamw", "adamw"),
      row("  dograph_transform on per-sample grads", "dograph", "adamw"),
      row("    of which the sketch z = R g alone", "sketch", "adamw"),
      row("  same, sketch_kind='kronecker'", "kronecker", "adamw"),
      row("  chain(dograph_transform, adamw)", "chain", "adamw"),
      ["whole step (grads + update + apply):", "", "", ""],
      row("  jax.grad(mean loss) + adamw (reference)", "plain_step",
          "plain_step"),
      row("  per_sample_grads + dograph + adamw", "dograph_step", "plain_step"),
  ]
  print_table(["", "median", "min", "vs reference"], rows)
  print(f"sketch share of the dograph update: "
        f"{100 * times['sketch'].median / times['dograph'].median:.0f}%")
  warn_if_unstable(times)
  return times["adamw"].median


# --------------------------------------------------------------------------
# Section 2: K-means against scikit-learn.

def bench_kmeans(args) -> None:
  section(f"2. K-means: B={KM_POINTS}, K={KM_DIM}, M={NUM_DOMAINS}, "
          f"{args.kmeans_iters} Lloyd iterations, same initial centroids")
  try:
    import sklearn
    from sklearn.cluster import KMeans
    from threadpoolctl import ThreadpoolController
  except ImportError:
    print("scikit-learn is not installed (pip install scikit-learn): skipped.")
    return
  iters = args.kmeans_iters
  rng = np.random.default_rng(args.seed)
  centres = KM_SPREAD * rng.normal(size=(NUM_DOMAINS, KM_DIM))
  labels = rng.integers(0, NUM_DOMAINS, KM_POINTS)
  noise = rng.normal(size=(KM_POINTS, KM_DIM))
  x = (centres[labels] + noise).astype(np.float32)
  c0 = x[rng.choice(KM_POINTS, NUM_DOMAINS, replace=False)].copy()
  x_jax, c0_jax = jnp.asarray(x), jnp.asarray(c0)

  key = jax.random.PRNGKey(args.seed)  # unused: init_centroids is given
  jax_kmeans = jax.jit(lambda x, c: dg.kmeans(x, NUM_DOMAINS, key, iters=iters,
                                              init_centroids=c))

  def sk_fit():
    return KMeans(NUM_DOMAINS, algorithm="lloyd", n_init=1, init=c0,
                  max_iter=iters, tol=0.0).fit(x)

  # scikit-learn parallelises Lloyd with OpenMP (all cores by default); the
  # one-thread run is a stable reference when the cores are contended.
  controller = ThreadpoolController()

  def sk_fit_one_thread():
    with controller.limit(limits=1, user_api="openmp"):
      return sk_fit()

  times = bench({
      "jax": lambda: jax_kmeans(x_jax, c0_jax),
      "sklearn": lambda: sk_fit().inertia_,
      "sklearn_1t": lambda: sk_fit_one_thread().inertia_,
  }, args.repeats, args.min_time)

  result = jax_kmeans(x_jax, c0_jax)
  fitted = sk_fit()
  jax_inertia, sk_inertia = float(result.inertia), float(fitted.inertia_)
  sk_iters = int(fitted.n_iter_)
  agree = float(np.mean(np.asarray(result.assignments) == fitted.labels_))
  jax_per_iter = times["jax"].median / iters

  def row(label, name, n_iters, inertia):
    t = times[name]
    return [label, fmt_time(t.median), fmt_time(t.min),
            fmt_time(t.median / n_iters), str(n_iters), f"{inertia:.6g}",
            fmt_ratio(jax_per_iter / (t.median / n_iters))]

  omp = controller.select(user_api="openmp").info()
  omp_threads = omp[0]["num_threads"] if omp else "?"
  rows = [
      row("dograph_jax.kmeans (jit)", "jax", iters, jax_inertia),
      row(f"sklearn {sklearn.__version__} KMeans lloyd, {omp_threads} threads",
          "sklearn", sk_iters, sk_inertia),
      row("  same, 1 OpenMP thread", "sklearn_1t", sk_iters, sk_inertia),
  ]
  print_table(["", "median", "min", "per iter", "iters", "inertia",
               "jax / row"], rows)
  print("jax / row: ratio of the median times per iteration (the iteration "
        "counts are equal unless noted)")
  print(f"inertia relative difference: "
        f"{abs(jax_inertia - sk_inertia) / sk_inertia:.2e}; "
        f"same assignment for {100 * agree:.1f}% of points")
  if sk_iters < iters:
    print(f"note: sklearn reached a fixed point after {sk_iters} iterations "
          f"(labels unchanged), so the totals are not at equal iterations.")
  warn_if_unstable(times)


# --------------------------------------------------------------------------
# Section 3: the weight solvers.

def realistic_stats(seed: int, sketch_dim: int = SKETCH_DIM) -> dg.DomainStats:
  """Domain statistics of a B=48 batch of MLP gradients, as in the transform."""
  key = jax.random.PRNGKey(seed)
  params = init_mlp(key)
  batch = make_batch(jax.random.fold_in(key, 2), SOLVER_BATCH)

  @jax.jit
  def stats_fn(params, batch):
    losses, grads = dg.per_sample_loss_and_grads(example_loss, params, batch)
    z = dg.sketch(grads, jax.random.fold_in(key, 3), sketch_dim)
    clusters = dg.kmeans(z, NUM_DOMAINS, jax.random.fold_in(key, 4), iters=10)
    return dg.domain_stats(z, clusters.assignments, NUM_DOMAINS, losses)

  return stats_fn(params, batch)


def bench_solvers(args, adamw_time: float | None) -> list[dict]:
  """Section 3; returns one row per (objective, lambda_graph) for ``--json``."""
  section(f"3. Weight solver (solve_weights, jit): B={SOLVER_BATCH}, "
          f"K={args.solver_sketch_dim}, M={NUM_DOMAINS}")
  stats = realistic_stats(args.seed, args.solver_sketch_dim)
  counts = np.asarray(stats.counts).astype(int)
  print(f"domain sizes: {sorted(counts.tolist(), reverse=True)} "
        f"({int(np.sum(counts > 0))} present)")

  fns, solvers = {}, {}
  for objective in dg.OBJECTIVES:
    for lam in args.lambda_graphs:
      solve = jax.jit(functools.partial(dg.solve_weights, objective=objective,
                                        lambda_graph=lam))
      solvers[objective, lam] = solve
      fns[objective, lam] = functools.partial(solve, stats)
  times = bench(fns, args.repeats, args.min_time)

  weights = {name: np.asarray(solve(stats)) for name, solve in solvers.items()}
  ref = times["uncertainty", 0.0].median
  header = ["objective", "lambda_graph", "median", "min", "vs uncertainty@0"]
  if adamw_time is not None:
    header.append("vs adamw update")
  header += ["max w", "|w - w@0|_1"]
  rows = []
  for (objective, lam), t in times.items():
    w = weights[objective, lam]
    row = [objective, f"{lam:g}", fmt_time(t.median), fmt_time(t.min),
           fmt_ratio(t.median / ref)]
    if adamw_time is not None:
      row.append(fmt_ratio(t.median / adamw_time))
    row += [f"{w.max():.3f}",
            f"{np.abs(w - weights[objective, 0.0]).sum():.2g}"]
    rows.append(row)
  print_table(header, rows)
  print("w@0: the same objective's weights with lambda_graph=0")
  warn_if_unstable(times)
  return [{"objective": objective, "lambda_graph": lam, "median_s": t.median,
           "min_s": t.min, "vs_adamw_update": t.median / adamw_time if adamw_time else None}
          for (objective, lam), t in times.items()]


# --------------------------------------------------------------------------

def main() -> None:
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--repeats", type=int, default=11,
                      help="interleaved timing rounds; their median and min "
                           "are reported (default 11)")
  parser.add_argument("--min-time", type=float, default=0.05,
                      help="seconds of calls per timing sample; fast functions "
                           "are called repeatedly (default 0.05)")
  parser.add_argument("--quick", action="store_true",
                      help="smoke run: 3 rounds, 0.01 s samples")
  parser.add_argument("--kmeans-iters", type=int, default=20,
                      help="Lloyd iterations in section 2 (default 20)")
  parser.add_argument("--sections", type=int, nargs="+", choices=(1, 2, 3),
                      default=(1, 2, 3), help="sections to run (default all)")
  parser.add_argument("--seed", type=int, default=0,
                      help="seed of the data, the model and the sketch")
  parser.add_argument("--lambda-graphs", default=",".join(f"{x:g}" for x in LAMBDA_GRAPHS),
                      help="graph-term strengths of section 3, comma-separated "
                           "(0 is always included as the reference; default 0,0.1)")
  parser.add_argument("--solver-sketch-dim", type=int, default=SKETCH_DIM,
                      help=f"sketch dimension K of section 3's statistics (default {SKETCH_DIM})")
  parser.add_argument("--json", default=None, metavar="PATH",
                      help="also write section 1's AdamW update time and section 3's "
                           "solver times as JSON (read by experiments/analyses.py objectives)")
  args = parser.parse_args()
  args.lambda_graphs = sorted({0.0, *(float(x) for x in args.lambda_graphs.split(",") if x)})
  if args.quick:
    args.repeats, args.min_time = 3, 0.01
  if args.repeats < 1:
    parser.error("--repeats must be >= 1")

  warnings.filterwarnings("ignore", category=DeprecationWarning)
  start = time.perf_counter()
  print(f"dograph_jax {dg.__version__}, jax {jax.__version__}, "
        f"optax {optax.__version__}, numpy {np.__version__}")
  print(f"backend: {jax.default_backend()}, devices: {jax.devices()}, "
        f"cpu count: {os.cpu_count()}, "
        f"{platform.processor() or platform.machine()}")
  print(f"repeats: {args.repeats}, min sample time: {args.min_time} s")

  adamw_time = bench_update(args) if 1 in args.sections else None
  if 2 in args.sections:
    bench_kmeans(args)
  solvers = bench_solvers(args, adamw_time) if 3 in args.sections else []
  print(f"\ntotal wall time: {time.perf_counter() - start:.1f} s")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"command": " ".join(["python", *sys.argv]), "jax": jax.__version__,
                 "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
                 "num_domains": NUM_DOMAINS, "solver_batch": SOLVER_BATCH,
                 "solver_sketch_dim": args.solver_sketch_dim,
                 "adamw_update_s": adamw_time, "adamw_params": "2-layer MLP, ~295k",
                 "solvers": solvers}, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
