"""R&B: the round rule against hand-computed values, the Gram matrix of
per-sample final-layer gradients against vmap(grad), the regrouping against
planted clusters and scikit-learn, and the pipeline end to end."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from sklearn.metrics import adjusted_rand_score, silhouette_score

from dograph_jax import projection
from dograph_jax.data import write_synthetic_corpus
from dograph_jax.mixing import MixingInputs, domain_counts, rnb
from dograph_jax.mixing import regroup
from dograph_jax.mixing.rnb import SKETCH_SEED, domain_head_grads, round_proportions
from dograph_jax.models import build, get_config, sequence_loss, split_model, token_losses
from dograph_jax.study import compare
from dograph_jax.train import config, methods, pretrain
from dograph_jax.train import method as method_lib

# --- the round rule -----------------------------------------------------------

# Three clusters; round sums S_i and counts n_i, so that the mean gradients
# S_i / n_i are (1, 0), (0, 1), (2, 2):
#   G = [[1, 0, 2], [0, 1, 2], [2, 2, 8]],
#   q = (0.5, 0.25, 0.25):  G q = (1.0, 0.75, 3.5),  ||G q|| = sqrt(13.8125).
S = np.array([[2.0, 0.0], [0.0, 3.0], [2.0, 2.0]])
N = np.array([2.0, 3.0, 1.0])
Q = (0.5, 0.25, 0.25)
NORM = math.sqrt(1.0 + 0.5625 + 12.25)


def _hand_p(lam):
  e = [math.exp(lam * v / NORM) for v in (1.0, 0.75, 3.5)]
  return np.array(e) / sum(e)


def test_round_proportions_hand_values():
  p, gram = round_proportions(jnp.asarray(S), jnp.asarray(N), jnp.asarray(Q), 2.0)
  np.testing.assert_allclose(gram, [[1, 0, 2], [0, 1, 2], [2, 2, 8]], rtol=1e-6)
  np.testing.assert_allclose(p, _hand_p(2.0), rtol=1e-6)
  # An absent cluster (n = 0) scores 0 whatever its sum holds; G q = 0 -> uniform.
  p, gram = round_proportions(jnp.asarray(S), jnp.asarray([2.0, 3.0, 0.0]), jnp.asarray(Q), 1.0)
  np.testing.assert_allclose(gram, [[1, 0, 0], [0, 1, 0], [0, 0, 0]], atol=1e-7)
  gq = np.array([0.5, 0.25, 0.0])
  e = np.exp(gq / np.linalg.norm(gq))
  np.testing.assert_allclose(p, e / e.sum(), rtol=1e-6)
  p, _ = round_proportions(jnp.zeros((3, 2)), jnp.asarray(N), jnp.asarray(Q), 5.0)
  np.testing.assert_allclose(p, [1 / 3] * 3, rtol=1e-6)


def test_mixer_rounds_accumulate_then_reweight():
  mixer = rnb(3, target=(2.0, 1.0, 1.0), round_steps=2, lam=2.0, sketch_dim=0)  # q normalised
  state = mixer.init(width=2)
  domain_id = jnp.asarray([0, 0, 1, 1, 1, 2], jnp.int32)
  losses = jnp.ones((6,), jnp.float32)
  # The round's sums arrive in two steps (halves); counts come from the
  # batches: 2 + 2, 3 + 3, 1 + 1 -> N doubled, S doubled: the same means.
  def inputs(step):
    return MixingInputs(losses=losses, domain_id=domain_id, step=jnp.asarray(step),
                        domain_counts=domain_counts(domain_id, 3),
                        head_grads=jnp.asarray(S, jnp.float32))
  w, state = mixer.update(state, inputs(0))
  np.testing.assert_allclose(w, [1 / 6] * 6)          # first round: the batch mean
  np.testing.assert_allclose(state.weights, [2 / 6, 3 / 6, 1 / 6], rtol=1e-6)  # observed
  assert int(state.rounds) == 0
  w, state = mixer.update(state, inputs(1))
  np.testing.assert_allclose(w, [1 / 6] * 6)          # the round ends after this step
  assert int(state.rounds) == 1 and int(state.round_step) == 0
  np.testing.assert_allclose(state.weights, _hand_p(2.0), rtol=1e-6)
  np.testing.assert_allclose(state.gram, [[1, 0, 2], [0, 1, 2], [2, 2, 8]], rtol=1e-6)
  np.testing.assert_array_equal(state.grad_sum, 0.0)
  np.testing.assert_array_equal(state.sample_count, 0.0)
  # Next round: in-batch weights p_c / n_c.
  w, state = mixer.update(state, inputs(2))
  p = _hand_p(2.0)
  np.testing.assert_allclose(w, [p[0] / 2] * 2 + [p[1] / 3] * 3 + [p[2]], rtol=1e-6)
  assert abs(float(state.weights_sum.sum()) - 3.0) < 1e-5 and int(state.count) == 3


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match="target must hold 3"):
    rnb(3, target=(1.0, 1.0))
  with pytest.raises(ValueError, match="round_steps"):
    rnb(3, round_steps=0)
  with pytest.raises(ValueError, match="needs init\\(width"):
    rnb(3, sketch_dim=0).init()
  static, traced = methods.parse_method_args("rnb", {"round_steps": "7", "lam": "3",
                                                    "target": "1:2:3"})
  assert static == {"round_steps": 7, "target": (1.0, 2.0, 3.0)} and traced == {"lam": 3.0}


# --- the Gram matrix of final-layer gradients ---------------------------------

def _batch(vocab, rng, b=6, t=10):
  return jnp.asarray(rng.integers(0, vocab, (b, t + 1)), jnp.int32)


@pytest.mark.parametrize("sketch_dim", [0, 64])
def test_head_grads_of_an_untied_model_match_vmap_grad(sketch_dim):
  """lm_head's per-sample gradient (from vmap(grad) of the whole model) summed
  per cluster: the trainer's taps + domain_head_grads give the same sums
  (exact) or their Kronecker sketches, hence the same Gram matrix."""
  cfg = get_config("llama-mini", vocab_size=97, tie_embeddings=False)
  graphdef, params = split_model(build(cfg, nnx.Rngs(0)))
  tokens = _batch(97, np.random.default_rng(0))
  domain_id = jnp.asarray([0, 2, 1, 0, 2, 2], jnp.int32)
  losses, (_, h, logits) = method_lib._losses_and_head(graphdef, params, tokens)
  np.testing.assert_allclose(losses, jax.vmap(lambda r: sequence_loss(graphdef, params, r))(
      tokens), rtol=1e-6)
  d_logits = jax.grad(lambda lg: token_losses(lg, tokens[:, 1:]).mean(1).sum())(logits)
  ours = domain_head_grads(h, d_logits, domain_id, 3, sketch_dim)

  per_sample = jax.vmap(jax.grad(lambda p, r: sequence_loss(graphdef, p, r)),
                        in_axes=(None, 0))(params, tokens)
  g_BxVxD = jnp.swapaxes(per_sample["lm_head"]["kernel"], 1, 2)  # kernel (D, V) -> (V, D)
  if sketch_dim:
    g_BxF = projection.kronecker_sketch_leaf(g_BxVxD, jax.random.PRNGKey(SKETCH_SEED),
                                             sketch_dim)
  else:
    g_BxF = g_BxVxD.reshape(6, -1)
  oracle = jax.nn.one_hot(domain_id, 3).T @ g_BxF
  scale = float(jnp.max(jnp.abs(oracle)))
  np.testing.assert_allclose(ours, oracle, atol=1e-5 * scale)
  gram = lambda x: np.asarray(x, np.float64) @ np.asarray(x, np.float64).T
  np.testing.assert_allclose(gram(ours), gram(oracle), rtol=1e-4, atol=1e-9 * scale ** 2)


def test_head_grads_of_a_tied_model_match_vmap_grad_of_the_head():
  """Tied GPT-2: the head's use of the embedding, per sample, by vmap(grad) of
  the loss of logits = h W^T in W (h the recorded input)."""
  cfg = get_config("mini", vocab_size=97)
  graphdef, params = split_model(build(cfg, nnx.Rngs(1)))
  tokens = _batch(97, np.random.default_rng(1))
  domain_id = jnp.asarray([1, 1, 0, 0, 0, 1], jnp.int32)
  losses, (_, h, logits) = method_lib._losses_and_head(graphdef, params, tokens)
  w = params["wte"]["embedding"]
  np.testing.assert_allclose(logits, jnp.einsum("btd,vd->btv", h, w), rtol=1e-5, atol=1e-5)
  d_logits = jax.grad(lambda lg: token_losses(lg, tokens[:, 1:]).mean(1).sum())(logits)
  ours = domain_head_grads(h, d_logits, domain_id, 2, 0)
  head_loss = lambda w_, h_, r: token_losses(jnp.einsum("td,vd->tv", h_, w_)[None],
                                             r[None, 1:]).mean()
  g = jax.vmap(jax.grad(head_loss), in_axes=(None, 0, 0))(w, h, tokens)
  oracle = jax.nn.one_hot(domain_id, 2).T @ g.reshape(6, -1)
  np.testing.assert_allclose(ours, oracle, atol=1e-5 * float(jnp.max(jnp.abs(oracle))))


# --- regrouping -----------------------------------------------------------------

def _planted_corpus(rng, k=4, per=60):
  vocab = [[f"w{c}x{j}" for j in range(40)] for c in range(k)]
  shared = [f"common{j}" for j in range(30)]
  texts, labels = [], []
  for c in range(k):
    for _ in range(per):
      words = list(rng.choice(vocab[c], 25)) + list(rng.choice(shared, 15))
      rng.shuffle(words)
      texts.append(" ".join(words))
      labels.append(c)
  return texts, np.asarray(labels)


def test_regrouping_recovers_planted_clusters():
  texts, planted = _planted_corpus(np.random.default_rng(0))
  embed = regroup.TfidfSvdEmbedder(dim=16, seed=0)
  z = embed(texts)  # fits on the first texts
  np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-9)
  grouping = regroup.choose_k(z, range(2, 9), seed=0)
  assert grouping.k == 4
  assert adjusted_rand_score(planted, grouping.labels) > 0.9
  # Held-out documents of each planted group land in its cluster.
  held, held_planted = _planted_corpus(np.random.default_rng(1), per=10)
  assigned = grouping.assign(embed(held))
  assert adjusted_rand_score(held_planted, assigned) > 0.9


def test_silhouette_on_hand_computed_cases():
  # 1-D points 0, 1 | 10, 11: a = 1 for every point; b = 10.5, 9.5, 9.5, 10.5;
  # s = (b - a) / b.
  x = np.array([[0.0], [1.0], [10.0], [11.0]])
  expected = (2 * (9.5 / 10.5) + 2 * (8.5 / 9.5)) / 4
  assert regroup.silhouette(x, [0, 0, 1, 1]) == pytest.approx(expected, rel=1e-12)
  # Euclidean in 2-D, label names arbitrary: (0,0), (3,4) | (0,10), (3,14)
  # (the second pair is the first shifted by 10 in y). a = 5 for all; b:
  # (0,0)->(0,10),(3,14): 10, sqrt(205); (3,4)->(0,10),(3,14): sqrt(45), 10; the
  # other pair mirrors these.
  x2 = np.array([[0.0, 0.0], [3.0, 4.0], [0.0, 10.0], [3.0, 14.0]])
  b_far, b_near = (10.0 + np.sqrt(205.0)) / 2, (np.sqrt(45.0) + 10.0) / 2
  expected2 = ((b_far - 5.0) / b_far + (b_near - 5.0) / b_near) / 2
  assert regroup.silhouette(x2, ["u", "u", "v", "v"]) == pytest.approx(expected2, rel=1e-12)
  # A point alone in its cluster scores 0: points 0, 1 | 5 give
  # (4/5 + 3/4 + 0) / 3.
  assert regroup.silhouette(np.array([[0.0], [1.0], [5.0]]), [0, 0, 1]) == pytest.approx(
      (0.8 + 0.75) / 3, rel=1e-12)
  # A clustering that fits the data better scores higher (three blobs).
  rng = np.random.default_rng(3)
  blobs = np.concatenate([rng.normal(c, 1.0, (30, 5)) for c in (0.0, 3.0, 6.0)])
  assert regroup.silhouette(blobs, np.repeat([0, 1, 2], 30)) > regroup.silhouette(
      blobs, rng.integers(0, 4, 90))
  with pytest.raises(ValueError, match="2 <= clusters"):
    regroup.silhouette(blobs, np.zeros(90, int))
  with pytest.raises(ValueError, match="2 <= clusters"):
    regroup.silhouette(x, [0, 1, 2, 3])   # every point its own cluster: k = N


def test_choose_k_takes_the_best_silhouette():
  from sklearn.cluster import KMeans
  rng = np.random.default_rng(4)
  x = np.concatenate([rng.normal(c, 0.7, (40, 3)) for c in ((0, 0, 0), (4, 0, 0), (0, 4, 0))])
  grouping = regroup.choose_k(x, [2, 3, 4, 5], seed=0)
  sk = {k: silhouette_score(x, KMeans(n_clusters=k, n_init=4, random_state=0).fit(x).labels_)
        for k in (2, 3, 4, 5)}
  assert grouping.scores == pytest.approx(sk, rel=1e-9)
  assert grouping.k == max(sk, key=sk.get) == 3
  with pytest.raises(ValueError, match="no k"):
    regroup.choose_k(x, [1, 500])


def test_local_model_embedder_reads_a_saved_encoder(tmp_path):
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("torch")
  from tokenizers import Tokenizer, models, pre_tokenizers
  words = ["alpha", "beta", "gamma", "delta", "[UNK]", "[PAD]", "[CLS]", "[SEP]"]
  tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]",
                                              pad_token="[PAD]")
  fast.save_pretrained(tmp_path / "enc")
  config = transformers.BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=32,
                                   max_position_embeddings=32, pad_token_id=5)
  transformers.BertModel(config).save_pretrained(tmp_path / "enc")
  embed = regroup.make_embedder(str(tmp_path / "enc"))
  z = embed(["alpha beta", "gamma delta gamma", "alpha"])
  assert z.shape == (3, 16)
  np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-6)
  # mean pooling over the mask: padding does not change a text's embedding
  np.testing.assert_allclose(embed(["alpha"])[0], z[2], rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match="no config.json"):
    regroup.make_embedder(str(tmp_path / "missing"))


# --- the pipeline ---------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return write_synthetic_corpus(tmp_path_factory.mktemp("corpus"), seed=1, total_docs=300)


def _cfg(corpus, out_dir, **kw):
  base = dict(data_dir=str(corpus), vocab_size=300, steps=4, batch_size=8, seq_len=32,
              eval_every=0, eval_rows=4, save_every=0, warmup_steps=1, plots=False,
              out_dir=str(out_dir))
  return config.make_config(**{**base, **kw})


def test_rnb_pipeline_regroups_trains_on_clusters_and_reports_human_domains(corpus, tmp_path):
  cfg = _cfg(corpus, tmp_path / "rnb", method="rnb", method_args={"round_steps": "2"},
             regroup_k="3:6")
  summary = pretrain.train(cfg)
  info = json.loads((tmp_path / "rnb" / "regrouped" / "regroup.json").read_text())
  assert 3 <= info["k"] <= 6 and set(info["silhouette"]) == {"3", "4", "5", "6"}
  assert info["k"] == int(max(info["silhouette"], key=info["silhouette"].get))
  assert abs(sum(info["target"].values()) - 1) < 1e-9
  contingency = np.asarray(info["contingency"])
  assert contingency.sum() == info["documents"] and contingency.shape == (5, info["k"])
  # Every training document went to exactly one cluster file, with its label.
  records = [json.loads(line) for f in sorted((tmp_path / "rnb" / "regrouped" / "train").glob(
      "*.jsonl")) for line in f.read_text().splitlines()]
  assert len(records) == info["documents"]
  assert {r["domain"] for r in records} == {f"cluster_{c:02d}" for c in range(info["k"])}
  # The final run: the clusters as domains, R&B's mixer, the human domains evaluated.
  final_cfg = json.loads((tmp_path / "rnb" / "stages" / "final" / "config.json").read_text())
  assert final_cfg["method"] == "rnb_rounds" and final_cfg["data"]["eval_domains"] == "validation"
  assert "target" in final_cfg["method_args"] and final_cfg["method_args"]["round_steps"] == "2"
  assert set(summary["val_loss"]) == {"code", "dna", "legal", "numbers", "prose"}
  assert set(summary["mixture"]) == set(info["target"])
  assert abs(sum(summary["mixture"].values()) - 1) < 1e-5
  assert summary["stages"].keys() == {"regroup", "final"}
  # The original tokenizer: the same vocabulary as a plain run on the corpus.
  assert final_cfg["data"]["tokenizer"].endswith("tokenizer-bpe-300")
  # Rerun: both stages are reused.
  again = pretrain.train(config.replace(cfg, resume=True))  # without it: refused (a run is there)
  assert again["val_loss"] == summary["val_loss"]


def test_compare_runs_temperature_and_rnb(corpus, tmp_path):
  base = _cfg(corpus, tmp_path, steps=3, regroup_k="3:4")
  result = compare.compare(base, ["uniform", "temperature", "rnb"], [0], tmp_path / "cmp",
                           {"temperature": {"T": "2.0"}, "rnb": {"round_steps": "1"}})
  assert result["failures"] == {}
  assert set(result["aggregate"]) == {"uniform", "temperature", "rnb"}
  table = (tmp_path / "cmp" / "compare.md").read_text()
  assert "| temperature |" in table and "| rnb |" in table


def test_a_non_finite_round_keeps_the_proportions():
  mixer = rnb(3, round_steps=1, sketch_dim=0)
  domain_id = jnp.asarray([0, 1, 2], jnp.int32)
  def inputs(sums):
    return MixingInputs(losses=jnp.ones((3,)), domain_id=domain_id, step=jnp.asarray(0),
                        domain_counts=domain_counts(domain_id, 3),
                        head_grads=jnp.asarray(sums, jnp.float32))
  _, state = mixer.update(mixer.init(width=2), inputs(S))
  good = np.asarray(state.weights)
  _, state = mixer.update(state, inputs([[np.nan, 0.0], [0.0, 1.0], [1.0, 1.0]]))
  np.testing.assert_array_equal(state.weights, good)
  assert np.all(np.isfinite(state.gram))
