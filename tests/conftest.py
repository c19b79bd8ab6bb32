"""Shared test set-up: CPU only, deterministic, small.

Compiled executables are released after every test module (and sooner if
the process nears its memory-map limit). Each XLA:CPU executable loaded into
the process keeps about six memory mappings (JIT code and data) until
``jax.clear_caches()``; the whole suite compiles thousands of programs, and
at Linux's default ``vm.max_map_count`` (65530) an LLVM mapping fails inside
XLA's compiler with a segmentation fault, which no test can catch (CI,
three times, at the same test of ``test_transform_parts.py``, in the
compiler or in the persistent cache's loader; never when that file runs
alone).

No persistent compilation cache either: ``DOGRAPH_TEST_COMPILE_CACHE=1``
turns one on for local runs that repeat many identical train steps.
"""

import gc
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

if os.environ.get("DOGRAPH_TEST_COMPILE_CACHE") == "1":
  jax.config.update("jax_compilation_cache_dir",
                    tempfile.mkdtemp(prefix="dograph-jax-compile-cache-"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

# Release before a third of the default limit: one module may compile a few
# thousand programs.
MAX_MAPS = 20_000


def _map_count() -> int:
  try:
    with open(f"/proc/{os.getpid()}/maps") as f:
      return sum(1 for _ in f)
  except OSError:  # not Linux: nothing to count
    return 0


def _release_executables() -> None:
  jax.clear_caches()
  gc.collect()


@pytest.fixture(autouse=True, scope="module")
def _release_after_module():
  yield
  _release_executables()


@pytest.fixture(autouse=True)
def _release_near_the_map_limit():
  yield
  if _map_count() > MAX_MAPS:
    _release_executables()
