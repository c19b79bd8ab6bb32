"""The trainer's data start-up on a generated corpus: wall time and peak memory.

    python benchmarks/bench_startup.py --size_mb 5                  # a quick check
    python benchmarks/bench_startup.py                              # 1 GB
    python benchmarks/bench_startup.py --before_ref b4d0b4d         # with the "before" rows
    python benchmarks/bench_startup.py --format parquet --hf        # + --hf_dataset rows

A corpus of ``--size_mb`` MB of text (train; validation is 1% more) in the
SlimPajama record schema, ``{"text", "meta": {"redpajama_set_name"}}``, from
five sources, is written once into ``--data_dir`` as
``{train,validation}/chunk_XXXX.{jsonl,parquet}`` (about 64 MB a file) and
reused while its ``corpus.json`` matches the options. The text is words of a
per-source vocabulary drawn with Zipf frequencies, so the tokenizer and the
packing have work of the usual kind.

Each measurement runs in a fresh Python process (so nothing is warm but the
file system's page cache), which imports the trainer, then times
``single_run.load_data`` (tokenizer and packed rows: everything the trainer
does with data before its first step) plus drawing the first training
batch, and reports its peak resident memory (``getrusage`` ``ru_maxrss`` of
the process, imports included) and the resident memory after the imports
(the baseline of JAX, transformers, ...). JAX is kept on the CPU
(``JAX_PLATFORMS=cpu``): device start-up is not data start-up.

Rows, each with its own empty cache folder under ``--work_dir``:

* ``first start``: no tokenizer and no packed rows yet (both are built);
* ``second start``: the same command again, with the caches of the first.

``--before_ref REF`` adds the same two rows for the code of git commit
``REF`` (e.g. ``b4d0b4d``, before the packed rows were found from file
metadata): ``git archive REF dograph_jax`` is unpacked under ``--work_dir``
and put first on the child's ``PYTHONPATH``. ``--hf`` (with ``--format
parquet``) adds rows for ``--hf_dataset`` on the same folder (its first start
includes ``datasets`` preparing its arrow copy).

A markdown table is printed; ``--json`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# Sources and their shares of the text (SlimPajama's names).
SOURCES = {"RedPajamaCommonCrawl": 0.45, "RedPajamaC4": 0.25, "RedPajamaGithub": 0.1,
           "RedPajamaArXiv": 0.1, "RedPajamaWikipedia": 0.1}
FILE_MB = 64  # text per data file
VALIDATION_SHARE = 0.01

# The measured process: imports, then load_data and the first batch.
CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from dograph_jax.train import config, single_run
imported = time.perf_counter()

def rss_mb():
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  return float("nan")

base = rss_mb()
cfg = config.make_config(**json.loads(sys.argv[1]))
t1 = time.perf_counter()
data = single_run.load_data(cfg)
batch = next(data.train_iter)
wall = time.perf_counter() - t1
print("RESULT " + json.dumps({
    "start_s": wall, "import_s": imported - t0, "rss_after_imports_mb": base,
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "rows": data.rows, "module": single_run.__file__}))
"""


def _vocabulary(rng, n: int) -> np.ndarray:
  """``n`` distinct made-up words of 1-10 lowercase letters."""
  letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", np.uint8)
  words = set()
  while len(words) < n:
    length = int(rng.integers(1, 11))
    words.add(letters[rng.integers(0, 26, length)].tobytes().decode())
  return np.asarray(sorted(words), dtype=object)


def _documents(rng, vocab: np.ndarray, n_bytes: int):
  """Documents of 30-2000 Zipf-drawn words, ``n_bytes`` of text in all
  (at least one document)."""
  written = 0
  while written < n_bytes or not written:
    n_words = int(rng.integers(30, 2000))
    idx = (rng.zipf(1.25, n_words) - 1) % len(vocab)
    words = vocab[idx].tolist()
    for i in range(12, n_words, 13):  # sentences
      words[i] += "."
    text = " ".join(words)
    written += len(text)
    yield text


def _write_file(path: Path, records: list[dict], fmt: str) -> None:
  if fmt == "jsonl":
    with open(path, "w", encoding="utf-8") as f:
      for r in records:
        f.write(json.dumps(r) + "\n")
    return
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  pq.write_table(pa.Table.from_pylist(records), path)


def write_corpus(data_dir: Path, size_mb: float, fmt: str, seed: int = 0) -> Path:
  """The corpus in ``data_dir`` (written once; see the module docstring)."""
  spec = {"size_mb": size_mb, "format": fmt, "seed": seed, "sources": SOURCES,
          "file_mb": FILE_MB, "version": 1}
  marker = data_dir / "corpus.json"
  if marker.exists() and json.loads(marker.read_text()) == spec:
    print(f"reusing the corpus in {data_dir}", file=sys.stderr)
    return data_dir
  partial = data_dir.with_name(data_dir.name + ".partial")
  shutil.rmtree(partial, ignore_errors=True)
  rng = np.random.default_rng(seed)
  vocabs = {s: _vocabulary(np.random.default_rng([seed, i]), 4000)
            for i, s in enumerate(SOURCES)}
  for split, share in (("train", 1.0), ("validation", VALIDATION_SHARE)):
    (partial / split).mkdir(parents=True)
    total = size_mb * share * 2**20
    # Each source's documents, interleaved in the files as in SlimPajama's chunks.
    streams = {s: _documents(rng, vocabs[s], int(total * p)) for s, p in SOURCES.items()}
    records, size, chunk = [], 0, 0
    while streams:
      for s in list(streams):
        text = next(streams[s], None)
        if text is None:
          del streams[s]
          continue
        records.append({"text": text, "meta": {"redpajama_set_name": s}})
        size += len(text)
      if size >= FILE_MB * 2**20 or not streams:
        _write_file(partial / split / f"chunk_{chunk:04d}.{fmt}", records, fmt)
        records, size, chunk = [], 0, chunk + 1
  (partial / "corpus.json").write_text(json.dumps(spec, indent=1))
  shutil.rmtree(data_dir, ignore_errors=True)
  partial.rename(data_dir)
  print(f"wrote a {size_mb} MB corpus to {data_dir}", file=sys.stderr)
  return data_dir


def _code_at(ref: str, out: Path) -> Path:
  """``dograph_jax`` as of git commit ``ref``, unpacked into ``out``."""
  shutil.rmtree(out, ignore_errors=True)
  out.mkdir(parents=True)
  tar = subprocess.run(["git", "-C", str(REPO), "archive", ref, "dograph_jax"],
                       check=True, capture_output=True).stdout
  with tarfile.open(fileobj=io.BytesIO(tar)) as t:
    t.extractall(out, filter="data")
  return out


def measure(options: dict, work: Path, code: Path | None, timeout: float) -> dict:
  """One start in a fresh process (``code``: a folder put first on the path)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  if code is not None:
    env["PYTHONPATH"] = os.pathsep.join([str(code), env.get("PYTHONPATH", "")])
  work.mkdir(parents=True, exist_ok=True)
  proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(options)], cwd=work, env=env,
                        capture_output=True, text=True, timeout=timeout)
  if proc.returncode:
    raise RuntimeError(f"the measured start failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
  line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT "):])


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", default="/tmp/dograph_bench_startup/corpus")
  parser.add_argument("--work_dir", default="/tmp/dograph_bench_startup/work",
                      help="caches and run folders (emptied per variant)")
  parser.add_argument("--size_mb", type=float, default=1024)
  parser.add_argument("--format", default="jsonl", choices=("jsonl", "parquet"))
  parser.add_argument("--vocab_size", type=int, default=2048)
  parser.add_argument("--seq_len", type=int, default=512)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--before_ref", default="",
                      help="git commit whose code gives the 'before' rows, e.g. b4d0b4d")
  parser.add_argument("--hf", action="store_true",
                      help="also --hf_dataset on the corpus folder (needs --format parquet)")
  parser.add_argument("--timeout", type=float, default=4 * 3600, help="per start, seconds")
  parser.add_argument("--json", default="", help="also write the results here")
  args = parser.parse_args(argv)
  if args.hf and args.format != "parquet":
    parser.error("--hf reads the parquet files: add --format parquet")

  data_dir = write_corpus(Path(args.data_dir), args.size_mb, args.format)
  work = Path(args.work_dir)
  variants = []  # (name, folder under --work_dir, code, extra options)
  if args.before_ref:
    variants.append((f"before ({args.before_ref})", "before",
                     _code_at(args.before_ref, work / "code_before"), {}))
  variants.append(("after", "after", REPO, {}))
  if args.hf:
    variants.append(("after, --hf_dataset", "after_hf", REPO,
                     {"hf_dataset": str(data_dir), "hf_cache_dir": str(work / "after_hf" / "datasets")}))
  results = []
  for name, sub, code, extra in variants:
    folder = work / sub
    shutil.rmtree(folder, ignore_errors=True)
    options = {"data_dir": str(data_dir), "cache_dir": str(folder / "cache"),
               "vocab_size": args.vocab_size, "seq_len": args.seq_len,
               "batch_size": args.batch_size, "method": "uniform",
               "out_dir": str(folder / "run"), **extra}
    for start in ("first start", "second start"):
      r = measure(options, folder, code, args.timeout)
      r.update(variant=name, start=start)
      results.append(r)
      print(f"{name}, {start}: {r['start_s']:.2f} s, peak RSS {r['peak_rss_mb']:.0f} MB",
            file=sys.stderr)

  print(f"\nData start-up (load_data + first batch) on a {args.size_mb:g} MB {args.format} "
        f"corpus ({len(SOURCES)} sources), vocab {args.vocab_size}, seq_len {args.seq_len}; "
        "each start a fresh process, JAX on the CPU.\n")
  print("| code | start | start-up (s) | peak RSS (MB) | RSS after imports (MB) | imports (s) |")
  print("|---|---|---:|---:|---:|---:|")
  for r in results:
    print(f"| {r['variant']} | {r['start']} | {r['start_s']:.2f} | {r['peak_rss_mb']:.0f} | "
          f"{r['rss_after_imports_mb']:.0f} | {r['import_s']:.1f} |")
  if args.json:
    Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
  main()
