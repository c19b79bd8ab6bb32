"""lm-evaluation-harness model for our Flax language models (lm-eval 0.4.x).

:class:`FlaxLM` is a ``lm_eval.api.model.TemplateLM`` over any model of
``dograph_jax.models`` given as ``(graphdef, params)`` (``split_model``) and a
``transformers`` tokenizer. lm-eval's core needs no torch; neither does this.

* ``loglikelihood`` (via ``TemplateLM``: context/continuation split as
  lm-eval's HF model does, an empty context conditioned on the EOS token):
  ``sum log p(continuation | context)`` and whether greedy decoding would
  produce the continuation. A context + continuation longer than the model's
  window is truncated from the left, keeping the last ``max_length + 1``
  tokens (as ``HFLM._loglikelihood_tokens``).
* ``loglikelihood_rolling``: lm-eval's disjoint rolling windows
  (``get_rolling_token_windows`` with context length 1, the EOS token as
  prefix): the sum of every token's log-likelihood, each window no longer
  than the model's context.
* ``generate_until``: greedy decoding, stopping at any of the request's
  ``until`` strings (the text is cut before it), at EOS, or after
  ``max_gen_toks`` tokens (default 256); the context is left-truncated to
  leave room for them. Sampling (``do_sample=True``) is refused with an
  error: the adapter is for the deterministic benchmarks. The model has no
  KV cache, so each new token runs the forward pass over the (bucket-padded)
  sequence: fine for the small models this project trains, not a serving
  engine.

Batching and compilation: requests are sorted by length and run in batches
of ``batch_size`` rows (padded with dummy rows), right-padded to the smallest
of a few length buckets (powers of two from 32 up to the model's context), so
a whole task compiles at most once per bucket (``traces`` counts the traces
of the scoring function; the tests check it). The score function returns
per-token log-likelihoods and greedy matches ``(B, L)``, never the ``(B, L,
V)`` logits, to the host.

Devices: with ``mesh`` (``dograph_jax.sharding.make_mesh``) the parameters
are placed by ``param_shardings`` (FSDP where the mesh has it) and the rows of
each batch are split over all devices (``batch_size`` must be a multiple of
the device count).

:meth:`FlaxLM.from_run_dir` loads a training run's last (or given)
checkpoint with its own tokenizer (``dograph_jax.models.export``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from dograph_jax import sharding
from dograph_jax.models import apply, get_config

log = logging.getLogger("evaluate")

MIN_BUCKET = 32
DEFAULT_MAX_GEN_TOKS = 256


def length_buckets(max_length: int, smallest: int = MIN_BUCKET) -> tuple[int, ...]:
  """Powers of two from ``smallest`` below ``max_length``, then ``max_length``."""
  out, n = [], smallest
  while n < max_length:
    out.append(n)
    n *= 2
  return tuple(out) + (max_length,)


class FlaxLM(TemplateLM):
  """lm-eval model over ``apply(graphdef, params, tokens)``.

  Args:
    graphdef, params: the model (``dograph_jax.models.split_model``).
    tokenizer: a ``transformers`` tokenizer of the model's vocabulary.
    max_length: the model's context (its ``n_positions``).
    batch_size: rows per forward pass (default 16).
    max_gen_toks: default generation budget of ``generate_until``.
    mesh: optional ``jax.sharding.Mesh``; see the module docstring.
  """

  def __init__(self, graphdef, params, tokenizer, max_length: int, *, batch_size: int = 16,
               max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, mesh=None):
    super().__init__()
    if batch_size < 1:
      raise ValueError(f"FlaxLM: batch_size must be >= 1, got {batch_size}")
    if mesh is not None and batch_size % mesh.size:
      raise ValueError(f"FlaxLM: batch_size {batch_size} is not a multiple of the mesh's "
                       f"{mesh.size} devices")
    if tokenizer.eos_token_id is None:
      raise ValueError("FlaxLM: the tokenizer has no EOS token (lm-eval conditions empty "
                       "contexts and rolling windows on it)")
    self.tokenizer = tokenizer
    self.max_length = int(max_length)
    self.batch_size = int(batch_size)
    self.max_gen_toks = int(max_gen_toks)
    self.buckets = length_buckets(self.max_length)
    self._mesh = mesh
    self._put = lambda x: jnp.asarray(x)
    if mesh is not None:
      params = jax.device_put(params, sharding.param_shardings(params, mesh))
      rows = sharding.batch_sharding(mesh)
      self._put = lambda x: jax.device_put(x, rows)
    self._params = params
    self.traces: list[int] = []  # one entry per trace of the scoring function

    def score(p, tokens_BxL, targets_BxL):
      self.traces.append(tokens_BxL.shape[1])
      logits = apply(graphdef, p, tokens_BxL)
      logp = jax.nn.log_softmax(logits, axis=-1)
      token_ll = jnp.take_along_axis(logp, targets_BxL[..., None], axis=-1)[..., 0]
      return token_ll, jnp.argmax(logits, axis=-1) == targets_BxL

    def next_token(p, tokens_BxL, last_B):
      self.traces.append(-tokens_BxL.shape[1])  # generation traces, negative lengths
      logits = apply(graphdef, p, tokens_BxL)
      return jnp.argmax(jnp.take_along_axis(logits, last_B[:, None, None], axis=1)[:, 0], -1)

    self._score = jax.jit(score)
    self._next_token = jax.jit(next_token)

  # ---- construction from a training run ----------------------------------

  @classmethod
  def from_run_dir(cls, run_dir: str | Path, *, step: int | None = None, **kwargs) -> "FlaxLM":
    """The model of a run directory's last (or ``step``) checkpoint, with the
    run's own tokenizer; ``kwargs`` go to the constructor."""
    from dograph_jax.models import build, split_model
    from dograph_jax.models.export import read_run_params, run_tokenizer
    from flax import nnx

    params, meta, run_config = read_run_params(run_dir, step)
    config = get_config(run_config["model"], vocab_size=meta["vocab_size"],
                        dtype=jnp.bfloat16 if run_config.get("dtype") == "bfloat16"
                        else jnp.float32)
    graphdef, _ = split_model(nnx.eval_shape(lambda: build(config, nnx.Rngs(0))))
    tokenizer = run_tokenizer(run_dir, run_config, meta["vocab_size"])
    params = jax.tree.map(jnp.asarray, params)
    lm = cls(graphdef, params, tokenizer, config.n_positions, **kwargs)
    lm.step = int(meta["step"])
    return lm

  # ---- TemplateLM's tokenization hooks -----------------------------------

  @property
  def eot_token_id(self) -> int:
    return int(self.tokenizer.eos_token_id)

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
    # GPT-2 style: no BOS is added (lm-eval's HF model does the same for GPT-2)
    return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

  def tok_decode(self, tokens: Sequence[int]) -> str:
    return self.tokenizer.decode(list(tokens))

  # ---- scoring ------------------------------------------------------------

  def _bucket(self, length: int) -> int:
    for b in self.buckets:
      if length <= b:
        return b
    raise AssertionError(f"length {length} beyond the context {self.max_length}")

  def _score_pairs(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """``(log-likelihood, greedy)`` of each (context, continuation) token pair."""
    prepared = []
    for context, continuation in pairs:
      if not continuation:
        raise ValueError("FlaxLM: a request has an empty continuation")
      if len(continuation) > self.max_length:
        raise ValueError(f"FlaxLM: a continuation of {len(continuation)} tokens is longer "
                         f"than the model's context ({self.max_length})")
      whole = (list(context) + list(continuation))[-(self.max_length + 1):]
      prepared.append((whole[:-1], whole[1:], len(continuation)))
    order = sorted(range(len(prepared)), key=lambda i: -len(prepared[i][0]))
    out: list[Any] = [None] * len(prepared)
    for start in range(0, len(order), self.batch_size):
      chunk = order[start:start + self.batch_size]
      length = self._bucket(max(len(prepared[i][0]) for i in chunk))
      tokens = np.zeros((self.batch_size, length), np.int32)  # dummy rows stay 0
      targets = np.zeros((self.batch_size, length), np.int32)
      for row, i in enumerate(chunk):
        inp, tgt, _ = prepared[i]
        tokens[row, :len(inp)] = inp
        targets[row, :len(tgt)] = tgt
      token_ll, greedy = jax.device_get(self._score(self._params, self._put(tokens),
                                                    self._put(targets)))
      for row, i in enumerate(chunk):
        inp, _, n = prepared[i]
        span = slice(len(inp) - n, len(inp))  # the continuation's predictions
        out[i] = (float(np.sum(token_ll[row, span], dtype=np.float64)),
                  bool(np.all(greedy[row, span])))
    return out

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
    results = self._score_pairs([(ctx, cont) for _, ctx, cont in requests])
    for (key, _, _), result in zip(requests, results):
      self.cache_hook.add_partial("loglikelihood", key, result)
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    windows, owner = [], []
    for index, request in enumerate(requests):
      (text,) = request.args
      for window in get_rolling_token_windows(self.tok_encode(text), self.eot_token_id,
                                              self.max_length, 1):
        windows.append(make_disjoint_window(window))
        owner.append(index)
    scores = self._score_pairs(windows)
    totals = [0.0] * len(requests)
    for index, (ll, _) in zip(owner, scores):
      totals[index] += ll
    for request, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), total)
    return totals

  # ---- generation -----------------------------------------------------------

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    prepared = []
    for request in requests:
      context, gen_kwargs = request.args
      gen_kwargs = dict(gen_kwargs or {})
      if gen_kwargs.pop("do_sample", False):
        raise ValueError("FlaxLM.generate_until decodes greedily; a task asked for "
                         "do_sample=True")
      until = gen_kwargs.pop("until", None) or []
      until = [until] if isinstance(until, str) else list(until)
      budget = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
      if budget >= self.max_length:
        raise ValueError(f"FlaxLM: max_gen_toks {budget} leaves no room for a context in "
                         f"the model's window ({self.max_length})")
      stops = until + [self.tok_decode([self.eot_token_id])]
      tokens = self.tok_encode(context)[-(self.max_length - budget):] or [self.eot_token_id]
      prepared.append((tokens, budget, stops))
    out: list[Any] = [None] * len(prepared)
    order = sorted(range(len(prepared)), key=lambda i: -len(prepared[i][0]))
    for start in range(0, len(order), self.batch_size):
      chunk = order[start:start + self.batch_size]
      length = self._bucket(max(len(prepared[i][0]) + prepared[i][1] for i in chunk))
      rows = [list(prepared[i][0]) for i in chunk]
      produced = [[] for _ in chunk]
      done = [False] * len(chunk)
      texts = [""] * len(chunk)
      while not all(done):
        tokens = np.zeros((self.batch_size, length), np.int32)
        last = np.zeros((self.batch_size,), np.int32)
        for r, row in enumerate(rows):
          tokens[r, :len(row)] = row
          last[r] = len(row) - 1
        picked = np.asarray(jax.device_get(self._next_token(
            self._params, self._put(tokens), self._put(last))))
        for r, i in enumerate(chunk):
          if done[r]:
            continue
          token = int(picked[r])
          rows[r].append(token)
          produced[r].append(token)
          texts[r] = self.tok_decode(produced[r])
          hit = [texts[r].find(s) for s in prepared[i][2] if s and s in texts[r]]
          if hit or token == self.eot_token_id or len(produced[r]) >= prepared[i][1]:
            if hit:
              texts[r] = texts[r][:min(hit)]
            done[r] = True
      for r, i in enumerate(chunk):
        out[i] = texts[r]
    for request, text in zip(requests, out):
      self.cache_hook.add_partial("generate_until", request.args, text)
    return out
