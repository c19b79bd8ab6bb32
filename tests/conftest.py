"""Shared test set-up: CPU only, deterministic, small."""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# The end-to-end tests build many train steps whose programs are identical
# (same model, same shapes): a persistent compilation cache for this session
# compiles each once.
jax.config.update("jax_compilation_cache_dir",
                  tempfile.mkdtemp(prefix="dograph-jax-compile-cache-"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
