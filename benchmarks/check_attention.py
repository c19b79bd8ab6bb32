"""cuDNN flash attention against XLA's attention on this device (issue 24).

The CPU tests compare ``--attention dot_product`` with the explicit
attention only through XLA (cuDNN needs a CUDA GPU), so the prepared GPU check
runs this once a device is lent:

1. the kernel: ``causal_dot_product_attention(..., "dot_product")`` (cuDNN
   where it applies) and JAX's XLA implementation, both on the same bfloat16
   operands, against a float32 oracle (XLA on the operands upcast), for the
   output and the gradients of a random linear functional of it with respect
   to ``q``, ``k`` and ``v``; GPT-2's shape (H = G = 12, K = 64) and
   TinyLlama's grouped queries (H = 32, G = 4, K = 64);
2. the model (default ``paper-small``, B 8 x T 256): its per-sequence losses and the gradient of
   their mean, in bfloat16 with ``attention="dot_product"`` and with
   ``attention="xla"``, against the float32 model (same parameters).

Reported as ``||out - ref|| / ||ref||``. bfloat16 operands round to about
4e-3, so the verdict is relative: cuDNN's error must stay within twice XLA's
bfloat16 error plus 1e-3 (the same rounding, another order of sums). It
also prints which implementation ran (cuDNN applies or why not).

    python benchmarks/check_attention.py [--seq_len T] [--model NAME --vocab_size V
        --model_seq_len T] [--json PATH]

Exit status 1 when a comparison fails.
"""

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from flax import nnx

from dograph_jax.models import apply, build, get_config, split_model, token_losses
from dograph_jax.models.gpt2 import causal_dot_product_attention, cudnn_attention_applies


def rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def kernel_case(name: str, B: int, T: int, H: int, G: int, K: int, seed: int) -> dict:
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (B, T, H, K), jnp.float32).astype(jnp.bfloat16)
  k = jax.random.normal(keys[1], (B, T, G, K), jnp.float32).astype(jnp.bfloat16)
  v = jax.random.normal(keys[2], (B, T, G, K), jnp.float32).astype(jnp.bfloat16)
  probe = jax.random.normal(keys[3], (B, T, H, K), jnp.float32)

  def value_and_grads(impl, dtype):
    def f(q, k, v):
      if impl == "dot_product":
        out = causal_dot_product_attention(q, k, v, "dot_product")
      else:
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
      return jnp.sum(out.astype(jnp.float32) * probe), out
    cast = lambda x: x.astype(dtype)
    (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(
        cast(q), cast(k), cast(v))
    return out, grads

  ref_out, ref_grads = value_and_grads("xla", jnp.float32)
  row = {"case": name, "shape": f"B{B} T{T} H{H} G{G} K{K}",
         "dot_product_runs": cudnn_attention_applies(jnp.bfloat16, K) or "cudnn"}
  for impl in ("xla", "dot_product"):
    out, grads = value_and_grads(impl, jnp.bfloat16)
    row[f"{impl}_out"] = rel(out, ref_out)
    for tag, g, r in zip("qkv", grads, ref_grads):
      row[f"{impl}_d{tag}"] = rel(g, r)
  return row


def model_case(model: str, vocab_size: int, seq_len: int, seed: int) -> dict:
  """The model's losses and mean-loss gradient: bfloat16 with each kernel
  against the float32 model (same parameters, XLA attention)."""
  batch = jax.random.randint(jax.random.key(seed), (8, seq_len + 1), 0, vocab_size)
  results = {}
  for tag, dtype, attention in (("f32", jnp.float32, "xla"), ("xla", jnp.bfloat16, "xla"),
                                ("dot_product", jnp.bfloat16, "dot_product")):
    cfg = get_config(model, vocab_size=vocab_size, dtype=dtype, attention=attention)
    graphdef, params = split_model(build(cfg, nnx.Rngs(seed)))

    def losses_of(p):
      return token_losses(apply(graphdef, p, batch[:, :-1]), batch[:, 1:]).mean(axis=1)

    losses = jax.jit(losses_of)(params)
    grads = jax.jit(jax.grad(lambda p: jnp.mean(losses_of(p))))(params)
    results[tag] = (losses, jnp.concatenate([g.ravel().astype(jnp.float32)
                                             for g in jax.tree.leaves(grads)]))
  row = {"case": f"{model}, B8 T{seq_len}, vs the float32 model"}
  for tag in ("xla", "dot_product"):
    row[f"{tag}_loss"] = rel(results[tag][0], results["f32"][0])
    row[f"{tag}_grad"] = rel(results[tag][1], results["f32"][1])
  return row


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--json", default=None)
  parser.add_argument("--seq_len", type=int, default=1024, help="T of the kernel cases")
  parser.add_argument("--model", default="paper-small", help="the model case's config")
  parser.add_argument("--vocab_size", type=int, default=50257)
  parser.add_argument("--model_seq_len", type=int, default=256)
  args = parser.parse_args(argv)
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, "
        f"device {jax.devices()[0].device_kind}")
  rows = [kernel_case("gpt2 (MHA)", 4, args.seq_len, 12, 12, 64, 0),
          kernel_case("tinyllama (GQA 32/4)", 2, args.seq_len, 32, 4, 64, 1)]
  ok = True
  print("| case | dot_product runs | tensor | XLA bf16 vs f32 | dot_product bf16 vs f32 | ok |")
  print("|---|---|---|---:|---:|---|")
  for row in rows:
    for tensor in ("out", "dq", "dk", "dv"):
      x, c = row[f"xla_{tensor}"], row[f"dot_product_{tensor}"]
      good = np.isfinite(c) and c <= 2 * x + 1e-3
      ok &= bool(good)
      print(f"| {row['case']} {row['shape']} | {row['dot_product_runs']} | {tensor} | "
            f"{x:.2e} | {c:.2e} | {'yes' if good else 'NO'} |")
  model = model_case(args.model, args.vocab_size, args.model_seq_len, 2)
  for tensor in ("loss", "grad"):
    x, c = model[f"xla_{tensor}"], model[f"dot_product_{tensor}"]
    good = np.isfinite(c) and c <= 2 * x + 1e-3
    ok &= bool(good)
    print(f"| {model['case']} | - | {tensor} | {x:.2e} | {c:.2e} | {'yes' if good else 'NO'} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"kernel": rows, "model": model, "ok": ok}, f, indent=1)
  print("attention check:", "passed" if ok else "FAILED")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
