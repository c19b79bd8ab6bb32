"""The data-mixing methods the trainer knows, behind one switch (``--method``).

Three kinds:

* ``plain`` — the batch-mean gradient: ``uniform`` (natural proportions;
  with ``--proportions uniform`` it is stratified).
* ``dograph`` — ``dograph_transform`` chained ahead of AdamW (the paper).
* ``online`` — an :class:`dograph_jax.mixing.OnlineMixer` turns the step's
  losses (and, where it asks, reference losses, the per-domain gradient Gram
  matrix or held-out probe losses) into per-sample loss weights:
  ``loss_based`` (Sow et al. 2025), ``group_dro`` (Sagawa et al. 2020),
  ``aioli`` (Chen et al. 2025), ``ado`` (Jiang et al. 2025), ``odm``
  (Albalak et al. 2023), the proxy runs ``doremi_proxy`` and
  ``doge_proxy``, and ``rnb_rounds`` (R&B's round rule, on clusters).
* ``offline`` — a pipeline of proxy runs that ends in sampling proportions
  for a final plain run: ``stratified``, ``temperature``, ``doremi``,
  ``doge``, ``regmix``, ``mixing_law``; or, for ``rnb`` (R&B, Ge et al.
  2025), a regrouping of the corpus into semantic clusters followed by one
  run with its online mixer ``rnb_rounds`` on the clusters
  (``dograph_jax/train/offline.py``).

A new online method is one module in ``dograph_jax/mixing`` with a factory
``f(num_domains, **hyperparameters) -> OnlineMixer`` plus one line in
:data:`ONLINE`. ``--method_args name value ...`` sets the factory's keyword
arguments, checked against its signature. Float-valued ones are kept in the
train state and passed to the factory inside the jitted step (the factories
accept traced scalars), so changing them does not recompile — like the
``inject_hyperparams`` hyperparameters of the optimizer; ints and strings
(strategies, phase lengths) are compile-time constants.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Mapping

import jax.numpy as jnp

# method -> (module, factory) of its OnlineMixer.
ONLINE = {
    "loss_based": ("dograph_jax.mixing.loss_reweighting", "loss_reweighting"),
    "group_dro": ("dograph_jax.mixing.group_dro", "group_dro"),
    "aioli": ("dograph_jax.mixing.aioli", "aioli"),
    "doremi_proxy": ("dograph_jax.mixing.doremi", "doremi"),
    "doge_proxy": ("dograph_jax.mixing.doge", "doge"),
    "rnb_rounds": ("dograph_jax.mixing.rnb", "rnb"),
    "ado": ("dograph_jax.mixing.ado", "ado"),
    "odm": ("dograph_jax.mixing.odm", "odm"),
}
OFFLINE = ("stratified", "temperature", "doremi", "doge", "regmix", "mixing_law", "rnb")
METHODS = ("uniform", "dograph", *ONLINE, *OFFLINE)
# The paper's Table 2 order, then the extra baselines: what compare.py runs.
COMPARED = ("uniform", "stratified", "loss_based", "doremi", "doge", "regmix", "mixing_law",
            "group_dro", "aioli", "temperature", "rnb", "ado", "odm", "dograph")


# Offline methods whose proxy run is an online mixer: their --method_args go to it.
PROXY = {"doremi": "doremi_proxy", "doge": "doge_proxy"}
# Offline methods whose *final* run is an online mixer (on regrouped domains).
FINAL_MIXER = {"rnb": "rnb_rounds"}
# Offline methods with hyperparameters of their own: (module, function); the
# function's keyword arguments after the first are the --method_args.
OFFLINE_ARGS = {"temperature": ("dograph_jax.mixing.temperature", "temperature_proportions")}
# Arguments the pipeline sets itself, not --method_args.
PIPELINE_ONLY = {"temperature": ("budget",)}


# --apply_weights: how an online mixer's domain weights act on training.
APPLY_WEIGHTS = ("paper", "sample", "reweight")


def weights_form(method: str, apply_weights: str, paper_form: str) -> str:
  """``"sample"``, ``"reweight"`` or ``"per_sample"``: how ``method``'s mixer
  (whose paper uses ``paper_form``, its ``OnlineMixer.form``) applies its
  weights under ``--apply_weights``.

  ``paper`` is the published form: Aioli, R&B, ADO and ODM draw the batch
  with their proportions (``sample``); Group DRO and the DoReMi/DoGE proxies
  weight the losses of a batch drawn at the run's proportions
  (``reweight``); loss-based reweighting weights single rows
  (``per_sample``, in the batch only).

  Raises:
    ValueError: an unknown choice, or ``sample`` for a per-sample mixer.
  """
  if apply_weights not in APPLY_WEIGHTS:
    raise ValueError(f"--apply_weights must be one of {APPLY_WEIGHTS}, got {apply_weights!r}")
  if apply_weights == "paper":
    return paper_form
  if paper_form == "per_sample":
    if apply_weights == "sample":
      raise ValueError(f"--apply_weights sample: method {method!r} weights single rows, not "
                       "domains, so there are no proportions to sample with; it reweights "
                       "in the batch (--apply_weights paper)")
    return paper_form
  return apply_weights


def kind(method: str) -> str:
  """``"plain"``, ``"dograph"``, ``"online"`` or ``"offline"``."""
  if method == "uniform":
    return "plain"
  if method == "dograph":
    return "dograph"
  if method in ONLINE:
    return "online"
  if method in OFFLINE:
    return "offline"
  raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def factory(method: str):
  module, name = ONLINE[method]
  return getattr(importlib.import_module(module), name)


def _convert(text: str, default: Any, method: str, name: str) -> Any:
  try:
    if isinstance(default, bool):
      if text.lower() not in ("true", "false", "1", "0"):
        raise ValueError(text)
      return text.lower() in ("true", "1")
    if isinstance(default, (int, float, str)):
      return type(default)(text)
    if default is None:  # a tuple of floats, written "0.2:0.3:0.5"
      return tuple(float(v) for v in text.split(":"))
  except ValueError:
    what = "list of numbers a:b:..." if default is None else type(default).__name__
    raise ValueError(f"--method_args: {name}={text!r} is not a valid "
                     f"{what} for method {method!r}") from None
  return float(text)


def parse_method_args(method: str, args: Mapping[str, Any]) -> tuple[dict, dict]:
  """``(static, traced)`` keyword arguments of ``method``'s factory from the
  mapping ``args`` (``--method_args name value ...``; command-line values are
  strings), typed by the factory's defaults.

  ``traced`` holds the float-valued ones (kept in the train state, see the
  module docstring). Every float argument appears in ``traced`` (defaults
  included), so the train state has the same structure for every value.

  Raises:
    ValueError: an argument the factory does not take, a malformed pair, a
      value of the wrong type, or arguments for a method that takes none.
  """
  if not isinstance(args, Mapping):
    raise TypeError(f"--method_args is a mapping of name -> value, got {args!r}")
  if method in PROXY:  # checked against the proxy run's mixer
    return parse_method_args(PROXY[method], args)
  if method in FINAL_MIXER:
    return parse_method_args(FINAL_MIXER[method], args)
  if method in OFFLINE_ARGS:
    module, name = OFFLINE_ARGS[method]
    fn = getattr(importlib.import_module(module), name)
  elif kind(method) == "online":
    fn = factory(method)
  else:
    if args:
      raise ValueError(f"--method_args is only for the online mixers {tuple(ONLINE)}, "
                       f"the proxies of {tuple(PROXY)} and {(*FINAL_MIXER, *OFFLINE_ARGS)}; "
                       f"method {method!r} takes none (got {dict(args)!r})")
    return {}, {}
  params = {name: p for name, p in list(inspect.signature(fn).parameters.items())[1:]
            if name not in PIPELINE_ONLY.get(method, ())}
  given = {}
  for name, value in args.items():
    if name not in params:
      raise ValueError(f"--method_args: method {method!r} has no argument {name!r}; "
                       f"it takes {sorted(params)}")
    given[name] = _convert(str(value) if not isinstance(value, (list, tuple)) else
                           ":".join(map(str, value)), params[name].default, method, name)
    # Every integer hyperparameter of the mixers is a count (steps, rounds,
    # rows) or a seed; the float ones are rates and weights: none is negative.
    if isinstance(given[name], (int, float)) and not isinstance(given[name], bool) and (
        given[name] < 0 or given[name] != given[name]):
      raise ValueError(f"--method_args: {name}={value!r} for method {method!r} must be a "
                       "non-negative number")
  static, traced = {}, {}
  for name, p in params.items():
    if p.default is None:  # optional, static (a tuple of floats: R&B's target)
      if name in given:
        static[name] = given[name]
      continue
    value = given.get(name, p.default)
    if isinstance(p.default, float) and not isinstance(p.default, bool):
      traced[name] = float(value)
    elif name in given:
      static[name] = value
  return static, traced


def inert_settings(method: str, args: Mapping[str, Any], steps: int) -> list[str]:
  """Why ``method`` with ``args`` trains exactly like Uniform for a
  ``steps``-step run (empty if it does not, as far as checked here).

  Two defaults are identities at small budgets: temperature sampling's
  ``T = 1`` is the natural mixture (without an epoch cap), and loss-based
  reweighting's 1000-step burn-in (the authors' setting for long runs)
  covers a run of 1000 steps or fewer. Such a run is not an error, but a
  table that calls it the method would be wrong, so the trainer logs it.
  """
  reasons = []
  if method == "temperature":
    _, traced = parse_method_args(method, args)
    if traced["T"] == 1.0 and traced["max_epochs"] == 0.0:
      reasons.append("--method temperature with T=1 and no epoch cap samples the natural "
                     "mixture, as uniform does (set --method_args T=...)")
  if method == "loss_based":
    static, _ = parse_method_args(method, args)
    burn_in = static.get("burn_in", inspect.signature(factory(method)).parameters["burn_in"].default)
    if burn_in >= steps:
      reasons.append(f"--method loss_based: burn_in={burn_in} >= --steps {steps}, so every "
                     "step keeps the uniform weights (set --method_args burn_in=...)")
  return reasons


def build_mixer(method: str, num_domains: int, static: dict, traced: dict):
  """The method's ``OnlineMixer``; ``traced`` values may be jax scalars."""
  return factory(method)(num_domains, **static, **traced)


def traced_state(traced: dict) -> dict:
  """The float hyperparameters as float32 scalars for the train state."""
  return {k: jnp.asarray(v, jnp.float32) for k, v in traced.items()}
