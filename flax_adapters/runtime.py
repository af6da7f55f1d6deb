"""Process-level settings for entry points (`python -m train`, `python -m eval`, the
benchmarks).

Called explicitly from `main()`, never at import: library code sets nothing
process-wide.

Why `matmul_precision` "auto" is "highest" on CPU only: XLA:CPU multiplies
float32 in float32 whatever the setting (so full precision is free there, and
the parity tests against transformers rely on it), while "highest" is
several times slower than the default on GPU (float32 without TF32 tensor
cores) and TPU (six bfloat16 passes instead of one); there the default is kept.

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

import jax

# glibc's mallopt parameter numbers (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8

MATMUL_PRECISIONS = ("auto", "highest", "high", "default")


def resolve_matmul_precision(value: str, backend: str) -> str:
    """The `jax_default_matmul_precision` that `value` means on `backend`
    ('cpu', 'gpu', 'tpu'): "auto" is "highest" on CPU and "default" elsewhere;
    the others are themselves."""
    if value not in MATMUL_PRECISIONS:
        raise ValueError(f"unknown matmul precision {value!r}; choose one of "
                         f"{', '.join(MATMUL_PRECISIONS)}")
    if value == "auto":
        return "highest" if backend == "cpu" else "default"
    return value


def set_matmul_precision(value: str) -> str:
    """Sets `jax_default_matmul_precision` to what `value` means on the
    default backend (`resolve_matmul_precision`). Returns what it set."""
    precision = resolve_matmul_precision(value, jax.default_backend())
    jax.config.update("jax_default_matmul_precision", precision)
    return precision


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
