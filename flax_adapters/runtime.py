"""Process-level settings for entry points (`python -m train`, `python -m eval`, the
benchmarks).

Called explicitly from `main()`, never at import: library code sets nothing
process-wide.

Why `keep_freed_memory`: XLA:CPU allocates every activation buffer of a step
with malloc and frees it at the end. glibc serves blocks above 128 KiB-32 MiB
(its adaptive mmap threshold) with a fresh mmap and unmaps them on free, so
each step page-faults its whole working set in again (measured in commit
c2289a0; `python -m bench.train_step --mallopt` compares both settings).
Serving them from the heap and never trimming it lets step k + 1 reuse step
k's pages; the resident set stays at the high-water mark a step needs anyway.
"""

from __future__ import annotations

import ctypes
import sys

# glibc's mallopt parameter numbers (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def keep_freed_memory() -> bool:
    """glibc only (a no-op elsewhere): no mmap for large blocks, no trimming,
    one arena, so freed buffers are reused instead of returned to the kernel.
    Call before the first large allocation. Returns whether it applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # musl and other libcs: keep their defaults
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, -1)
                and libc.mallopt(_M_ARENA_MAX, 1))
