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
turns one on for local runs that repeat many identical train steps (over
the whole suite it saved nothing, measured 2026-12-05: what it saves on
recompiled programs it spends writing every other one; the golden test's
child process, which recompiles most of its programs, keeps its own).

Compiled at LLVM optimisation level 0 (``XLA_FLAGS=
--xla_backend_optimization_level=0``): the suite compiles thousands of tiny
programs and runs each a few times, so XLA:CPU's code generation is most of
its time; level 0 cuts a third of it. The HLO passes (fusion, buffer
assignment: what the memory and FLOPs tests read) are XLA's usual ones; the
floats may differ from a default compile in the last bits. The pin
against a record written with the default compile
(``test_golden_methods.py``, compared to float32 rounding) trains in a
child process with the default compile, so that only the CPU, not the
compile, separates it from the record; the rest of the suite passes either way. An ``XLA_FLAGS``
that already names an optimisation level is left alone;
``DOGRAPH_TEST_DEFAULT_OPT=1`` keeps the default compile.
"""

import gc
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
OPT_FLAG = "--xla_backend_optimization_level"
if (os.environ.get("DOGRAPH_TEST_DEFAULT_OPT") != "1"
    and OPT_FLAG not in os.environ.get("XLA_FLAGS", "")):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {OPT_FLAG}=0".strip()

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


# Longest modules first (seconds of one worker on the 2-core CI machine,
# 2026-12-05: 254, ~190, 155, 137, 136, 134, 126, then ~100 each). Under
# ``-n 2 --dist loadfile`` a module runs whole on one worker, so the suite
# ends when the last module does: starting the long ones first (and the
# short ones last, to fill the gaps) keeps both workers busy to the end.
# pytest-xdist otherwise orders modules by their number of tests, which put
# three of the longest (few tests each) last. Unlisted modules keep their
# collection order, after these.
SLOW_MODULES = ("test_pretrain", "test_gpu_check", "test_golden_methods", "test_analyses",
                "test_distributed", "test_failure_policy", "test_micro_batches",
                "test_methods", "test_persistent", "test_factored", "test_evaluate",
                "test_sharding", "test_transform_parts", "test_attention_remat",
                "test_run_safety", "test_transform")


def pytest_configure(config):
  if hasattr(config.option, "loadscopereorder"):  # pytest-xdist's module reordering
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(SLOW_MODULES)}
  items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: keeps the rest
