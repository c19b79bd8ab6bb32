"""A corpus read through HuggingFace ``datasets``, offline.

``--hf_dataset`` names the corpus the way ``datasets.load_dataset`` does:

* a local folder of data files, e.g. SlimPajama-6B as downloaded
  (``huggingface-cli download --repo-type dataset DKYoon/SlimPajama-6B
  --local-dir DIR``): ``DIR/data/{train,validation,test}-*.parquet``, whose
  rows are ``{"text", "meta": {"redpajama_set_name"}, "__index_level_0__"}``;
  ``datasets`` takes the split of each file from its name (``train/``,
  ``validation/`` folders work too);
* or a hub name (``DKYoon/SlimPajama-6B``) that an earlier
  ``load_dataset`` has put in the datasets cache (``--hf_cache_dir``, default
  ``HF_DATASETS_CACHE``).

Nothing is ever downloaded: :func:`load_offline` switches ``datasets`` and
``huggingface_hub`` to offline mode while it loads (the same as
``HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1``, whatever those variables say), and
a name that is neither a local folder nor in the cache is refused with a
message naming it before ``datasets`` is asked.

The splits come back as :class:`HFSplit`, a split source of
:func:`~dograph_jax.data.pipeline.pack_split_cached`: its documents are the
rows of the arrow-backed (memory-mapped) dataset, read in batches of
:data:`BATCH_ROWS` through the same record checks as the file reader
(:func:`~dograph_jax.data.corpus.documents_of`), so the same records give
the same documents, skip counts and packed rows; its signature is the
dataset's arrow cache files (paths, sizes, modification times), which
``datasets`` rewrites under a new path when the source files change.

``datasets`` prepares a local folder once (a copy of the data as arrow files
in its cache); later starts only open those files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from dograph_jax.data.corpus import SkipCounts, documents_of, record_columns

logger = logging.getLogger(__name__)

# Rows per arrow batch: the records of one batch are the only Python objects
# alive at a time.
BATCH_ROWS = 1024

_OFFLINE_ENV = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


@contextlib.contextmanager
def _offline():
  """``datasets`` and ``huggingface_hub`` in offline mode for the block.

  Both read their environment variables once, at import, so the modules'
  own flags are set as well (and put back afterwards, with the variables).
  """
  saved_env = {k: os.environ.get(k) for k in _OFFLINE_ENV}
  for k in _OFFLINE_ENV:
    os.environ[k] = "1"
  # pylint: disable=g-import-not-at-top
  import datasets.config
  from huggingface_hub import constants
  saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
  datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
  try:
    yield
  finally:
    datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved
    for k, v in saved_env.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


def _cache_folder(name: str, cache_dir: str) -> tuple[Path, bool]:
  """``(the datasets cache, whether it holds a prepared copy of name)``, by
  the cache's own naming (``<namespace>___<snake_case name>/<config>/<version>/<hash>``)."""
  import datasets.config  # pylint: disable=g-import-not-at-top
  from datasets.naming import camelcase_to_snakecase  # pylint: disable=g-import-not-at-top
  root = Path(cache_dir or datasets.config.HF_DATASETS_CACHE).expanduser()
  parts = name.split("/")
  parts[-1] = camelcase_to_snakecase(parts[-1])
  prepared = [p for p in glob.glob(str(root / "___".join(parts) / "*" / "*" / "*"))
              if os.path.isdir(p)]
  return root, bool(prepared)


def load_offline(dataset: str, cache_dir: str = ""):
  """``datasets.load_dataset(dataset)`` without the network: a ``DatasetDict``.

  Args:
    dataset: a local folder of data files, or the hub name of a dataset in
      the datasets cache.
    cache_dir: the datasets cache (``load_dataset``'s ``cache_dir``); empty
      for its default (``HF_DATASETS_CACHE``).

  Raises:
    FileNotFoundError: ``dataset`` is neither a local folder nor in the
      cache (the message names both places looked at and how to get it).
  """
  local = Path(dataset).expanduser()
  with _offline():
    import datasets  # pylint: disable=g-import-not-at-top
    if local.is_dir():
      return datasets.load_dataset(str(local), cache_dir=cache_dir or None)
    root, cached = _cache_folder(dataset, cache_dir)
    missing = (f"--hf_dataset {dataset!r} is neither a local folder nor in the datasets cache "
               f"{str(root)!r}, and nothing is downloaded (offline). Download it where there "
               "is a network, e.g. huggingface-cli download --repo-type dataset "
               f"{dataset} --local-dir DIR, and pass --hf_dataset DIR (or load it once with "
               f"datasets.load_dataset({dataset!r}, cache_dir=...) and pass --hf_cache_dir)")
    if not cached:
      raise FileNotFoundError(missing)
    try:
      return datasets.load_dataset(dataset, cache_dir=cache_dir or None)
    except (ConnectionError, FileNotFoundError, ValueError) as e:
      raise FileNotFoundError(f"{missing}. datasets said: {type(e).__name__}: {e}") from e


@dataclasses.dataclass(frozen=True, eq=False)
class HFSplit:
  """One split of a dataset loaded by :func:`load_offline` (a split source,
  see :class:`~dograph_jax.data.corpus.FileSplit`).

  Attributes:
    dataset: the ``--hf_dataset`` it came from (for messages).
    split: the split's name.
    data: the split, a ``datasets.Dataset`` backed by arrow cache files.
    domain_field, text_field: dotted paths in a row (as the file reader's;
      ``"auto"`` tries ``meta.redpajama_set_name``, then ``domain``).
  """
  dataset: str
  split: str
  data: Any
  domain_field: str = "auto"
  text_field: str = "text"

  @property
  def where(self) -> str:
    return f"{self.dataset} [{self.split}]"

  def signature(self) -> dict[str, Any]:
    """The split's arrow cache files ``[path, size, mtime_ns]`` and row count.

    ``datasets`` names the folder of a prepared copy by a hash of its
    source files (and their modification times), so a changed source gives
    other paths here.

    Raises:
      ValueError: the split has no cache files (held in memory), so nothing
        identifies it without reading it.
    """
    files = []
    for entry in self.data.cache_files:
      st = os.stat(entry["filename"])
      files.append([os.path.abspath(entry["filename"]), st.st_size, st.st_mtime_ns])
    if not files:
      raise ValueError(
          f"{self.where} is held in memory, not in arrow cache files, so its packed rows "
          "cannot be cached by metadata; unset HF_DATASETS_IN_MEMORY_MAX_SIZE")
    return {"kind": "hf", "split": self.split, "rows": self.data.num_rows,
            "domain_field": self.domain_field, "text_field": self.text_field,
            "files": sorted(files)}

  def _records(self) -> Iterator[dict]:
    fields = record_columns(self.domain_field, self.text_field)
    names = self.data.column_names
    wanted = {p.split(".")[0] for paths in fields.values() for p in paths}
    present = [c for c in names if c in wanted]
    if not present:
      # As for a parquet file: a wrong field name, which would skip every row.
      raise ValueError(
          f"{self.where} has none of the expected columns: it has {names}, expected the "
          f"text field {fields['text'][0]!r} and the domain field "
          + " or ".join(map(repr, fields["domain"]))
          + " (a dotted field reads the column named by its first part; choose the fields "
          "with --domain_field / --text_field)")
    for what, paths in fields.items():
      if not any(p.split(".")[0] in names for p in paths):
        logger.warning("%s has no %s column (expected %s; it has %s): each of its %d rows is "
                       "skipped", self.where, what, " or ".join(map(repr, paths)), names,
                       self.data.num_rows)
    # Arrow tables of BATCH_ROWS rows over the memory-mapped files; only the
    # columns read are touched.
    table = self.data.select_columns(present).with_format("arrow")
    for batch in table.iter(batch_size=BATCH_ROWS):
      yield from batch.to_pylist()

  def documents(self, skips: SkipCounts, seen_domains: set[str] | None = None,
                ) -> Iterator[tuple[str, str]]:
    """The usable ``(domain, text)`` pairs, in row order (the file reader's
    checks and skip reasons)."""
    return documents_of(self._records(), skips, domain_field=self.domain_field,
                        text_field=self.text_field, seen_domains=seen_domains)


def hf_splits(dataset: str, splits: Sequence[str], *, cache_dir: str = "",
              domain_field: str = "auto", text_field: str = "text") -> list[HFSplit]:
  """The named splits of ``dataset`` (:func:`load_offline`), as split sources.

  Raises:
    FileNotFoundError: as :func:`load_offline`.
    ValueError: a split the dataset does not have (the message lists its splits).
  """
  loaded = load_offline(dataset, cache_dir)
  missing = [s for s in splits if s not in loaded]
  if missing:
    raise ValueError(f"--hf_dataset {dataset!r} has no split(s) {missing}; its splits are "
                     f"{sorted(loaded)} (train and validation are read)")
  return [HFSplit(dataset, s, loaded[s], domain_field=domain_field, text_field=text_field)
          for s in splits]
