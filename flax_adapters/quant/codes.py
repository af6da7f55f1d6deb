"""The code books of weight quantization and exact nearest-code rounding.

NF4 is the 4-bit NormalFloat of QLoRA (Dettmers et al. 2023,
arXiv:2305.14314, sec. 3): the 16 values bitsandbytes uses
(`create_normal_map(offset=0.9677083)`: 8 positive and 7 negative quantiles
of N(0, 1), and an exact zero, scaled to [-1, 1]); the tests re-derive them
from the normal quantiles. DYNAMIC is bitsandbytes' signed 8-bit dynamic
tree code (`create_dynamic_map(signed=True)`, Dettmers 2016,
arXiv:1511.04561), which QLoRA's double quantization uses for the blockwise
absmax constants; it is rebuilt here with float32 arithmetic exactly as
bitsandbytes builds it with torch (the tests compare the two).

Rounding is to the nearest code value, ties to the lower one, computed
exactly: `nearest(x)` counts the thresholds below x, where each threshold is
the float32 just below the exact midpoint of two neighbouring codes (or the
midpoint itself when float32 holds it). So `x > threshold` is true exactly
when x is nearer the upper code, with no float rounding in the comparison.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)


def _torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace(start, end, steps, dtype=float32) on CPU: a float32 step,
    each value computed in float64 from the nearer end, then rounded."""
    a, b = np.float32(start), np.float32(end)
    step = np.float64((b - a) / np.float32(steps - 1))
    i = np.arange(steps)
    return np.where(i < steps // 2, np.float64(a) + step * i,
                    np.float64(b) - step * (steps - 1 - i)).astype(np.float32)


def _dynamic_map() -> np.ndarray:
    """bitsandbytes' create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)."""
    data = [np.float32(0.0), np.float32(1.0)]
    for i in range(7):
        bounds = _torch_linspace(0.1, 1.0, 2 ** i + 1)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2)
        values = np.float32(10.0 ** (i - 6)) * means  # float32, as torch multiplies
        data += list(values) + list(-values)
    return np.sort(np.array(data, np.float32))


DYNAMIC = _dynamic_map()


def thresholds(code: np.ndarray) -> np.ndarray:
    """Float32 decision thresholds of a sorted code (see the module docstring)."""
    c = code.astype(np.float64)
    mid = (c[:-1] + c[1:]) / 2  # exact in float64
    t = mid.astype(np.float32)
    t = np.where(t.astype(np.float64) > mid, np.nextafter(t, np.float32(-np.inf)), t)
    return t.astype(np.float32)


_NF4_T = thresholds(NF4)
_DYNAMIC_T = thresholds(DYNAMIC)


def nearest(x_f32: jnp.ndarray, code: str) -> jnp.ndarray:
    """uint8 index of the nearest value of code 'nf4' or 'dynamic' (ties low)."""
    t = jnp.asarray(_NF4_T if code == "nf4" else _DYNAMIC_T)
    return jnp.searchsorted(t, x_f32, side="left").astype(jnp.uint8)


def values(code: str) -> jnp.ndarray:
    return jnp.asarray(NF4 if code == "nf4" else DYNAMIC)
