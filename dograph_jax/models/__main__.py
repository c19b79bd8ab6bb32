"""Print the named GPT-2 configs and their parameter counts.

    python -m dograph_jax.models
"""

from dograph_jax.models.gpt2 import CONFIGS, param_count


def main() -> None:
  print(f"{'config':<14} {'layers':>6} {'heads':>5} {'d':>5} {'ffn':>5} {'ctx':>5} "
        f"{'vocab':>6} {'parameters':>14}")
  for name, c in CONFIGS.items():
    print(f"{name:<14} {c.n_layer:>6} {c.n_head:>5} {c.d_model:>5} {c.d_ff:>5} "
          f"{c.n_positions:>5} {c.vocab_size:>6} {param_count(c):>14,}")


if __name__ == "__main__":
  main()
