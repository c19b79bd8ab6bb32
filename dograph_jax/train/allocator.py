"""glibc allocator settings for XLA:CPU runs.

XLA:CPU allocates each step's temporaries afresh. glibc serves blocks above
its mmap threshold (at most 32 MiB) with ``mmap`` and returns them on free,
so such a buffer is page-faulted in again every step: measured with
``benchmarks/bench_step.py`` on ``mini`` at B = 16, T = 64, the factored
DoGraph step's 32.8 MiB temporary costs 8,399 faults per step and 1.55x the
plain step, against 0.97-1.02x with the settings below (BENCHMARKS.md).
"""

from __future__ import annotations

import platform
import sys


def tune_cpu_malloc() -> str:
  """``mallopt``: never ``mmap``, never trim, one arena; returns what it did.

  Freed memory then stays in the process for reuse (the resident size stays
  at the peak), which is what a training loop of identical steps wants.
  Only for CPU runs: ``experiments/pretrain.py`` calls it when JAX's backend
  is the CPU.
  """
  if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
    return "not glibc: allocator unchanged"
  import ctypes
  libc = ctypes.CDLL("libc.so.6")
  m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8
  ok = [libc.mallopt(m_mmap_max, 0), libc.mallopt(m_trim_threshold, 2**31 - 1),
        libc.mallopt(m_arena_max, 1)]
  return "mallopt(M_MMAP_MAX=0, M_TRIM_THRESHOLD=2^31-1, M_ARENA_MAX=1)" + (
      "" if all(ok) else f" (some refused: {ok})")
