"""The trainer's configuration: one typed, nested, frozen dataclass.

``TrainConfig`` has the method switch at the top and six sections:
``data``, ``model``, ``optim``, ``dograph`` (exactly the keyword arguments
of :func:`dograph_jax.dograph_transform` that the trainer does not fill in
itself, with the transform's own defaults: one source), ``offline`` (proxy
runs and regrouping of the offline pipelines) and ``run`` (evaluation,
logging, checkpoints, devices).

The command line is built by `tyro <https://brentyi.github.io/tyro/>`_ from
the types and the comment on each field: ``--help`` lists every option with
its help text and, for a choice, its choices; ``Literal`` fields refuse
anything else by name. We chose tyro over draccus and simple_parsing because
it derives the whole interface from the type annotations we already keep
(``Literal`` choices, ``dict`` mappings, nested dataclasses), reads help from
field comments, and can keep the flags flat: field names are unique across
sections, so every option keeps its short name (``--objective``, ``--lr``,
``--data_dir``) while the code reads ``cfg.dograph.objective``,
``cfg.optim.lr``, ``cfg.data.data_dir``.

Mappings are mappings: ``--proportions code 0.3 prose 0.7`` and
``--method_args burn_in 40 strategy mid`` (values typed by the method's
factory, :func:`dograph_jax.train.methods.parse_method_args`). ``--config_file
FILE`` (YAML or JSON, nested like ``TrainConfig`` or flat by option name)
gives the base that the other flags override. A run directory holds the
resolved config (``config.json``); ``--resume --out_dir R`` reads it back, so
nothing else need be repeated (an override that changes the run is refused
by name, ``single_run.check_resumable``).

Defaults give the CPU run of the README: ``mini`` GPT-2 trained with DoGraph
on the bundled synthetic corpus in a few minutes. The paper's setting
(docs/method.md §6) is batch 48, 20,000 steps, warm-up 500 then cosine,
weight decay 0.01, clipping 1.0, m = 11 clusters, context 512: e.g. ``--model
paper-small --batch_size 48 --seq_len 512 --steps 20000 --warmup_steps 500``.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Sequence, get_args, get_origin, get_type_hints

import tyro

from dograph_jax.transform import STATIC_ARGS, dograph_transform
from dograph_jax.transform_stages.options import default_sketch_dim
from dograph_jax.train.methods import APPLY_WEIGHTS, METHODS, parse_method_args
from dograph_jax.train.tracking import SINKS

_TRANSFORM = inspect.signature(dograph_transform).parameters
# Filled in by the trainer (the run's seed and batch size), not options.
# in_batch: False when the run samples with DoGraph's weights (--apply_weights sample).
TRAINER_FILLED = ("seed", "batch_size", "in_batch")


def _default(name: str) -> Any:
  """``dograph_transform``'s default for ``name``: the one source of DoGraph's defaults."""
  return _TRANSFORM[name].default


@dataclass(frozen=True)
class DataConfig:
  data_dir: str = "data/synthetic"  # SlimPajama-layout folder (train/, validation/) or plain {"text","domain"}; the default is generated if absent
  domain_field: str = "auto"  # dotted path of the domain label; auto = meta.redpajama_set_name, then domain
  sampling: Literal["natural", "uniform"] = "natural"  # sampling proportions when --proportions is empty: natural (by tokens) or uniform (stratified)
  proportions: dict[str, float] = field(default_factory=dict)  # sampling proportions by domain name, e.g. --proportions code 0.3 prose 0.7 (normalised); empty = --sampling
  tokenizer: str = ""  # local tokenizer path; empty = train a byte-level BPE on the train split, cached beside the data
  vocab_size: int = 2048  # vocabulary of the trained tokenizer
  eval_domains: Literal["train", "validation"] = "train"  # validation domains reported: the training domains, or every domain of the validation split (a run on regrouped clusters)
  text_field: str = "text"  # dotted path of the document text in each record
  cache_dir: str = ""  # where the trained tokenizer and the packed tokens are cached (memory-mapped when read back; found again from the files' names, sizes and times without reading the corpus); empty = beside the data (<data_dir>/.packed, <data_dir>/tokenizer-bpe-N)
  hf_dataset: str = ""  # read the corpus with HuggingFace datasets instead of --data_dir, offline: a local folder (e.g. SlimPajama-6B's data/{train,validation}-*.parquet) or a hub name already in the datasets cache; splits train and validation
  hf_cache_dir: str = ""  # the datasets cache of --hf_dataset (load_dataset's cache_dir); empty = datasets' default (HF_DATASETS_CACHE)

  def cache_root(self) -> Path:
    """Folder of the tokenizer and packing caches: ``--cache_dir``, else
    beside the data (``--data_dir``, or a local ``--hf_dataset`` folder),
    else, for a hub name, ``dograph_jax/<name>`` in the datasets cache (the
    dataset's own folder there belongs to ``datasets``)."""
    if self.cache_dir:
      return Path(self.cache_dir)
    if not self.hf_dataset:
      return Path(self.data_dir)
    local = Path(self.hf_dataset).expanduser()
    if local.is_dir():
      return local
    hf_cache = self.hf_cache_dir or os.environ.get("HF_DATASETS_CACHE") or str(
        Path(os.environ.get("HF_HOME", "~/.cache/huggingface")) / "datasets")
    return Path(hf_cache).expanduser() / "dograph_jax" / self.hf_dataset.replace("/", "___")

  def tokenizer_cache(self) -> Path:
    """Folder of the byte-level BPE trained on the train split."""
    return self.cache_root() / f"tokenizer-bpe-{self.vocab_size}"

  def packing_cache(self) -> Path:
    """Folder of the packed token rows (``pack_split_cached``)."""
    return self.cache_root() / ("packed" if self.cache_dir else ".packed")


@dataclass(frozen=True)
class ModelConfig:
  name: Annotated[str, tyro.conf.arg(name="model")] = "mini"  # named model config: mini | llama-mini | gpt2 | gpt2-medium | paper-small | paper-medium | tinyllama-1.1b | llama-3.2-1b | llama-3.2-3b (python -m dograph_jax.models lists them)
  dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype (params stay float32)
  attention: Literal["xla", "dot_product", "cudnn"] = "xla"  # xla = explicit einsum + float32 softmax (reference) | dot_product = jax.nn.dot_product_attention (cuDNN flash attention on a CUDA GPU >= sm80 with bfloat16 and head width %8, <= 128/256; XLA elsewhere) | cudnn = cuDNN or an error
  remat: Literal["none", "block", "dots"] = "none"  # rematerialise each block for the backward pass: none | block (keep only its input) | dots (keep the linear layers' outputs, recompute attention, norms, activations)


@dataclass(frozen=True)
class OptimConfig:
  steps: int = 1000  # training steps
  batch_size: int = 32  # sequences per step (32: a few hundred samples in DoGraph's running window of ~10 steps)
  seq_len: int = 64  # tokens per sequence (model context must be >= this)
  lr: float = 3e-3  # peak learning rate
  warmup_steps: int = 50  # linear warm-up steps (at most steps), then cosine to 0.1 * lr
  weight_decay: float = 0.01  # AdamW weight decay
  clip_norm: float = 1.0  # global-norm gradient clipping
  micro_batches: int = 1  # split each step's batch into this many sequential micro-batches (same step up to float rounding, activations of one at a time; batch_size must be a multiple)


@dataclass(frozen=True)
class DoGraphConfig:
  """``dograph_transform``'s keyword arguments (docs/method.md §2-3); the
  defaults are read from its signature."""
  num_domains: int = _default("num_domains")  # m, model-centric domains (paper: 11)
  sketch_dim: int | None = _default("sketch_dim")  # K; default (None): the dimension of equal distortion for the map, 1024 for Kronecker (the factored path) and 256 for Gaussian (benchmarks/sketch_distortion.py)
  objective: Literal["uncertainty", "variance", "robust", "alignment"] = _default("objective")  # the objective giving one weight per domain
  domains: Literal["persistent", "batch"] = _default("domains")  # persistent (centroids refined across steps, running statistics, frequency-relative a_i) | batch (K-means of each batch, the paper's A.3 literally)
  prior: Literal["frequency", "uniform"] = _default("prior")  # persistent domains: reference distribution of the objective (running p, or uniform)
  sketch_kind: Literal["gaussian", "kronecker"] = _default("sketch_kind")  # --sketch reference's map (the factored path is always kronecker)
  normalize_blocks: bool = _default("normalize_blocks")  # scale each parameter block's sketch of a sample to unit norm before summing (every block counts equally)
  kmeans_iters: int = _default("kmeans_iters")  # Lloyd iterations per step
  distance: Literal["euclidean", "cosine"] = _default("distance")  # K-means distance (cosine clusters gradient directions, ignores norms)
  warm_start: bool = _default("warm_start")  # batch domains: warm-start K-means from the previous centroids
  buffer_size: int = _default("buffer_size")  # batch domains: rolling buffer of recent sketches for clustering (0 = batch only)
  decay: float = _default("decay")  # persistent domains: forgetting factor of centroids and running statistics
  anchor: float = _default("anchor")  # persistent domains: 0 = natural mixture, 1 = objective's optimum (geometric path)
  max_ratio: float = _default("max_ratio")  # persistent domains: cap on a domain's weight / frequency
  reseed_fraction: float = _default("reseed_fraction")  # persistent domains: re-seed a centroid whose mass is below this fraction of the mean
  ema: float = _default("ema")  # EMA of domain weights across steps
  weight_floor: float = _default("weight_floor")  # minimum weight of a present domain
  lambda_graph: float = _default("lambda_graph")  # graph-Laplacian term, relative to the objective's scale
  temperature: float = _default("temperature")  # robust objective's tau
  lambda_dir: float = _default("lambda_dir")  # variance objective's direction term
  lambda_align: float = _default("lambda_align")  # alignment objective's proximity term
  eps: float = _default("eps")  # numerical floor of variances and norms
  solver_steps: int = _default("solver_steps")  # iterations of the simplex solver
  solver_backend: Literal["auto", "jaxopt", "optax"] = _default("solver_backend")  # simplex solver backend (auto: closed form where one exists; docs/method.md)
  coefficients: Literal["frequency", "post_stratified"] = _default("coefficients")  # persistent domains: a_i ∝ w/p (a domain's share w in expectation) | post_stratified (its share exactly: a_i = s_j / n_j)
  block_budget: int = _default("block_budget")  # entries per block of the sketch's projection (memory bound of the Gaussian map)

  def resolved_sketch_dim(self, sketch: str) -> int:
    """``K`` for the run: the given one, or the transform's default for the
    map in use (the factored path always sketches with the Kronecker map)."""
    kind = "kronecker" if sketch == "factored" else self.sketch_kind
    return self.sketch_dim or default_sketch_dim(kind)

  def transform_kwargs(self, *, seed: int, batch_size: int, sketch: str,
                       in_batch: bool = True) -> dict:
    """Keyword arguments of ``dograph_transform`` for a run (``sketch``:
    ``TrainConfig.sketch``, which fixes the map and so the default ``K``;
    ``in_batch``: False when the trainer samples with the weights)."""
    return {**dataclasses.asdict(self), "seed": seed, "batch_size": batch_size,
            "sketch_dim": self.resolved_sketch_dim(sketch), "in_batch": in_batch}


# DoGraph's hyperparameters that change no shape: traced (sweepable without
# recompiling); derived from the transform's own list of static arguments.
DOGRAPH_TRACED = tuple(f.name for f in dataclasses.fields(DoGraphConfig)
                       if f.name not in STATIC_ARGS)


@dataclass(frozen=True)
class OfflineConfig:
  reference_dir: str = ""  # doremi_proxy: run directory of the reference model (its last checkpoint)
  proxy_steps: int = 0  # offline methods: steps of each proxy/reference run (0 = steps // 4)
  proxy_runs: int = 8  # regmix / mixing_law: proxy runs at sampled mixtures
  regroup_embedder: str = "tfidf"  # rnb: document embeddings for the regrouping: tfidf (TF-IDF + SVD, offline) | tfidf:DIM | a local sentence-embedding model directory
  regroup_k: str = "auto"  # rnb: cluster counts tried, "lo:hi" (inclusive), the silhouette picks one; auto = D:3D for D human domains
  probe_rows: int = 8  # aioli: held-out probe rows per domain (taken from each domain's last training rows)


@dataclass(frozen=True)
class RunConfig:
  seed: int = 0  # model init, data order and DoGraph keys
  out_dir: str = "runs/default"  # run directory: config, metrics, TensorBoard, checkpoints, summary, plots
  resume: bool = False  # continue from the last complete checkpoint in out_dir (its config.json is the base: other options need not be repeated)
  overwrite: bool = False  # start a new run in an out_dir that holds one: the old run is moved aside whole to <out_dir>.replaced-<time>
  traceback: bool = False  # on an error, print the whole traceback (default: one paragraph with the fix)
  eval_every: int = 250  # steps between per-domain validation passes (0 = only at the end)
  eval_rows: int = 64  # validation sequences per domain (0 = all)
  log_every: int = 25  # steps between log lines / metric records
  save_every: int = 250  # steps between checkpoints (0 = only at the end)
  keep_checkpoints: int = 2  # checkpoints kept on disk
  halt_after: int = 0  # stop (saving) after this many steps of this process, as a preempted job would (0 = run to --steps)
  plots: bool = True  # write PNG plots at the end
  mesh: str = ""  # device mesh "data=N,fsdp=M" (N*M = all devices; params sharded over fsdp); empty = one device
  trackers: tuple[str, ...] = ("jsonl", "tensorboard")  # metric sinks: jsonl | tensorboard | wandb (pip install "dograph_jax[wandb]")
  wandb_project: str = "dograph_jax"  # Weights & Biases project (with --trackers ... wandb); WANDB_MODE=offline runs without a network


@dataclass(frozen=True)
class TrainConfig:
  method: Literal[METHODS] = "dograph"  # dograph | uniform | stratified | temperature | loss_based | doremi | doge | regmix | mixing_law | group_dro | aioli | rnb (| doremi_proxy | doge_proxy | rnb_rounds): dograph_jax/train/methods.py
  method_args: dict[str, str] = field(default_factory=dict)  # an online or offline baseline's hyperparameters, e.g. --method_args strategy mid temperature 0.5 (its factory's keywords, typed by their defaults)
  apply_weights: Literal[APPLY_WEIGHTS] = "paper"  # how an online mixer's domain weights act: paper (each method's published form: Aioli, R&B, ADO, ODM sample; Group DRO, DoReMi/DoGE proxies reweight) | sample (each batch drawn with them, plain mean) | reweight (in-batch loss weights on batches drawn at --sampling/--proportions)
  sketch: Literal["factored", "reference"] = "factored"  # DoGraph's per-sample gradients: factored (one pass, no per-sample gradients) | reference (vmap(grad), any loss)
  update: Literal["bookkeeping", "second_backward", "lagged"] = "bookkeeping"  # factored path's update: from stored tensors | a second backward pass | lagged: one pass, each micro-batch weighted as it comes with the previous step's weights (docs/method.md §7b (c); not the paper's step)
  data: DataConfig = DataConfig()
  model: ModelConfig = ModelConfig()
  optim: OptimConfig = OptimConfig()
  dograph: DoGraphConfig = DoGraphConfig()
  offline: OfflineConfig = OfflineConfig()
  run: RunConfig = RunConfig()

  def __post_init__(self):
    for section, name in (("optim", "steps"), ("optim", "batch_size"), ("optim", "seq_len"),
                          ("optim", "micro_batches"),
                          ("dograph", "num_domains"),
                          ("offline", "proxy_runs"), ("offline", "probe_rows")):
      if getattr(getattr(self, section), name) < 1:
        raise ValueError(f"--{name} must be >= 1, got {getattr(getattr(self, section), name)}")
    for section, name in (("offline", "proxy_steps"), ("optim", "warmup_steps")):
      if getattr(getattr(self, section), name) < 0:
        raise ValueError(f"--{name} must be >= 0, got {getattr(getattr(self, section), name)}")
    for name, value, low, strict in (("lr", self.optim.lr, 0.0, True),
                                     ("weight_decay", self.optim.weight_decay, 0.0, False),
                                     ("clip_norm", self.optim.clip_norm, 0.0, True)):
      if not (math.isfinite(value) and (value > low if strict else value >= low)):
        raise ValueError(f"--{name} must be a finite number {'>' if strict else '>='} {low}, "
                         f"got {value}")
    if self.optim.batch_size % self.optim.micro_batches:
      raise ValueError(f"--batch_size {self.optim.batch_size} is not a multiple of "
                       f"--micro_batches {self.optim.micro_batches}")
    if self.dograph.sketch_dim is not None and self.dograph.sketch_dim < 1:
      raise ValueError(f"--sketch_dim must be >= 1, got {self.dograph.sketch_dim}")
    _check_choice("method", self.method, METHODS)
    _check_choice("apply_weights", self.apply_weights, APPLY_WEIGHTS)
    for (sec, name), choices in _CHOICES.items():  # tyro checks the command line, this the API
      _check_choice(_flag(sec, name), getattr(getattr(self, sec), name), choices)
    parse_method_args(self.method, self.method_args)  # checks --method_args early
    _check_choice("update", self.update, ("bookkeeping", "second_backward", "lagged"))
    if self.update == "lagged" and self.method == "dograph" and (
        self.sketch != "factored" or self.dograph.domains != "persistent"):
      raise ValueError("--update lagged needs --sketch factored and --domains persistent "
                       "(it weights rows by the persistent domains before their batch is "
                       "clustered)")
    if self.method == "dograph" and self.dograph.coefficients == "post_stratified" and (
        self.dograph.domains != "persistent" or self.update == "lagged"):
      raise ValueError("--coefficients post_stratified needs --domains persistent and a "
                       "two-pass update (not --update lagged): it splits each domain's "
                       "share over the batch's own count of the domain")
    if self.method == "dograph" and self.dograph.domains == "persistent" and self.dograph.buffer_size:
      raise ValueError("--buffer_size is an option of --domains batch")
    if self.method == "rnb" and self.data.hf_dataset:
      # R&B's regrouping reads the documents of --data_dir's files
      # (train/offline.py); it has no --hf_dataset reader.
      raise ValueError("--method rnb regroups the files of --data_dir and cannot read "
                       "--hf_dataset; pass the dataset's local folder as --data_dir")
    if self.offline.regroup_k != "auto":
      lo, sep, hi = self.offline.regroup_k.partition(":")
      if not (sep and lo.strip().isdigit() and hi.strip().isdigit() and 2 <= int(lo) <= int(hi)):
        raise ValueError(f"--regroup_k must be auto or lo:hi with 2 <= lo <= hi, "
                         f"got {self.offline.regroup_k!r}")
    for name in self.run.trackers:
      _check_choice("trackers", name, tuple(SINKS))


SECTIONS = ("data", "model", "optim", "dograph", "offline", "run")
_SECTION_TYPES = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig,
                  "dograph": DoGraphConfig, "offline": OfflineConfig, "run": RunConfig}
# A field's command-line name where it differs from the attribute.
_FLAG_ALIASES = {("model", "name"): "model"}


# (section, field) -> the choices of a Literal field.
_CHOICES = {(sec, name): get_args(hint) for sec, cls in _SECTION_TYPES.items()
            for name, hint in get_type_hints(cls).items() if get_origin(hint) is Literal}


def _flag(section: str, name: str) -> str:
  return _FLAG_ALIASES.get((section, name), name)


def _check_choice(flag: str, value, choices) -> None:
  if value not in choices:
    raise ValueError(f"--{flag} must be one of {tuple(choices)}, got {value!r}")


# Flag name -> (section or None for a top-level field, attribute).
FLAGS: dict[str, tuple[str | None, str]] = {
    f.name: (None, f.name) for f in dataclasses.fields(TrainConfig) if f.name not in SECTIONS}
for _sec, _cls in _SECTION_TYPES.items():
  for _f in dataclasses.fields(_cls):
    assert _flag(_sec, _f.name) not in FLAGS, f"two options named {_f.name}"
    FLAGS[_flag(_sec, _f.name)] = (_sec, _f.name)


def flatten(cfg: TrainConfig) -> dict[str, Any]:
  """``{flag name: value}`` of every option (JSON-ready: tuples as lists)."""
  out = {}
  for flag, (sec, name) in FLAGS.items():
    value = getattr(getattr(cfg, sec) if sec else cfg, name)
    out[flag] = list(value) if isinstance(value, tuple) else (
        dict(value) if isinstance(value, Mapping) else value)
  return out


def replace(cfg: TrainConfig, **overrides) -> TrainConfig:
  """``cfg`` with options replaced by flag name (``replace(cfg, lr=1e-3,
  objective="robust")``), like ``dataclasses.replace`` across sections."""
  unknown = sorted(set(overrides) - set(FLAGS))
  if unknown:
    raise ValueError(f"unknown option(s) {unknown}; the options are {sorted(FLAGS)}")
  top, per = {}, {s: {} for s in SECTIONS}
  for flag, value in overrides.items():
    sec, name = FLAGS[flag]
    if isinstance(value, list):
      value = tuple(value)
    (per[sec] if sec else top)[name] = value
  sections = {s: dataclasses.replace(getattr(cfg, s), **kw) for s, kw in per.items() if kw}
  return dataclasses.replace(cfg, **top, **sections)


def make_config(**options) -> TrainConfig:
  """A ``TrainConfig`` from flag-named options (the rest at their defaults)."""
  return replace(TrainConfig(), **options)


def to_dict(cfg: TrainConfig) -> dict:
  """The nested JSON form written to ``config.json``."""
  return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(data: Mapping[str, Any], base: TrainConfig | None = None) -> TrainConfig:
  """A config from its nested (``config.json``) or flat (by flag name) form
  over ``base`` (default: the defaults). A ``config.json`` written before
  the sections existed is flat and reads the same way."""
  flat = {}
  for key, value in data.items():
    if key in SECTIONS and isinstance(value, Mapping):
      for name, v in value.items():
        flat[_flag(key, name)] = v
    else:
      flat[key] = value
  return replace(base or TrainConfig(), **_upgrade(flat))


def _upgrade(flat: dict) -> dict:
  """Options as written by the flat, string-typed config of before the
  sections (``proportions="a=0.5,b=0.5"``, ``method_args="k=v,..."``,
  ``sketch_norm``), in today's form."""
  flat = dict(flat)
  props = flat.get("proportions")
  if isinstance(props, str):
    text = props.strip()
    flat["proportions"] = {}
    if text in ("natural", "uniform"):
      flat["sampling"] = text
    elif text:
      flat["proportions"] = {n.strip(): float(w) for n, _, w in
                             (p.partition("=") for p in text.split(","))}
  if isinstance(flat.get("method_args"), str):
    flat["method_args"] = dict((s.strip() for s in p.split("=", 1))
                               for p in flat["method_args"].split(",") if p.strip())
  if "sketch_norm" in flat:
    flat["normalize_blocks"] = flat.pop("sketch_norm") == "block"
  return flat


def load_file(path: str | Path, base: TrainConfig | None = None) -> TrainConfig:
  """A config from a YAML or JSON file (nested or flat) over ``base``."""
  text = Path(path).read_text()
  if str(path).endswith((".yaml", ".yml")):
    import yaml
    data = yaml.safe_load(text) or {}
  else:
    data = json.loads(text)
  if not isinstance(data, Mapping):
    raise ValueError(f"{path}: a config file holds a mapping of options, got {type(data).__name__}")
  return from_dict(data, base)


def default_of(flag: str) -> Any:
  """The default value of option ``flag``."""
  sec, name = FLAGS[flag]
  return getattr(getattr(TrainConfig(), sec) if sec else TrainConfig(), name)


def _bool_values(argv: list[str]) -> list[str]:
  """``--flag true|false`` (the form of before) -> ``--flag`` / ``--no_flag``."""
  bools = {f for f in FLAGS if isinstance(default_of(f), bool)}
  out, i = [], 0
  while i < len(argv):
    arg = argv[i]
    flag, eq, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
    if flag in bools:
      if not eq and i + 1 < len(argv) and argv[i + 1].lower() in ("true", "false", "1", "0"):
        value, i = argv[i + 1], i + 1
      if value:
        arg = f"--{flag}" if value.lower() in ("true", "1") else f"--no_{flag}"
    out.append(arg)
    i += 1
  return out


def parse_config(argv: Sequence[str] | None = None, base: TrainConfig | None = None,
                 description: str | None = None,
                 own_parser: argparse.ArgumentParser | None = None) -> TrainConfig:
  """``TrainConfig`` from the command line over ``base`` (defaults).

  ``--config_file FILE`` (YAML/JSON) is applied first, then the flags; with
  ``--resume`` the run directory's ``config.json`` is the base instead.
  ``own_parser``: a command's own flags (compare, sweep, ablate), shown by
  ``--help`` before the training options.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  pre = argparse.ArgumentParser(add_help=False)
  pre.add_argument("--config_file", default=None)
  known, argv = pre.parse_known_args(argv)
  if own_parser is not None and ("-h" in argv or "--help" in argv):
    print(own_parser.format_help())
  base = base or TrainConfig()
  if known.config_file:
    base = load_file(known.config_file, base)

  def cli(default: TrainConfig) -> TrainConfig:
    return tyro.cli(TrainConfig, args=_bool_values(argv), default=default,
                    description=description, use_underscores=True,
                    config=(tyro.conf.OmitArgPrefixes,))

  cfg = cli(base)
  saved = Path(cfg.run.out_dir) / "config.json"
  if cfg.run.resume and saved.exists():
    # The run's own settings are the base; the command line may change only
    # what check_resumable allows (evaluation, logging, devices, ...).
    # Per-invocation options (stopping early) are not inherited from it.
    run_settings = {k: v for k, v in json.loads(saved.read_text()).items()}
    for per_invocation in ("halt_after", "overwrite", "traceback"):
      run_settings.get("run", run_settings).pop(per_invocation, None)
    cfg = cli(from_dict(run_settings, base))
  return cfg
