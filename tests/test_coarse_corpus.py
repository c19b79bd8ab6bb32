"""write_coarse_corpus on a tiny corpus the test writes: training labels
merged, validation untouched, the subsample exact and deterministic, the
manifest's counts, and clear errors."""

import gzip
import json

import pytest

from dograph_jax.data import TRUE_DOMAIN_FIELD, read_split, write_coarse_corpus
from dograph_jax.data.coarse import kept_indices

# name -> (train docs, validation docs); "rare" is the source to hide.
SIZES = {"big": (40, 4), "mid": (20, 3), "rare": (30, 5)}


def _doc(name, split, i):
  return f"{name} {split} document {i} " + "x" * i


@pytest.fixture
def corpus(tmp_path):
  """SlimPajama schema in two train files (one gzip'd, domains interleaved)
  plus bad records the reader skips; plain schema in validation."""
  root = tmp_path / "src"
  (root / "train").mkdir(parents=True)
  (root / "validation").mkdir()
  train = [{"text": _doc(n, "train", i), "meta": {"redpajama_set_name": n, "source": f"{n}{i}"}}
           for i in range(max(t for t, _ in SIZES.values()))
           for n, (t, _) in SIZES.items() if i < t]
  bad = [{"text": "  ", "meta": {"redpajama_set_name": "big"}}, {"meta": {}}, [1, 2]]
  half = len(train) // 2
  with open(root / "train" / "a.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in train[:half] + bad)
  with gzip.open(root / "train" / "b.jsonl.gz", "wt") as f:
    f.writelines(json.dumps(r) + "\n" for r in train[half:])
  with open(root / "validation" / "v.jsonl", "w") as f:
    for n, (_, v) in SIZES.items():
      f.writelines(json.dumps({"text": _doc(n, "val", i), "domain": n}) + "\n" for i in range(v))
  return root


def test_train_labels_merged_validation_untouched(corpus, tmp_path):
  dst = tmp_path / "coarse"
  manifest = write_coarse_corpus(corpus, dst, {"rare": "big"}, seed=0)
  assert sorted(p.name for p in (dst / "train").iterdir()) == ["a.jsonl", "b.jsonl"]
  train, skips = read_split(dst, "train")
  assert sorted(train) == ["big", "mid"]  # the rare source is hidden...
  assert sorted(train["big"]) == sorted([_doc("big", "train", i) for i in range(40)]
                                        + [_doc("rare", "train", i) for i in range(30)])
  assert skips.total == 0  # the bad records were dropped (and counted below)
  assert manifest["skipped"]["train"] == {"empty_text": 1, "missing_domain": 1,
                                          "not_an_object": 1}
  # ... while validation keeps every source under its true label, as it was.
  src_val, _ = read_split(corpus, "validation")
  assert read_split(dst, "validation")[0] == src_val
  # The true labels travel with every record: the reference run reads them.
  true_train, _ = read_split(dst, "train", domain_field=TRUE_DOMAIN_FIELD)
  assert true_train == read_split(corpus, "train")[0]
  line = json.loads((dst / "train" / "a.jsonl").read_text().splitlines()[0])
  assert line["meta"]["source"] == "big0"  # everything else of the record is kept
  # Counts: per true source, per training label, the hidden source's shares.
  nbytes = lambda n, split, k: sum(len(_doc(n, split, i).encode()) for i in range(k))
  for n, (t, v) in SIZES.items():
    assert manifest["train"][n] == {"label": "big" if n == "rare" else n, "docs_in": t,
                                    "docs": t, "bytes": nbytes(n, "train", t)}
    assert manifest["validation"][n] == {"docs": v, "bytes": nbytes(n, "val", v)}
  big = manifest["train_labels"]["big"]
  assert big["sources"] == {"big": 40, "rare": 30} and big["docs"] == 70
  assert manifest["hidden"]["rare"]["share_of_label"] == pytest.approx(
      nbytes("rare", "train", 30) / big["bytes"])
  assert sum(manifest["train_byte_shares"].values()) == pytest.approx(1.0)
  assert json.loads((dst / "manifest.json").read_text()) == manifest


def test_keep_fraction_exact_and_deterministic(corpus, tmp_path):
  runs = [write_coarse_corpus(corpus, tmp_path / f"c{k}", {"rare": "big"},
                              keep_fraction={"rare": 0.3}, seed=s)
          for k, s in enumerate((7, 7, 8))]
  assert runs[0]["train"]["rare"]["docs"] == round(0.3 * 30) == 9
  assert runs[0]["train"]["rare"]["docs_in"] == 30
  assert runs[0]["train"]["big"]["docs"] == 40  # other sources whole

  def rare_docs(k):
    docs = read_split(tmp_path / f"c{k}", "train", domain_field=TRUE_DOMAIN_FIELD)[0]
    return docs["rare"]

  assert rare_docs(0) == rare_docs(1)  # same seed, same subsample
  assert rare_docs(0) != rare_docs(2)  # (another seed, almost surely another)
  assert (tmp_path / "c0" / "train" / "a.jsonl").read_bytes() == \
      (tmp_path / "c1" / "train" / "a.jsonl").read_bytes()
  # Validation is never subsampled.
  assert runs[0]["validation"]["rare"]["docs"] == 5
  # The subsample does not depend on the merge: a true-label twin built with
  # another mapping keeps the same documents.
  other = write_coarse_corpus(corpus, tmp_path / "twin", {"mid": "big"},
                              keep_fraction={"rare": 0.3}, seed=7)
  assert other["train"]["rare"]["docs"] == 9
  assert read_split(tmp_path / "twin", "train")[0]["rare"] == rare_docs(0)
  # Approximately right at scale, and never empty.
  assert len(kept_indices(1000, 0.25, "x", 0)) == 250
  assert len(kept_indices(10, 0.01, "x", 0)) == 1
  assert kept_indices(10, 1.0, "x", 0) is None


@pytest.mark.parametrize("merge, keep, match", [
    ({}, None, "merge is empty"),
    ({"nope": "big"}, None, "unknown source 'nope'"),
    ({"rare": "nope"}, None, "unknown source 'nope'"),
    ({"rare": "rare"}, None, "into itself"),
    ({"rare": "mid", "mid": "big"}, None, "chain"),
    ({"rare": "big"}, {"nope": 0.5}, "keep_fraction: unknown source"),
    ({"rare": "big"}, {"rare": 0.0}, r"must be in \(0, 1\]"),
    ({"rare": "big"}, {"rare": 1.5}, r"must be in \(0, 1\]"),
])
def test_errors(corpus, tmp_path, merge, keep, match):
  dst = tmp_path / "coarse"
  with pytest.raises(ValueError, match=match):
    write_coarse_corpus(corpus, dst, merge, keep_fraction=keep)
  assert not dst.exists()
  assert not list(tmp_path.glob(".coarse*"))  # no temporary folder left behind


def test_existing_destination(corpus, tmp_path):
  dst = tmp_path / "coarse"
  write_coarse_corpus(corpus, dst, {"rare": "big"})
  with pytest.raises(FileExistsError, match="overwrite"):
    write_coarse_corpus(corpus, dst, {"rare": "mid"})
  write_coarse_corpus(corpus, dst, {"rare": "mid"}, overwrite=True)
  assert sorted(read_split(dst, "train")[0]["mid"]) == sorted(
      [_doc("mid", "train", i) for i in range(20)] + [_doc("rare", "train", i) for i in range(30)])
  assert not list(tmp_path.glob(".coarse*"))
  with pytest.raises(ValueError, match="source corpus itself"):
    write_coarse_corpus(corpus, corpus, {"rare": "big"}, overwrite=True)


def _script():
  import importlib.util
  from pathlib import Path
  path = Path(__file__).resolve().parents[1] / "experiments" / "data" / "build_coarse_corpus.py"
  spec = importlib.util.spec_from_file_location("build_coarse_corpus", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_script(corpus, tmp_path, capsys):
  script = _script()
  manifest = script.main(["--src", str(corpus), "--out", str(tmp_path / "c"),
                          "--merge", "rare=big", "--keep", "rare=0.5,mid=1", "--seed", "3"])
  assert manifest["merge"] == {"rare": "big"}
  assert manifest["keep_fraction"] == {"rare": 0.5, "mid": 1.0}
  assert manifest["train"]["rare"]["docs"] == 15
  assert "hidden: rare in big" in capsys.readouterr().out
  with pytest.raises(SystemExit):  # argparse's error: the message, exit status 2
    script.main(["--src", str(corpus), "--out", str(tmp_path / "d"), "--merge", "rare"])
  assert "expected name=value" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    script.main(["--src", str(corpus), "--out", str(tmp_path / "d"), "--merge", "rare=big",
                 "--keep", "rare=lots"])
  assert "not a float" in capsys.readouterr().err
