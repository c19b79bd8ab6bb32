"""The factored engine: per-sample sketches and the DoGraph update from one
forward/backward pass, never forming a per-sample gradient (docs/method.md §7).

For a linear layer ``y = x W + b`` applied to the tokens of sample ``i``, the
per-sample gradient of ``[W; b]`` is ``[X_i, 1]^T D_i`` (``X_i``: the layer's
``T x in`` inputs, ``D_i = dl_i/dy``: its ``T x out`` output-gradients). Its
Kronecker sketch ``P_in^T [X_i, 1]^T D_i P_out = ([X_i, 1] P_in)^T (D_i
P_out)`` costs ``O(T (in k_in + out k_out + k_in k_out))``. The same holds for
the embeddings (rows selected by token ids or positions) and the tied output
layer (``G = D_logits^T h``, sketched as ``(D_logits P_in)^T (h P_out)``),
which shares the embedding's factors, so the sketch describes the tied
gradient. LayerNorm gradients are small per-sample vectors
(``sum_t D_t * xhat_t`` and ``sum_t D_t``) and get dense blocks. The map is
exactly ``projection.sketch(kind="kronecker")`` of the per-sample gradients
(same keys, same factors), which the tests use as the oracle.

``D`` for every layer comes from one backward pass of the per-sample losses
(cotangent ones) with respect to zero perturbations added to each layer's
output (``Module.perturb``), the parameters held fixed, so XLA drops the
weight-gradient products. The update ``sum_i a_i g_i`` is then formed from the
same stored tensors ("book-keeping"): ``[X, 1]^T (a * D)`` over all tokens,
the plain step's weight-gradient product with the narrower operand scaled.
A sample the caller leaves out (``keep_B``, e.g. a non-finite one: ``0 * NaN``
is NaN) is discarded without masking any stored tensor: only when some sample
is left out does a ``lax.cond`` switch to products taken sample by sample.
``update="second_backward"`` instead reuses the forward pass for a second
backward with cotangent ``a`` (exact too, about a third more FLOPs, and it
keeps nothing but the autodiff residuals).

Dtypes: ``X`` and ``D`` stay in the model's compute dtype (bfloat16 runs keep
bfloat16 operands, so a GPU multiplies them on its tensor cores) and every
large product accumulates in float32 (``preferred_element_type``) at default
precision, as the model's own matmuls do; the sketch factors are cast to the
compute dtype for those products (a fixed rounding of the map, the same at
every step). With float32 compute this is exactly the float32 map.

The model must be built from :mod:`dograph_jax.models.taps` layers (``Linear``
with or without bias, ``LayerNorm``, ``RMSNorm``) and may tap, at its root,
``tokens``/``embeddings`` (the sum of token and position embeddings) and
``head_inputs``/``logits`` (a tied output layer), as
:class:`dograph_jax.models.GPT2` and :class:`dograph_jax.models.Llama` do (the
token embedding is ``wte``; a model without ``wpe`` has no position table,
e.g. rotary positions; an untied head is a tapped ``Linear``). Losses must be
per sample: no layer may mix samples of the batch.

Shape legend: ``B`` batch, ``T`` tokens, ``K`` sketch dimension, ``V``
vocabulary, ``D`` width, ``N`` positions.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dograph_jax import projection
from dograph_jax.models import taps

PyTree = Any
Update = Literal["bookkeeping", "second_backward"]
# Only for the small products of already-projected float32 factors
# (O(B T k_in k_out)), where the precision is free; the large products use
# the default precision (see the module docstring).
_HI = jax.lax.Precision.HIGHEST


class FactoredGrads(NamedTuple):
  """What ``dograph_transform`` needs instead of per-sample gradients.

  Pass it as ``updates`` to the transform's ``update``.
  """
  losses: jax.Array      # (B,) float32 per-sample losses
  sketches: jax.Array    # (B, K) float32 Kronecker sketches of the gradients
  # (a_B, keep_B=None) -> sum_i a_i g_i (params-like, float32 accumulation);
  # keep_B (B,) bool marks the samples whose stored tensors may be read
  # (None: those with a_i != 0), so a non-finite sample can be left out.
  weighted_grad: Callable[..., PyTree]
  second_backward: bool  # True if weighted_grad is a second backward pass
  blocks: dict | None = None  # name -> (B, K) sketch of each parameter block, if asked


class LaggedPass(NamedTuple):
  """What the one pass of :class:`LaggedGrads` returns."""
  losses: jax.Array    # (B,) float32 per-sample losses
  sketches: jax.Array  # (B, K) float32 sketches
  ratios: jax.Array    # (B,) float32 coefficients r_i the pass applied (0 where not kept)
  grad_sum: PyTree     # params-like float32: sum_i r_i g_i


class LaggedGrads(NamedTuple):
  """Micro-batched factored material whose update is formed in the same
  pass as its sketches (docs/method.md §7b, design (c)).

  ``run(ratio_fn) -> LaggedPass``: for each micro-batch, the engine makes
  the losses and sketches, asks ``ratio_fn(z_bxK, losses_b) -> (r_b,
  kept_b)`` for its rows' coefficients and the rows to keep (the
  transform answers from its state *before* this batch: the previous
  step's weights), and adds ``sum_i r_i g_i`` by book-keeping before the
  micro-batch's stored tensors are dropped. ``dograph_transform`` then
  normalises by ``sum_i r_i`` and advances its domains and weights with the
  whole batch's sketches, as for :class:`FactoredGrads`. ``result()``
  returns the pass ``run`` made (in the same trace, once the transform has
  run it): the caller reads the step's losses there.
  """
  run: Callable[[Callable], LaggedPass]
  result: Callable[[], LaggedPass]


def _leaf_index(params: PyTree) -> dict[tuple, int]:
  """Parameter path (tuple of keys) -> leaf index in flatten order."""
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  return {tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path): i
          for i, (path, _) in enumerate(flat)}


def _get(tree: dict, path: tuple) -> Any:
  for k in path:
    tree = tree[k]
  return tree


def _walk(tree: Any, path: tuple = ()):
  """Yield (path, node) for every dict node of a nested pure dict."""
  if isinstance(tree, dict):
    yield path, tree
    for k, v in tree.items():
      yield from _walk(v, path + (k,))


def _first(v):
  # `sow` stores a tuple of the values sown (one per call).
  return v[0] if isinstance(v, tuple) else v


def _f32(x):
  return x.astype(jnp.float32)


def _mm(spec, x, y):
  """A large product: accumulated and returned in float32, default precision."""
  return jnp.einsum(spec, x, y, preferred_element_type=jnp.float32)


def factored_grads(model_fn: Callable[[Any, jax.Array], jax.Array], graphdef: nnx.GraphDef,
                   params: PyTree, inputs: Any, key: jax.Array, dim: int, *,
                   update: Update = "bookkeeping",
                   block_budget: int = projection.DEFAULT_BLOCK_BUDGET,
                   per_block: bool = False,
                   normalize_blocks: bool = False) -> FactoredGrads:
  """Per-sample losses, Kronecker sketches and the weighted-gradient map.

  Args:
    model_fn: ``model_fn(model, inputs) -> losses_B``, the per-sample losses of
      the merged model (e.g. mean token cross-entropy of each sequence).
    graphdef, params: the model split by ``models.split_model`` (``params`` a
      pure nested dict).
    inputs: the batch (leading axis ``B``), passed to ``model_fn``.
    key: the projection key; ``dim``: sketch dimension ``K``.
    update: ``"bookkeeping"`` (default) or ``"second_backward"``.
    block_budget: as in :func:`dograph_jax.sketch` (dense LayerNorm blocks).
    per_block: also return each parameter block's own sketch (for tests and
      diagnostics), keyed by its parameter path (``"h/0/attn/c_attn"``,
      ``"h/0/ln_1/scale"``, ``"wte/embedding"``, ...).
    normalize_blocks: scale each block's sketch of each sample to unit norm
      before summing, as :func:`dograph_jax.sketch` does with the same flag
      (the blocks above; ``per_block`` returns them unscaled).

  Returns:
    :class:`FactoredGrads`; ``sketches`` equals
    ``sketch(per_sample_grads, key, dim, kind="kronecker")`` (with float32
    compute; with bfloat16 up to its rounding, see the module docstring).
  """
  if update not in ("bookkeeping", "second_backward"):
    raise ValueError(f"factored_grads: unknown update {update!r}.")

  def run(p, perturbations):
    model = nnx.merge(graphdef, p)
    with taps.tapping():
      losses, inter = nnx.capture(model_fn, nnx.Intermediate, init=perturbations)(
          model, inputs)
    return losses.astype(jnp.float32), inter

  def zero_perturbations():
    model = nnx.merge(graphdef, params)
    with taps.tapping():
      _, perts = nnx.capture(model_fn, nnx.Perturbation)(model, inputs)
    return perts

  shapes = jax.eval_shape(zero_perturbations)
  perts = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  if update == "second_backward":
    losses, vjp_fn, inter = jax.vjp(run, params, perts, has_aux=True)
    _, d_state = vjp_fn(jnp.ones_like(losses))
  else:
    losses, vjp_fn, inter = jax.vjp(lambda q: run(params, q), perts, has_aux=True)
    (d_state,) = vjp_fn(jnp.ones_like(losses))
  inter = nnx.to_pure_dict(inter)
  dgrad = nnx.to_pure_dict(d_state)
  index = _leaf_index(params)
  batch = losses.shape[0]
  contributions: dict[str, jax.Array] = {}
  blocks = []  # (kind, path, tensors) for the book-keeping update

  def add(path, z):
    name = "/".join(map(str, path))
    contributions[name] = contributions[name] + z if name in contributions else z

  def factors(param_path, rows, cols):
    return projection.kronecker_factors(projection.leaf_key(key, index[param_path]),
                                        rows, cols, dim)

  def kron(left_BxTxA, right_BxTxC):
    return jnp.einsum("bta,btc->bac", left_BxTxA, right_BxTxC,
                      precision=_HI).reshape(batch, dim)

  for path, node in _walk(dgrad):
    if "outputs" in node and path in _paths_with(inter, "inputs"):  # Linear
      x = _first(_get(inter, path)["inputs"])  # compute dtype, as stored
      d = node["outputs"]
      kernel = _get(params, path)["kernel"]
      has_bias = "bias" in _get(params, path)
      p_in, p_out = factors(path + ("kernel",), kernel.shape[0] + has_bias, kernel.shape[1])
      xp = _mm("bti,ia->bta", x, p_in[:kernel.shape[0]].astype(x.dtype))
      if has_bias:
        xp = xp + p_in[kernel.shape[0]]
      add(path, kron(xp, _mm("bto,oc->btc", d, p_out.astype(d.dtype))))
      blocks.append(("linear", path, (x, d, has_bias)))
    elif "outputs" in node and path in _paths_with(inter, "normalized"):  # LayerNorm, RMSNorm
      xhat = _f32(_first(_get(inter, path)["normalized"]))
      d = _f32(node["outputs"])
      g_scale = jnp.sum(d * xhat, axis=1)
      # RMSNorm has no bias
      g_bias = jnp.sum(d, axis=1) if "bias" in _get(params, path) else None
      for name, g in (("scale", g_scale), ("bias", g_bias)):
        if g is not None:
          add(path + (name,), projection.dense_sketch_leaf(
              g, projection.leaf_key(key, index[path + (name,)]), dim, block_budget))
      blocks.append(("layernorm", path, (g_scale, g_bias)))

  if "embeddings" in dgrad:  # token and position embeddings, tied output layer
    tokens = _first(inter["tokens"])
    d_emb = dgrad["embeddings"]
    wte = params["wte"]["embedding"]
    t = tokens.shape[1]
    p_in, p_out = factors(("wte", "embedding"), *wte.shape)
    d_emb_p = _mm("btd,dc->btc", d_emb, p_out.astype(d_emb.dtype))
    add(("wte", "embedding"), kron(p_in[tokens], d_emb_p))
    if "logits" in dgrad:
      h = _first(inter["head_inputs"])
      d_logits = dgrad["logits"]  # float32 (the model's logits are)
      add(("wte", "embedding"), kron(_mm("btv,va->bta", d_logits, p_in.astype(d_logits.dtype)),
                                     _mm("btd,dc->btc", h, p_out.astype(h.dtype))))
      blocks.append(("head", ("wte", "embedding"), (h, d_logits)))
    if "wpe" in params:
      q_in, q_out = factors(("wpe", "embedding"), *params["wpe"]["embedding"].shape)
      add(("wpe", "embedding"), jnp.einsum(
          "ta,btc->bac", q_in[:t], _mm("btd,dc->btc", d_emb, q_out.astype(d_emb.dtype)),
          precision=_HI).reshape(batch, dim))
    blocks.append(("embeddings", (), (tokens, d_emb)))

  if update == "second_backward":
    def weighted_grad(a_B, keep_B=None):
      # Non-finite samples cannot be left out of a backward pass (0 * NaN is
      # NaN in its residuals); the transform skips such a step instead.
      del keep_B
      return vjp_fn(a_B.astype(losses.dtype))[0]
  else:
    def weighted_grad(a_B, keep_B=None):
      return _bookkeeping(params, blocks, a_B, keep_B)

  scale = projection.unit_rows if normalize_blocks else (lambda z: z)
  z_BxK = sum(map(scale, contributions.values()), jnp.zeros((batch, dim), jnp.float32))
  return FactoredGrads(losses, z_BxK, weighted_grad, update == "second_backward",
                       contributions if per_block else None)


def _paths_with(inter: dict, name: str) -> set:
  return {path for path, node in _walk(inter) if name in node}


def _bookkeeping(params: PyTree, blocks: list, a_B: jax.Array,
                 keep_B: jax.Array | None) -> PyTree:
  """``sum_i a_i g_i`` from the stored inputs and output-gradients.

  A sample with ``keep_B[i] = False`` (default: ``a_i == 0``) contributes
  nothing even if its stored tensors are non-finite (``0 * NaN`` is NaN, so
  scaling by ``a_i = 0`` is not enough). The common step (every sample kept)
  reads the stored tensors as they are, in one product per layer; only when
  some sample is dropped (``lax.cond``) are the products taken sample by
  sample and a dropped sample's contribution discarded, which needs no
  masked copy of any stored tensor (D_logits, ``B x T x V``, is the widest).
  """
  if keep_B is None:
    keep_B = a_B != 0
  a_B = jnp.where(keep_B, a_B.astype(jnp.float32), 0.0)

  def all_kept():
    return _accumulate(params, blocks, a_B)

  def some_dropped():
    def one_sample(i, grads):
      rows = [(kind, path, tuple(jax.lax.dynamic_slice_in_dim(x, i, 1, 0)
                                 if isinstance(x, jax.Array) else x for x in tensors))
              for kind, path, tensors in blocks]
      return _accumulate(params, rows, jax.lax.dynamic_slice_in_dim(a_B, i, 1, 0),
                         grads, keep_B[i])
    return jax.lax.fori_loop(0, a_B.shape[0], one_sample, _zeros_like_f32(params))

  grads = jax.lax.cond(jnp.all(keep_B), all_kept, some_dropped)
  return jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)


def _zeros_like_f32(params: PyTree) -> PyTree:
  return jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)


def _accumulate(params: PyTree, blocks: list, a: jax.Array, grads: PyTree | None = None,
                keep: jax.Array | None = None) -> PyTree:
  """Add the book-keeping sums over the samples of ``blocks`` to ``grads``.

  ``grads``: float32, params-like (default zeros). ``keep``: optional scalar
  bool; if False every contribution is discarded (a select on each product,
  never on the stored tensors), so a non-finite sample adds nothing.
  """
  # A fresh nest of dicts (same leaves): `put` assigns into it.
  grads = jax.tree.map(lambda g: g, grads if grads is not None else _zeros_like_f32(params))
  kept = (lambda v: v) if keep is None else (lambda v: jnp.where(keep, v, 0.0))

  def put(path, name, value):
    node = _get(grads, path)
    node[name] = node[name] + kept(value)

  def scatter_add(path, name, index, rows):
    node = _get(grads, path)
    node[name] = node[name].at[index].add(kept(rows))

  for kind, path, tensors in blocks:
    if kind == "linear":
      x, d, has_bias = tensors
      # Scale the narrower operand by a (the cheaper product), kept in the
      # compute dtype so that the product runs at its speed.
      if x.shape[-1] <= d.shape[-1]:
        x_scaled, d_scaled = (x * a[:, None, None]).astype(x.dtype), d
      else:
        x_scaled, d_scaled = x, (d * a[:, None, None]).astype(d.dtype)
      put(path, "kernel", _mm("bti,bto->io", x_scaled, d_scaled))
      if has_bias:
        put(path, "bias", a @ jnp.sum(d, axis=1, dtype=jnp.float32))
    elif kind == "layernorm":
      g_scale, g_bias = tensors
      put(path, "scale", a @ g_scale)
      if g_bias is not None:
        put(path, "bias", a @ g_bias)
    elif kind == "head":
      h, d_logits = tensors
      # Scale the narrow operand (h, width D) and read D_logits (width V)
      # as stored: no scaled copy of the widest tensor. The product is taken
      # as (D, V) and transposed after a barrier: folded into the product, the
      # transpose makes XLA:CPU pick a (V, D) layout that multiplies 2.6x
      # slower (measured at B16 T64 and B48 T128, mini); the transpose alone
      # is a small copy.
      h_scaled = (h * a[:, None, None]).astype(h.dtype)
      g_DxV = jax.lax.optimization_barrier(_mm("btd,btv->dv", h_scaled, d_logits))
      put(path[:-1], path[-1], g_DxV.T)
    elif kind == "embeddings":
      tokens, d_emb = tensors
      ad = _f32(d_emb) * a[:, None, None]
      scatter_add(("wte",), "embedding", tokens.reshape(-1), ad.reshape(-1, ad.shape[-1]))
      if "wpe" in params:
        put(("wpe",), "embedding", jnp.pad(jnp.sum(ad, 0), (
            (0, params["wpe"]["embedding"].shape[0] - tokens.shape[1]), (0, 0))))
  return grads
