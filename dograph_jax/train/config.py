"""Configuration of ``experiments/pretrain.py``.

One frozen dataclass; every field can be overridden on the command line as
``--name value`` (booleans as ``true``/``false``, or the bare ``--name`` for
true). Defaults give the CPU run
of the README: ``mini`` GPT-2 trained with DoGraph on the bundled synthetic
corpus in a few minutes. The paper's setting (docs/method.md §6) is batch 48,
20,000 steps, warm-up 500 then cosine, weight decay 0.01, clipping 1.0,
m = 11 clusters, context 512: e.g. ``--model paper-small --batch_size 48
--seq_len 512 --steps 20000 --warmup_steps 500``.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Sequence

from dograph_jax.train.methods import METHODS


@dataclass(frozen=True)
class TrainConfig:
  # --- data ---
  data_dir: str = "data/synthetic"  # SlimPajama-layout folder (train/, validation/) or plain {"text","domain"}; the default is generated if absent
  domain_field: str = "auto"        # dotted path of the domain label; auto = meta.redpajama_set_name, then domain
  proportions: str = ""             # sampling proportions "name=w,..."; empty = natural (by tokens)
  tokenizer: str = ""               # local tokenizer path; empty = train a byte-level BPE on the train split, cached beside the data
  vocab_size: int = 2048            # vocabulary of the trained tokenizer
  # --- method ---
  method: str = "dograph"           # dograph | uniform | stratified | temperature | loss_based | doremi | doge | regmix | mixing_law | group_dro | aioli | rnb (| doremi_proxy | doge_proxy | rnb_rounds): dograph_jax/train/methods.py
  method_args: str = ""             # online baseline's hyperparameters "name=value,..." (its factory's keywords, e.g. "strategy=mid,temperature=0.5")
  reference_dir: str = ""           # doremi_proxy: run directory of the reference model (its last checkpoint)
  proxy_steps: int = 0              # offline methods: steps of each proxy/reference run (0 = steps // 4)
  proxy_runs: int = 8               # regmix / mixing_law: proxy runs at sampled mixtures
  regroup_embedder: str = "tfidf"   # rnb: document embeddings for the regrouping: tfidf (TF-IDF + SVD, offline) | tfidf:DIM | a local sentence-embedding model directory
  regroup_k: str = "auto"           # rnb: cluster counts tried, "lo:hi" (inclusive), the silhouette picks one; auto = D:3D for D human domains
  eval_domains: str = "train"       # validation domains reported: train (the training domains) | validation (every domain of the validation split: a run on regrouped clusters)
  probe_rows: int = 8               # aioli: held-out probe rows per domain (taken from each domain's last training rows)
  objective: str = "uncertainty"    # DoGraph objective: uncertainty | variance | robust | alignment
  num_domains: int = 11             # m, model-centric domains (paper: 11)
  domains: str = "persistent"       # DoGraph domains: persistent (centroids refined across steps, running statistics, frequency-relative a_i) | batch (K-means of each batch, the paper's A.3 literally)
  sketch: str = "factored"          # factored (one pass, no per-sample gradients) | reference (vmap(grad), any loss)
  update: str = "bookkeeping"       # factored path's update: bookkeeping (from stored tensors) | second_backward
  sketch_dim: int = 1024            # K: the Kronecker map needs ~4x the dense dimension for the same distortion (benchmarks/sketch_distortion.py); 256 suits --sketch_kind gaussian
  sketch_kind: str = "kronecker"    # reference path's map: gaussian | kronecker (the factored path is always kronecker)
  sketch_norm: str = "none"         # none | block (each parameter block's sketch of a sample scaled to unit norm before summing: every block counts equally)
  kmeans_iters: int = 10            # Lloyd iterations per step
  distance: str = "euclidean"       # K-means distance: euclidean | cosine (clusters gradient directions, ignores norms)
  warm_start: bool = True           # batch domains: warm-start K-means from the previous centroids
  buffer_size: int = 0              # batch domains: rolling buffer of recent sketches for clustering (0 = batch only)
  prior: str = "frequency"          # persistent domains: reference distribution of the objective: frequency (running p) | uniform
  decay: float = 0.9                # persistent domains: forgetting factor of centroids and running statistics
  anchor: float = 0.5               # persistent domains: 0 = natural mixture, 1 = objective's optimum (geometric path)
  max_ratio: float = 4.0            # persistent domains: cap on a domain's weight / frequency
  reseed_fraction: float = 0.05     # persistent domains: re-seed a centroid whose mass is below this fraction of the mean
  ema: float = 0.0                  # EMA of domain weights across steps
  weight_floor: float = 0.0         # minimum weight of a present domain
  lambda_graph: float = 0.0         # graph-Laplacian term, relative to the objective's scale
  temperature: float = 1.0          # robust objective's tau
  lambda_dir: float = 1.0           # variance objective's direction term
  lambda_align: float = 1.0         # alignment objective's proximity term
  # --- model ---
  model: str = "mini"               # mini | gpt2 | gpt2-medium | paper-small | paper-medium
  dtype: str = "float32"            # compute dtype (params stay float32): float32 | bfloat16
  mesh: str = ""                    # device mesh "data=N,fsdp=M" (N*M = all devices; params sharded over fsdp); empty = one device
  # --- optimisation (docs/method.md §6) ---
  steps: int = 1000                 # training steps
  batch_size: int = 32              # sequences per step (32: a few hundred samples in DoGraph's running window of ~10 steps)
  seq_len: int = 64                 # tokens per sequence (model context must be >= this)
  lr: float = 3e-3                  # peak learning rate
  warmup_steps: int = 50            # linear warm-up steps (at most steps), then cosine to 0.1 * lr
  weight_decay: float = 0.01        # AdamW weight decay
  clip_norm: float = 1.0            # global-norm gradient clipping
  seed: int = 0                     # model init, data order and DoGraph keys
  # --- evaluation, logging, checkpoints ---
  eval_every: int = 250             # steps between per-domain validation passes (0 = only at the end)
  eval_rows: int = 64               # validation sequences per domain (0 = all)
  log_every: int = 25               # steps between log lines / metric records
  save_every: int = 250             # steps between checkpoints (0 = only at the end)
  keep_checkpoints: int = 2         # checkpoints kept on disk
  out_dir: str = "runs/default"     # run directory: metrics, TensorBoard, checkpoints, summary, plots
  resume: bool = False              # continue from the last complete checkpoint in out_dir
  halt_after: int = 0               # stop (saving) after this many steps of this process, as a preempted job would (0 = run to --steps)
  plots: bool = True                # write PNG plots at the end

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"--method must be one of {METHODS}, got {self.method!r}")
    for name in ("steps", "batch_size", "seq_len", "num_domains", "sketch_dim", "proxy_runs",
                 "probe_rows"):
      if getattr(self, name) < 1:
        raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
    from dograph_jax.train.methods import parse_method_args  # checks --method_args early
    parse_method_args(self.method, self.method_args)
    if self.proxy_steps < 0:
      raise ValueError(f"--proxy_steps must be >= 0, got {self.proxy_steps}")
    if self.warmup_steps < 0:
      raise ValueError(f"--warmup_steps must be >= 0, got {self.warmup_steps}")
    if self.sketch not in ("factored", "reference"):
      raise ValueError(f"--sketch must be factored or reference, got {self.sketch!r}")
    if self.update not in ("bookkeeping", "second_backward"):
      raise ValueError(f"--update must be bookkeeping or second_backward, got {self.update!r}")
    if self.domains not in ("persistent", "batch"):
      raise ValueError(f"--domains must be persistent or batch, got {self.domains!r}")
    if self.prior not in ("frequency", "uniform"):
      raise ValueError(f"--prior must be frequency or uniform, got {self.prior!r}")
    if self.sketch_norm not in ("none", "block"):
      raise ValueError(f"--sketch_norm must be none or block, got {self.sketch_norm!r}")
    if self.distance not in ("cosine", "euclidean"):
      raise ValueError(f"--distance must be cosine or euclidean, got {self.distance!r}")
    if self.method == "dograph" and self.domains == "persistent" and self.buffer_size:
      raise ValueError("--buffer_size is an option of --domains batch")
    if self.eval_domains not in ("train", "validation"):
      raise ValueError(f"--eval_domains must be train or validation, got {self.eval_domains!r}")
    if self.regroup_k != "auto":
      lo, sep, hi = self.regroup_k.partition(":")
      if not (sep and lo.strip().isdigit() and hi.strip().isdigit() and 2 <= int(lo) <= int(hi)):
        raise ValueError(f"--regroup_k must be auto or lo:hi with 2 <= lo <= hi, "
                         f"got {self.regroup_k!r}")
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"--dtype must be float32 or bfloat16, got {self.dtype!r}")


def _parse_bool(text: str) -> bool:
  lowered = text.lower()
  if lowered in ("1", "true", "yes", "on"):
    return True
  if lowered in ("0", "false", "no", "off"):
    return False
  raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def parse_config(argv: Sequence[str] | None = None, base: TrainConfig | None = None,
                 description: str | None = None) -> TrainConfig:
  """``TrainConfig`` from ``--name value`` overrides of ``base`` (defaults)."""
  base = base or TrainConfig()
  parser = argparse.ArgumentParser(description=description)
  for field in dataclasses.fields(TrainConfig):
    default = getattr(base, field.name)
    kind = {bool: _parse_bool, int: int, float: float, str: str}[type(default)]
    if kind is _parse_bool:  # `--resume` alone means `--resume true`
      parser.add_argument(f"--{field.name}", type=kind, default=default, nargs="?",
                          const=True, help=f"(default: {default!r})")
    else:
      parser.add_argument(f"--{field.name}", type=kind, default=default,
                          help=f"(default: {default!r})")
  args = parser.parse_args(argv)
  return TrainConfig(**vars(args))
