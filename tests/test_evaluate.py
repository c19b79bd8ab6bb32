"""Evaluation like the paper: the lm-eval adapter, experiments/evaluate.py and
the HuggingFace export, offline on a tiny run.

Oracles: transformers' PyTorch GPT-2 loaded from our export (per-request
log-likelihoods, greedy continuations), our own model's token losses for the
rolling perplexity, and lm-eval's own ``simple_evaluate`` on local task YAML.
"""

import json
import math
import os
import re

import jax.numpy as jnp
import numpy as np
import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dograph_jax.data import write_synthetic_corpus
from dograph_jax.models import apply, load_hf_gpt2, split_model, token_losses  # noqa: E402
from dograph_jax.models import export
from dograph_jax.study import compare
from dograph_jax.eval import evaluate
from dograph_jax.train import config, pretrain
from dograph_jax.eval.lm_eval_model import FlaxLM, length_buckets  # noqa: E402

CONTEXT = 128  # the mini model's window


class _Request:  # what lm-eval hands a model: .args
  def __init__(self, *args):
    self.args = args


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("evaluate")
  corpus = write_synthetic_corpus(root / "tiny", seed=3, total_docs=200)
  cfg = config.make_config(data_dir=str(corpus), out_dir=str(root / "run"), method="uniform",
                    steps=6, batch_size=8, seq_len=32, vocab_size=300, eval_rows=8,
                    plots=False, save_every=3)
  pretrain.train(cfg)
  return root


@pytest.fixture(scope="module")
def lm(run):
  return FlaxLM.from_run_dir(run / "run", batch_size=4, max_gen_toks=16)


@pytest.fixture(scope="module")
def hf_model(run):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  out = run / "hf"
  export.main(["--run_dir", str(run / "run"), "--out", str(out)])
  model = transformers.GPT2LMHeadModel.from_pretrained(str(out), local_files_only=True)
  model.eval()
  return torch, model, out


def test_buckets():
  assert length_buckets(128) == (32, 64, 128)
  assert length_buckets(1024) == (32, 64, 128, 256, 512, 1024)
  assert length_buckets(20) == (20,)


def test_export_round_trip(run, lm, hf_model):
  _, _, out = hf_model
  assert (out / "config.json").exists() and (out / "model.safetensors").exists()
  assert (out / "tokenizer.json").exists()
  config, model = load_hf_gpt2(out)
  _, params = split_model(model)
  original, _, _ = export.read_run_params(run / "run")
  np.testing.assert_array_equal(np.concatenate([np.ravel(x) for x in _leaves(params)]),
                                np.concatenate([np.ravel(x) for x in _leaves(original)]))
  assert config.n_positions == CONTEXT


def _leaves(tree):
  import jax
  return jax.tree.leaves(tree)


def _hf_loglikelihood(torch, model, context, continuation):
  whole = (context + continuation)[-(CONTEXT + 1):]
  inp = torch.tensor([whole[:-1]])
  with torch.no_grad():
    logp = torch.log_softmax(model(inp).logits[0].double(), -1)
  n = len(continuation)
  targets = torch.tensor(whole[1:])[-n:]
  rows = logp[-n:]
  ll = float(rows[torch.arange(n), targets].sum())
  greedy = bool((rows.argmax(-1) == targets).all())
  return ll, greedy


def test_loglikelihood_matches_transformers(lm, hf_model):
  torch, model, _ = hf_model
  rng = np.random.default_rng(0)
  requests, pairs = [], []
  texts = ["alpha beta gamma", "the quick brown fox", "1 2 3 4 5 6", "legal clause"]
  for i, text in enumerate(texts * 3):
    cont = " " + texts[(i + 1) % len(texts)]
    requests.append(_Request(text * (1 + i % 3), cont))
  # a context longer than the window: truncated from the left
  long_ctx = " ".join(str(x) for x in rng.integers(0, 1000, 200))
  requests.append(_Request(long_ctx, " the end"))
  got = lm.loglikelihood(requests)
  for request, (ll, greedy) in zip(requests, got):
    ctx, cont = lm._encode_pair(*request.args)
    if request.args[0] == long_ctx:
      assert len(ctx) + len(cont) > CONTEXT + 1
    want_ll, want_greedy = _hf_loglikelihood(torch, model, ctx, cont)
    assert ll == pytest.approx(want_ll, abs=1e-4)
    assert greedy == want_greedy


def test_greedy_generation_matches_transformers(lm, hf_model):
  torch, model, _ = hf_model
  prompts = ["alpha beta", "the quick brown fox jumps", "1 2 3"]
  got = lm.generate_until([_Request(p, {"until": [], "max_gen_toks": 12}) for p in prompts])
  for prompt, text in zip(prompts, got):
    ids = lm.tok_encode(prompt)
    with torch.no_grad():
      out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                           pad_token_id=lm.eot_token_id, eos_token_id=lm.eot_token_id)
    new = out[0, len(ids):].tolist()
    if lm.eot_token_id in new:
      new = new[:new.index(lm.eot_token_id)]
    assert text == lm.tok_decode(new)
  # stop sequences cut the text before them
  full = got[1]
  stop = full[3:5] if len(full) >= 5 else None
  if stop:
    cut = lm.generate_until([_Request(prompts[1], {"until": [stop], "max_gen_toks": 12})])[0]
    assert cut == full[:full.index(stop)]
  with pytest.raises(ValueError, match="do_sample"):
    lm.generate_until([_Request("x", {"do_sample": True})])


def test_rolling_equals_sum_of_token_losses(lm, run):
  import jax
  params, meta, run_config = export.read_run_params(run / "run")
  text = " ".join(["legal clause number"] * 60)  # longer than the window
  ids = lm.tok_encode(text)
  assert len(ids) > CONTEXT
  (got,) = lm.loglikelihood_rolling([_Request(text)])
  # Our own model on the same text: every token predicted once, the first
  # from the EOS prefix, each window at most CONTEXT long.
  graphdef = lm_graphdef(meta, run_config)
  seq = [lm.eot_token_id] + ids
  total, start = 0.0, 0
  while start < len(ids):
    end = min(start + CONTEXT, len(ids))
    window = seq[max(0, end - CONTEXT):end + 1]  # inputs window[:-1], targets window[1:]
    losses = np.asarray(token_losses(
        apply(graphdef, jax.tree.map(jnp.asarray, params), jnp.asarray([window[:-1]])),
        jnp.asarray([window[1:]])))[0]
    total -= float(losses[-(end - start):].sum())
    start = end
  assert got == pytest.approx(total, abs=1e-3)


def lm_graphdef(meta, run_config):
  from flax import nnx

  from dograph_jax.models import GPT2, get_config
  config = get_config(run_config["model"], vocab_size=meta["vocab_size"])
  return split_model(nnx.eval_shape(lambda: GPT2(config, rngs=nnx.Rngs(0))))[0]


def test_no_recompilation_within_a_bucket(lm):
  before = list(lm.traces)
  lm.loglikelihood([_Request("a b", " c")])  # some bucket-32 length
  after_first = list(lm.traces)
  lm.loglikelihood([_Request("a b c d e f g h", " i j k")])
  lm.loglikelihood([_Request("x " * 10, " y")])
  assert lm.traces == after_first  # same bucket, same batch: no new trace
  assert len(after_first) - len(before) <= 1


def _write_tasks(directory):
  directory.mkdir(exist_ok=True)
  mc = [{"question": "Which is a fruit?", "choices": ["apple", "stone"], "label": 0},
        {"question": "The sky is", "choices": ["green", "blue", "loud"], "label": 1},
        {"question": "Two plus two is", "choices": ["four", "five"], "label": 0}]
  roll = [{"text": "legal clause number one applies."}, {"text": "the quick brown fox " * 40}]
  gen = [{"prompt": "1 2 3", "answer": " 4"}, {"prompt": "alpha beta", "answer": " gamma"}]
  for name, rows in (("mc", mc), ("roll", roll), ("gen", gen)):
    (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  common = "dataset_path: json\ntest_split: train\n"
  (directory / "tiny_mc.yaml").write_text(
      f"task: tiny_mc\n{common}dataset_kwargs:\n  data_files: {directory / 'mc.jsonl'}\n"
      "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
      "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\n"
      "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
  (directory / "tiny_roll.yaml").write_text(
      f"task: tiny_roll\n{common}dataset_kwargs:\n  data_files: {directory / 'roll.jsonl'}\n"
      "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
      "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")
  (directory / "tiny_gen.yaml").write_text(
      f"task: tiny_gen\n{common}dataset_kwargs:\n  data_files: {directory / 'gen.jsonl'}\n"
      "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
      "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 8\n  do_sample: false\n"
      "metric_list:\n  - metric: exact_match\n")


def test_simple_evaluate_end_to_end_offline(run, lm):
  from lm_eval import simple_evaluate
  from lm_eval.tasks import TaskManager
  tasks_dir = run / "tasks"
  _write_tasks(tasks_dir)
  out = simple_evaluate(model=lm, tasks=["tiny_mc", "tiny_roll", "tiny_gen"],
                        task_manager=TaskManager(include_path=str(tasks_dir)),
                        bootstrap_iters=0, torch_random_seed=None, log_samples=True)
  results = out["results"]
  assert 0.0 <= results["tiny_mc"]["acc,none"] <= 1.0
  assert 0.0 <= results["tiny_gen"]["exact_match,none"] <= 1.0
  # The rolling task's word perplexity is exp(-sum ll / words) of our adapter's scores.
  docs = [json.loads(line) for line in (tasks_dir / "roll.jsonl").read_text().splitlines()]
  ll = lm.loglikelihood_rolling([_Request(d["text"]) for d in docs])
  # lm-eval's word count: re.split on runs of whitespace (a trailing space counts a word)
  words = sum(len(re.split(r"\s+", d["text"])) for d in docs)
  assert results["tiny_roll"]["word_perplexity,none"] == pytest.approx(
      math.exp(-sum(ll) / words), rel=1e-6)
  # multiple choice: the picked choice is the argmax of our log-likelihoods
  samples = out["samples"]["tiny_mc"]
  doc = samples[0]["doc"]
  scores = lm.loglikelihood([_Request(doc["question"], " " + c) for c in doc["choices"]])
  assert samples[0]["acc"] == float(int(np.argmax([s for s, _ in scores])) == doc["label"])


def test_evaluate_cli_and_missing_data(run):
  tasks_dir = run / "tasks"
  _write_tasks(tasks_dir)
  code = evaluate.main(["--run_dir", str(run / "run"), "--tasks",
                        "tiny_mc,tiny_roll,not_a_task", "--include_path", str(tasks_dir),
                        "--batch_size", "4", "--bootstrap_iters", "0"])
  assert code == 1  # one task could not run
  result = json.loads((run / "run" / "eval.json").read_text())
  assert set(result["tasks"]) == {"tiny_mc", "tiny_roll"}
  assert result["tasks"]["tiny_mc"]["primary"] == "acc_norm"
  assert "unknown task" in result["failed"]["not_a_task"]
  assert result["mean_accuracy"] == result["tasks"]["tiny_mc"]["value"]
  text = (run / "run" / "eval.md").read_text()
  assert "tiny_mc" in text and "Not evaluated" in text
  # A registry task whose data set is not cached fails at once, with advice.
  _, failures = evaluate.load_tasks(["piqa"], None)
  assert "not on this machine" in failures["piqa"] and "--include_path" in failures["piqa"]


def test_compare_eval_columns(run, monkeypatch):
  tasks_dir = run / "tasks"
  _write_tasks(tasks_dir)
  corpus = run / "tiny"
  out = run / "compare"
  argv = ["--methods", "uniform,stratified", "--seeds", "0", "--data_dir", str(corpus), "--steps", "3",
          "--batch_size", "8", "--seq_len", "32", "--vocab_size", "300", "--eval_rows", "8",
          "--out_dir", str(out), "--plots", "false", "--eval_tasks", "tiny_mc",
          "--eval_include_path", str(tasks_dir)]
  assert compare.main(argv) == 0
  text = (out / "compare.md").read_text()
  value = json.loads((out / "uniform" / "seed0" / "eval.json").read_text())[
      "tasks"]["tiny_mc"]["value"]
  assert "tiny_mc" in text and f"{value:.4f}" in text
  # an offline pipeline is evaluated on its final stage's model
  strat = json.loads((out / "stratified" / "seed0" / "eval.json").read_text())
  assert strat["run_dir"].endswith("stratified/seed0") and "tiny_mc" in strat["tasks"]
  # resumable: a second call reads the evaluation back
  monkeypatch.setattr(evaluate, "evaluate_run", lambda *a, **k: pytest.fail("re-evaluated"))
  assert compare.main(argv) == 0


_MESH_SCRIPT = """
import json, sys
import jax
jax.config.update("jax_num_cpu_devices", 8)
from dograph_jax import sharding
from dograph_jax.eval.lm_eval_model import FlaxLM

class R:
  def __init__(self, *args): self.args = args

reqs = [R("alpha beta", " gamma"), R("the quick brown", " fox"), R("1 2 3 4", " 5 6")]
one = FlaxLM.from_run_dir(sys.argv[1], batch_size=8)
mesh = FlaxLM.from_run_dir(sys.argv[1], batch_size=8, mesh=sharding.make_mesh("data=4,fsdp=2"))
kernel = mesh._params["h"][0]["mlp"]["c_fc"]["kernel"]
print(json.dumps({"one": one.loglikelihood(reqs), "mesh": mesh.loglikelihood(reqs),
                  "gen_one": one.generate_until([R("alpha", {"max_gen_toks": 5})]),
                  "gen_mesh": mesh.generate_until([R("alpha", {"max_gen_toks": 5})]),
                  "devices": len(kernel.sharding.device_set)}))
"""


def test_under_a_mesh_of_8_cpu_devices(run):
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-c", _MESH_SCRIPT, str(run / "run")], cwd=root,
                        capture_output=True, text=True, timeout=600,
                        env={**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["devices"] == 8  # the parameters live on the mesh
  for (a, ga), (b, gb) in zip(out["one"], out["mesh"]):
    assert a == pytest.approx(b, abs=1e-4) and ga == gb
  assert out["gen_one"] == out["gen_mesh"]
  with pytest.raises(ValueError, match="multiple of the mesh"):
    FlaxLM(None, {}, type("T", (), {"eos_token_id": 0})(), 128, batch_size=3,
           mesh=type("M", (), {"size": 8})())
