"""Shared test set-up: CPU only, deterministic, small.

No persistent compilation cache: twice in CI, reading a cached CPU
executable back (``jax/_src/compilation_cache.py``, K-means of
``test_transform_parts.py``) crashed the whole session with a segmentation
fault, which no test can catch. Set ``DOGRAPH_TEST_COMPILE_CACHE=1`` to turn
it on for local runs that repeat many identical train steps.
"""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

if os.environ.get("DOGRAPH_TEST_COMPILE_CACHE") == "1":
  jax.config.update("jax_compilation_cache_dir",
                    tempfile.mkdtemp(prefix="dograph-jax-compile-cache-"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
