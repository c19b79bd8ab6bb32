"""Layers that expose what the factored DoGraph engine needs (docs/method.md §7).

For a linear layer ``y = x W + b`` the per-sample gradient is ``X_i^T D_i``
(with ``D = dloss/dy``), so the engine needs each layer's input ``X`` and
output-gradient ``D``; for a LayerNorm ``y = xhat * scale + bias`` it needs
the normalised input ``xhat`` and ``D``. The layers here record their input
with ``Module.sow`` and route their output through ``Module.perturb`` — a
zero added to the output whose gradient is ``D`` — but only while
:func:`tapping` is active. Outside it they are plain layers: no state is
written, nothing warns, and the ordinary forward pass is unchanged.

Sown and perturbed names (under each module's path):

* :class:`Linear`: ``inputs`` (``nnx.Intermediate``), ``outputs``
  (``nnx.Perturbation``);
* :class:`LayerNorm` and :class:`RMSNorm`: ``normalized``
  (``nnx.Intermediate``), ``outputs`` (``nnx.Perturbation``).

The model adds its own taps for the embeddings and the tied output layer
(see ``gpt2.GPT2.__call__``).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

_TAPPING = contextvars.ContextVar("dograph_tapping", default=False)


@contextlib.contextmanager
def tapping() -> Iterator[None]:
  """Within this context, tapped layers sow inputs and perturb outputs.

  It acts at trace time (a Python flag read while the function is traced),
  so wrap the traced forward pass, e.g. inside ``nnx.capture``.
  """
  token = _TAPPING.set(True)
  try:
    yield
  finally:
    _TAPPING.reset(token)


def is_tapping() -> bool:
  return _TAPPING.get()


class Linear(nnx.Linear):
  """``nnx.Linear`` (kernel ``(in, out)``, bias ``(out,)``) with taps."""

  def __call__(self, x: jax.Array) -> jax.Array:
    if not is_tapping():
      return super().__call__(x)
    self.sow(nnx.Intermediate, "inputs", x)
    return self.perturb("outputs", super().__call__(x))


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis, parameters ``scale`` and ``bias`` ``(D,)``.

  Written out (instead of ``nnx.LayerNorm``) so that the normalised input
  ``xhat`` can be tapped; statistics are computed in float32, the output is
  cast to ``dtype``, and the parameter names match ``nnx.LayerNorm``'s.
  """

  def __init__(self, num_features: int, *, epsilon: float = 1e-5,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    del rngs  # deterministic init: scale 1, bias 0
    self.epsilon = epsilon
    self.dtype = dtype
    self.scale = nnx.Param(jnp.ones((num_features,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, -1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), -1, keepdims=True)
    xhat = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
    if is_tapping():
      self.sow(nnx.Intermediate, "normalized", xhat)
    y = (xhat * self.scale[...].astype(jnp.float32)
         + self.bias[...].astype(jnp.float32)).astype(self.dtype)
    return self.perturb("outputs", y) if is_tapping() else y


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis (LLaMA): ``y = x / sqrt(mean(x^2) + eps) * scale``.

  One parameter, ``scale`` ``(D,)`` (init 1), no bias; the normalised input
  ``xhat`` is tapped as in :class:`LayerNorm`, statistics in float32, the
  output cast to ``dtype`` (HF's ``LlamaRMSNorm`` likewise normalises in
  float32).
  """

  def __init__(self, num_features: int, *, epsilon: float = 1e-6,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    del rngs
    self.epsilon = epsilon
    self.dtype = dtype
    self.scale = nnx.Param(jnp.ones((num_features,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    xhat = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.epsilon)
    if is_tapping():
      self.sow(nnx.Intermediate, "normalized", xhat)
    y = (xhat * self.scale[...].astype(jnp.float32)).astype(self.dtype)
    return self.perturb("outputs", y) if is_tapping() else y
