"""How much the gradient sketch distorts pairwise geometry, and which default
sketch dimension ``K`` that calls for.

Run as ``python benchmarks/sketch_distortion.py`` (about 3 minutes on a 2-core
CPU; ``--quick``: the small model only, about a minute; ``--help`` for the
options).

DoGraph clusters per-sample gradients by their sketches ``z_i = R g_i``
(docs/method.md §2), so what the sketch must keep is the pairwise geometry of the
batch: squared distances (K-means) and cosines (the domain graph). This script
measures how well it does, for the two maps of :func:`dograph_jax.sketch`:
``"gaussian"`` (dense JL map, the reference path) and ``"kronecker"``
(``P_in^T G P_out`` per layer, the map the factored engine of docs/method.md §7
computes), at ``K`` in 64 ... 4096.

Measurement, per model:

1. **Model.** A small GPT-2 from :func:`dograph_jax.models.get_config`
   (``"mini"`` at ``vocab_size=512, n_positions=64``: 137k parameters; and by
   default a larger one, 4 layers, ``d_model=128``, ``d_ff=512``,
   ``vocab_size=1024``: 933k parameters), parameters from
   ``split_model(GPT2(cfg, rngs=nnx.Rngs(seed)))``.
2. **Light training,** so the gradients are not those of a model at init
   (whose per-sample gradients are dominated by the shared "learn the unigram
   distribution" direction): ``--train_steps`` steps (default 60; 0 measures
   at init) of Adam (lr 3e-3, batch 16) on the mean of
   :func:`dograph_jax.models.sequence_loss`, on structured synthetic tokens:
   four "domains", each a sparse random bigram chain (4 successors per token,
   Dirichlet(0.5) probabilities, successors drawn from a domain-specific half
   of the vocabulary). The loss before and after is printed.
3. **Exact geometry.** Per-sample gradients of ``sequence_loss`` for
   ``B = 48`` fresh sequences (12 per domain, ``T = 64``) via
   :func:`dograph_jax.per_sample_grads`, flattened to ``(B, P)`` in float64;
   their Gram matrix gives the exact squared distances ``||g_i - g_j||^2``
   and cosines of all ``B (B - 1) / 2 = 1128`` pairs.
4. **Sketches,** ``--seeds`` seeds (default 5; ``jax.random.PRNGKey(seed)``)
   per ``(kind, K)``.
   For each seed, over all pairs ``i < j``, three RMS errors:

   * ``dist``: ``||z_i - z_j|| / ||g_i - g_j|| - 1`` (relative error of the
     distance; the figure docs/method.md §7 quotes: dense 0.044 / Kronecker 0.061 at
     k = 256, 0.023 / 0.033 at k = 1024; for a dense Gaussian map it is about
     ``sqrt(1 / (2K))``);
   * ``sq-dist``: ``||z_i - z_j||^2 / ||g_i - g_j||^2 - 1`` (relative error of
     the squared distance, about twice ``dist``; for a dense Gaussian map its
     mean square is exactly ``2 / K`` in expectation);
   * ``cos``: ``cos(z_i, z_j) - cos(g_i, g_j)`` (absolute error).

   The table shows the mean over seeds of these per-seed RMS errors and their
   standard deviation over seeds (``±``).

How each map is computed:

* ``kronecker``: ``dograph_jax.sketch(grads, PRNGKey(seed), K,
  kind="kronecker")`` at every ``K``, called op by op (not jitted: one XLA
  compilation of the whole map per ``K`` costs 5-15 s here, while eager
  dispatch compiles each distinct leaf shape once). ``s/call`` is the median
  time of the warm calls (every seed but the first), so it includes Python
  dispatch of every leaf; the jitted cost at ``K = 256`` on the small model is
  printed under its table (not with ``--quick``).
* ``gaussian``: a dense map costs ``P x K`` random numbers per call (about 15 s
  for 137k parameters at ``K = 4096`` on a busy 2-core CPU), so its distortion at every
  ``K`` is computed *exactly in distribution* from the ``B x B`` Gram matrix
  (row ``gaussian=``): for ``R`` with i.i.d. N(0, 1/K) entries and ``G^T =
  Q C^T`` (``Q``: ``P x B`` with orthonormal columns), ``R Q`` again has
  i.i.d. N(0, 1/K) entries, so ``Z = G R^T`` has the distribution of ``C S``
  with ``S`` a ``B x K`` N(0, 1/K) matrix and any ``C`` with ``C C^T = G
  G^T`` (numpy's generator, seeds as above). The library's own map,
  ``dograph_jax.sketch(..., kind="gaussian")`` jitted, is run at ``K = 256``
  on the small model (row ``gaussian``; all seeds, 1 with ``--quick``) as a
  check that the two agree, and timed (warm, jitted), next to the jitted
  Kronecker map. (On the larger model the dense map takes about 5 s a call
  and 20 s to compile at ``K = 256``, so it is not run there.)

The summary gives, for each kind and model, the smallest ``K`` on the grid
whose mean RMS error is at most 0.05 and at most 0.035 (for ``dist``, and for
``sq-dist``), the ``K`` needed by log-log interpolation of the mean curve, and
the ratio ``K_kron / K_gauss`` at equal distortion (also per Kronecker ``K``,
column ``K/K_g``: ``K`` over the dense dimension ``K_g`` with the same mean
``dist`` error, interpolated on the ``gaussian=`` curve), and the slope of
each error curve in log-log. Column ``worst`` is the largest per-seed ``dist``
error: the transform keeps one projection for a whole run
(``projection_key(seed)``), so an unlucky draw is not averaged away.

It ends with the recommended defaults. Rule: one distortion target for both
paths, so that switching between them does not change what K-means sees: the
smallest power of two whose mean RMS distance error is at most 0.05 on every
model measured (the dense map reaches it at ``K = 256``, docs/method.md §7's
reference point). The dense map's cost is ``P * K`` random numbers per step,
linear in ``K``, so it gets no more than that; the Kronecker map's cost grows
like ``sqrt(K)`` (docs/method.md §7), so its larger dimension is cheap.

Why the Kronecker map needs more: for one layer, ``||P_in^T G P_out||^2 /
||G||^2`` has relative variance about ``2 / K`` when ``G`` has a high stable
rank, but ``2 / k_in + 2 / k_out ~ 4 / sqrt(K)`` when ``G`` is rank one; a
per-sample difference of layer gradients ``g_i - g_j`` (a sum over ``T``
tokens of rank-one terms) lies in between, so the error falls between
``K^-1/4`` and ``K^-1/2`` and the equal-distortion ratio grows as the target
tightens.

Result (2-core CPU, default run, 5 seeds; a 20-seed run agrees within the
spreads shown): the dense map follows ``sqrt(1 / (2K))`` on both models
(``dist`` 0.044 at ``K = 256``, 0.022 at 1024) and the library's map matches
its Gram-equivalent. The Kronecker map: 0.095 / 0.062 at ``K = 256``, 0.071 /
0.054 at 512, 0.040 / 0.041 at 1024 (mini / mini-4x128; 20 seeds: 0.043 /
0.044); its error falls like ``K^-0.32`` to ``K^-0.41``, not ``K^-0.5``. At
equal distortion it needs 3.1-4.0x the dense dimension at ``dist = 0.05`` and
4.5-8x at 0.035 (docs/method.md §7's "about 2x" is the low end, and its 0.061 at
``K = 256`` matches ours on the 4-layer model). So:

* reference path (``sketch_kind="gaussian"``): default ``K = 256``;
* factored path and ``sketch_kind="kronecker"``: default ``K = 1024``, the
  smallest power of two with the dense default's distortion (0.04-0.045),
  at a cost docs/method.md §7 puts at +1.7% of a GPT-2 124M step's FLOPs (vs +0.9%
  at 256). ``K = 256`` Kronecker distorts like a dense map with ``K`` of only
  about 50-140.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import dograph_jax as dg
from dograph_jax.models import (GPT2, count_params, get_config, sequence_loss,
                                split_model)

BATCH, SEQ_LEN = 48, 64
DIMS = (64, 128, 256, 512, 1024, 2048, 4096)
TARGETS = (0.05, 0.035)
LIB_GAUSS_DIM = 256          # where the library's dense map is run and timed
NUM_DOMAINS, BRANCHING = 4, 4
TRAIN_BATCH, TRAIN_LR = 16, 3e-3
METRICS = ("dist", "sq", "cos")
METRIC_NAMES = {"dist": "dist", "sq": "sq-dist", "cos": "cos"}

# name -> (get_config("mini", **overrides), seeds of the library's dense map)
MODELS = {
    "mini": (dict(vocab_size=512, n_positions=64), 5),
    "mini-4x128": (dict(n_layer=4, d_model=128, n_head=4, d_ff=512,
                        vocab_size=1024, n_positions=64), 0),
}


# --------------------------------------------------------------------------
# Structured synthetic tokens.

class MarkovDomains:
  """``num_domains`` sparse random bigram chains over one vocabulary."""

  def __init__(self, vocab: int, seed: int):
    rng = np.random.default_rng([seed, 7])
    self.subsets = np.stack([rng.choice(vocab, vocab // 2, replace=False)
                             for _ in range(NUM_DOMAINS)])         # (D, V/2)
    pick = rng.integers(0, vocab // 2, (NUM_DOMAINS, vocab, BRANCHING))
    self.succ = np.take_along_axis(self.subsets[:, None, :],
                                   pick.reshape(NUM_DOMAINS, -1)[:, None, :],
                                   axis=2).reshape(pick.shape)     # (D, V, S)
    probs = rng.dirichlet(np.full(BRANCHING, 0.5), (NUM_DOMAINS, vocab))
    self.cum = np.cumsum(probs, -1)

  def sample(self, rng: np.random.Generator, domains: np.ndarray,
             length: int) -> np.ndarray:
    """``(n, length)`` int32 tokens, row ``r`` from chain ``domains[r]``."""
    n = len(domains)
    tok = self.subsets[domains, rng.integers(0, self.subsets.shape[1], n)]
    out = np.empty((n, length), np.int32)
    out[:, 0] = tok
    for t in range(1, length):
      u = rng.random(n)[:, None]
      j = np.minimum((u > self.cum[domains, tok]).sum(1), BRANCHING - 1)
      tok = self.succ[domains, tok, j]
      out[:, t] = tok
    return out


def train(graphdef, params, data: MarkovDomains, steps: int, seed: int):
  """``steps`` Adam steps on the mean sequence loss; returns params, losses."""

  def mean_loss(p, toks):
    return jnp.mean(jax.vmap(lambda x: sequence_loss(graphdef, p, x))(toks))

  tx = optax.adam(TRAIN_LR)

  @jax.jit
  def step(p, opt, toks):
    loss, grads = jax.value_and_grad(mean_loss)(p, toks)
    updates, opt = tx.update(grads, opt, p)
    return optax.apply_updates(p, updates), opt, loss

  rng = np.random.default_rng([seed, 11])
  held_out = data.sample(rng, np.arange(64) % NUM_DOMAINS, SEQ_LEN + 1)
  eval_loss = jax.jit(mean_loss)
  before = float(eval_loss(params, held_out))
  opt = tx.init(params)
  for _ in range(steps):
    toks = data.sample(rng, rng.integers(0, NUM_DOMAINS, TRAIN_BATCH),
                       SEQ_LEN + 1)
    params, opt, _ = step(params, opt, toks)
  return params, before, float(eval_loss(params, held_out))


# --------------------------------------------------------------------------
# Geometry and distortion.

IU = np.triu_indices(BATCH, 1)


class Pairs(NamedTuple):
  d2: np.ndarray   # squared distances of the pairs i < j
  cos: np.ndarray  # cosines of the pairs i < j


def pairs(gram: np.ndarray) -> Pairs:
  norm2 = np.diag(gram)
  d2 = norm2[:, None] + norm2[None, :] - 2.0 * gram
  cos = gram / np.sqrt(np.outer(norm2, norm2))
  return Pairs(d2[IU], cos[IU])


def rms(x: np.ndarray) -> float:
  return float(np.sqrt(np.mean(np.square(x))))


def distortion(exact: Pairs, z: np.ndarray) -> dict[str, float]:
  """Per-pair RMS errors of the sketches ``z`` (B, K) against ``exact``."""
  z = np.asarray(z, np.float64)
  got = pairs(z @ z.T)
  ratio = got.d2 / exact.d2
  return {"dist": rms(np.sqrt(ratio) - 1.0), "sq": rms(ratio - 1.0),
          "cos": rms(got.cos - exact.cos)}


class Row(NamedTuple):
  kind: str                   # "kronecker", "gaussian" (library), "gaussian="
  dim: int
  mean: dict[str, float]      # mean over seeds of the per-seed RMS errors
  sd: dict[str, float]        # their standard deviation over seeds
  worst: dict[str, float]     # the largest per-seed RMS error
  seconds: float | None       # warm time per call


def summarize(kind: str, dim: int, per_seed: list[dict[str, float]],
              seconds: float | None) -> Row:
  mean = {m: statistics.fmean(s[m] for s in per_seed) for m in METRICS}
  sd = {m: statistics.stdev([s[m] for s in per_seed]) if len(per_seed) > 1
        else math.nan for m in METRICS}
  worst = {m: max(s[m] for s in per_seed) for m in METRICS}
  return Row(kind, dim, mean, sd, worst, seconds)


def gram_equivalent_gaussian(gram: np.ndarray, exact: Pairs, dim: int,
                             seeds: list[int]) -> list[dict[str, float]]:
  """Dense-Gaussian distortion, exact in distribution, from the Gram matrix."""
  w, v = np.linalg.eigh(gram)
  c = v * np.sqrt(np.clip(w, 0.0, None))        # c @ c.T == gram
  out = []
  for seed in seeds:
    s = np.random.default_rng([seed, dim]).standard_normal((BATCH, dim))
    out.append(distortion(exact, c @ (s / math.sqrt(dim))))
  return out


def timed(fn, *args) -> tuple[Any, float]:
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - start


# --------------------------------------------------------------------------
# Interpolation of the error curves.

def k_for(dims, errs, target: float, extrapolate: bool = False) -> float | None:
  """``K`` where the mean-error curve first reaches ``target``, by log-log
  linear interpolation between the grid points around it; ``None`` if the
  curve never gets there on the grid (unless ``extrapolate``: then the slope
  of the last segment carries it on, fine for the dense map's ~1/sqrt(K))."""
  lk, le = np.log(np.asarray(dims, float)), np.log(np.asarray(errs, float))
  lt = math.log(target)
  hit = [i for i in range(len(dims)) if le[i] <= lt]
  if not hit and not extrapolate:
    return None
  i = min(max(hit[0] if hit else len(dims) - 1, 1), len(dims) - 1)
  slope = (le[i] - le[i - 1]) / (lk[i] - lk[i - 1])
  if slope >= 0:
    return None
  return float(math.exp(lk[i - 1] + (lt - le[i - 1]) / slope))


def grid_k(dims, errs, target: float) -> int | None:
  """Smallest ``K`` of the grid whose mean error is at most ``target``."""
  return next((k for k, e in zip(dims, errs) if e <= target), None)


def fmt_k(k: int | None) -> str:
  return f">{DIMS[-1]}" if k is None else str(k)


# --------------------------------------------------------------------------
# One model.

def measure(name: str, overrides: dict, lib_seeds: int, args) -> list[Row]:
  cfg = get_config("mini", **overrides)
  graphdef, params = split_model(GPT2(cfg, rngs=nnx.Rngs(args.seed)))
  n_params = count_params(params)
  data = MarkovDomains(cfg.vocab_size, args.seed)
  t0 = time.perf_counter()
  params, loss0, loss1 = train(graphdef, params, data, args.train_steps,
                               args.seed)
  t_train = time.perf_counter() - t0

  rng = np.random.default_rng([args.seed, 13])
  tokens = data.sample(rng, np.arange(BATCH) % NUM_DOMAINS, SEQ_LEN + 1)
  grads_fn = jax.jit(lambda p, t: dg.per_sample_grads(
      lambda q, x: sequence_loss(graphdef, q, x), p, t))
  grads, t_grads = timed(grads_fn, params, jnp.asarray(tokens))
  flat = np.concatenate([np.asarray(x, np.float64).reshape(BATCH, -1)
                         for x in jax.tree.leaves(grads)], axis=1)
  gram = flat @ flat.T
  del flat
  exact = pairs(gram)
  print(f"\n=== {name}: {n_params:,} parameters (n_layer={cfg.n_layer}, "
        f"d_model={cfg.d_model}, d_ff={cfg.d_ff}, vocab={cfg.vocab_size}); "
        f"{args.train_steps} Adam steps, held-out loss {loss0:.3f} -> "
        f"{loss1:.3f} ({t_train:.0f} s); per-sample grads B={BATCH}, "
        f"T={SEQ_LEN} ({t_grads:.1f} s incl. compile)")
  print(f"exact geometry: |g_i| median {np.median(np.sqrt(np.diag(gram))):.3g}, "
        f"pairwise cosine mean {exact.cos.mean():.3f} "
        f"(min {exact.cos.min():.3f}, max {exact.cos.max():.3f})")

  seeds = list(range(args.seeds))
  rows = []
  for dim in DIMS:  # Kronecker: the library's map, op by op.
    per_seed, secs = [], []
    for seed in seeds:
      z, sec = timed(lambda k: dg.sketch(grads, k, dim, kind="kronecker"),
                     jax.random.PRNGKey(seed))
      per_seed.append(distortion(exact, z))
      secs.append(sec)
    rows.append(summarize("kronecker", dim, per_seed,
                          statistics.median(secs[1:]) if len(secs) > 1 else None))
  for dim in DIMS:  # Dense Gaussian: exact in distribution from the Gram.
    rows.append(summarize("gaussian=", dim,
                          gram_equivalent_gaussian(gram, exact, dim, seeds), None))

  # The library's dense map (jitted) at LIB_GAUSS_DIM: check and timing.
  jit_times = {}
  for kind in ("gaussian", "kronecker") if lib_seeds else ():
    if kind == "kronecker" and args.quick:
      continue
    fn = jax.jit(lambda g, k, kind=kind: dg.sketch(g, k, LIB_GAUSS_DIM, kind=kind))
    lib_seeds_k = seeds[:lib_seeds] if kind == "gaussian" else seeds[:1]
    per_seed, secs = [], []
    _, compile_s = timed(fn, grads, jax.random.PRNGKey(10_000))
    for seed in lib_seeds_k:
      z, sec = timed(fn, grads, jax.random.PRNGKey(seed))
      per_seed.append(distortion(exact, z))
      secs.append(sec)
    jit_times[kind] = (statistics.median(secs), compile_s)
    if kind == "gaussian":
      rows.append(summarize("gaussian", LIB_GAUSS_DIM, per_seed,
                            statistics.median(secs)))
  print_table(rows, jit_times)
  return rows


def print_table(rows: list[Row], jit_times: dict) -> None:
  gauss = [r for r in rows if r.kind == "gaussian="]
  g_dims, g_err = [r.dim for r in gauss], [r.mean["dist"] for r in gauss]
  head = (f"{'kind':<10} {'K':>5}  " + "  ".join(
      f"{METRIC_NAMES[m] + ' err':>16}" for m in METRICS) +
          f"  {'worst':>6}  {'s/call':>7}  {'K/K_g':>5}")
  print(head)
  print("-" * len(head))
  for r in sorted(rows, key=lambda r: (r.kind != "kronecker", r.dim, r.kind)):
    errs = "  ".join(f"{r.mean[m]:.4f} ± {r.sd[m]:.4f}".rjust(16) for m in METRICS)
    sec = "-" if r.seconds is None else f"{r.seconds:.3f}"
    equiv = ""
    if r.kind == "kronecker":
      equiv = f"{r.dim / k_for(g_dims, g_err, r.mean['dist'], True):.2f}"
    print(f"{r.kind:<10} {r.dim:>5}  {errs}  {r.worst['dist']:.4f}  {sec:>7}  "
          f"{equiv:>5}")
  print("(kronecker: dograph_jax.sketch, eager; gaussian=: dense map exact in "
        "distribution via the Gram matrix; gaussian: dograph_jax.sketch, jitted;"
         " worst: the largest per-seed dist error; K/K_g: K over the dense K with"
        " the same dist error)")
  if jit_times:
    print("jitted, warm, K=%d: " % LIB_GAUSS_DIM + ", ".join(
        f"{kind} {t:.3f} s/call (compile {c:.1f} s)"
        for kind, (t, c) in jit_times.items()))


# --------------------------------------------------------------------------
# Summary and recommendation.

def summary(results: dict[str, list[Row]]) -> None:
  curves = {}  # (model, kind, metric) -> (dims, mean errors)
  for name, rows in results.items():
    for kind in ("gaussian=", "kronecker"):
      curve = [r for r in rows if r.kind == kind]
      for metric in METRICS:
        curves[name, kind, metric] = ([r.dim for r in curve],
                                      [r.mean[metric] for r in curve])
  print("\n=== Smallest K reaching a mean RMS error: on the grid (log-log "
        "interpolated), and K_kron / K_gauss at that error")
  for metric in ("dist", "sq"):
    for target in TARGETS:
      for name in results:
        ks = {kind: (grid_k(*curves[name, kind, metric], target),
                     k_for(*curves[name, kind, metric], target))
              for kind in ("gaussian=", "kronecker")}
        (gk, gi), (kk, ki) = ks["gaussian="], ks["kronecker"]
        interp = lambda k: "     -" if k is None else f"{k:6.0f}"
        ratio = "-" if gi is None or ki is None else f"{ki / gi:.2f}"
        print(f"{METRIC_NAMES[metric]:>7} <= {target:<5} {name:<11} gaussian "
              f"K={fmt_k(gk):>5} ({interp(gi)})   kronecker K={fmt_k(kk):>5} "
              f"({interp(ki)})   ratio {ratio}")
  print("error ~ K^slope (least squares over the grid, dist): " + "; ".join(
      f"{name} {kind.rstrip('=')} {np.polyfit(np.log(d), np.log(e), 1)[0]:+.2f}"
      for name in results for kind in ("gaussian=", "kronecker")
      for d, e in [curves[name, kind, "dist"]]))

  # Rule: one distortion target for both paths, met on every model.
  target = TARGETS[0]
  rec, ratios = {}, []
  for kind in ("gaussian=", "kronecker"):
    ks = [grid_k(*curves[name, kind, "dist"], target) for name in results]
    rec[kind] = None if None in ks else max(ks)
  for name in results:
    gi = k_for(*curves[name, "gaussian=", "dist"], target)
    ki = k_for(*curves[name, "kronecker", "dist"], target)
    if gi and ki:
      ratios.append(ki / gi)

  def errors_at(kind, dim):
    out = []
    for name, rows in results.items():
      r = next((r for r in rows if r.kind == kind and r.dim == dim), None)
      if r is not None:
        out.append(f"{name} {r.mean['dist']:.3f} (worst seed {r.worst['dist']:.3f})")
    return ", ".join(out)

  print(f"\n=== Recommended default sketch dimensions")
  print(f"rule: one target for both paths, mean RMS distance error <= {target} "
        f"on every model measured (squared distances ~{2 * target:.2f}), "
        f"smallest power of two")
  for label, kind in (("reference path (dense gaussian)", "gaussian="),
                      ("factored path (kronecker)      ", "kronecker")):
    k = rec[kind]
    print(f"{label}: K = {fmt_k(k):>5}   dist error "
          f"{errors_at(kind, k) if k else '-'}")
  if ratios:
    span = (f"{min(ratios):.1f}" if len(ratios) == 1
            else f"{min(ratios):.1f}-{max(ratios):.1f}")
    print(f"why: at equal distortion the Kronecker map needs {span}x the "
          f"dense dimension here (docs/method.md §7: about 2x), "
          f"more for tighter targets (its error falls slower than K^-1/2:\n"
          f"     between K^-1/4 for low-rank layer gradients and K^-1/2); it "
          f"costs ~sqrt(K) (docs/method.md §7: +0.9% -> +1.7% FLOPs of a GPT-2 124M\n"
          f"     step from K=256 to 1024), while the dense map costs P*K random "
          f"numbers per step, so it stays at the smallest K that meets the "
          f"target.")


def main() -> None:
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true",
                      help="the small model only, no jitted Kronecker timing")
  parser.add_argument("--seeds", type=int, default=5, help="sketch seeds")
  parser.add_argument("--train_steps", type=int, default=None,
                      help="Adam steps before measuring (default 60, --quick 40;"
                      " 0: at init)")
  parser.add_argument("--seed", type=int, default=0,
                      help="model init and data seed")
  args = parser.parse_args()
  if args.train_steps is None:
    args.train_steps = 40 if args.quick else 60
  start = time.perf_counter()
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, "
        f"{jax.device_count()} device(s), {platform.processor() or platform.machine()}; "
        f"B={BATCH}, T={SEQ_LEN}, {args.seeds} seeds, K in {DIMS}")
  names = ["mini"] if args.quick else list(MODELS)
  results = {}
  for name in names:
    overrides, lib_seeds = MODELS[name]
    lib_seeds = 1 if args.quick else min(lib_seeds, args.seeds)
    results[name] = measure(name, overrides, lib_seeds, args)
  summary(results)
  print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
  main()
