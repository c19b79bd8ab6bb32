"""Print the named model configs (GPT-2 and LLaMA families) and their sizes.

    python -m dograph_jax.models
"""

from dograph_jax.models import CONFIGS, LlamaConfig, param_count


def main() -> None:
  print(f"{'config':<16} {'family':<6} {'layers':>6} {'heads':>5} {'kv':>3} {'d':>5} "
        f"{'ffn':>5} {'ctx':>5} {'vocab':>6} {'tied':>4} {'parameters':>15}")
  for name, c in CONFIGS.items():
    llama = isinstance(c, LlamaConfig)
    print(f"{name:<16} {'llama' if llama else 'gpt2':<6} {c.n_layer:>6} {c.n_head:>5} "
          f"{c.n_kv_head if llama else c.n_head:>3} {c.d_model:>5} {c.d_ff:>5} "
          f"{c.n_positions:>5} {c.vocab_size:>6} {'yes' if not llama or c.tie_embeddings else 'no':>4} "
          f"{param_count(c):>15,}")


if __name__ == "__main__":
  main()
