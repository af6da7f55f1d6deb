"""Quantizing a weight straight into its sharding: `quantize_sharded`.

The result is bit for bit `array.quantize` of the whole weight, but no
device ever holds the whole weight or a whole child of the QuantizedArray
that its sharding splits: each device computes its own shard of the codes
(and of the absmax values) from the slice of the weight it needs, which
`read(index)` returns from the host (e.g. a memory-mapped checkpoint).

What a shard needs beyond its own slice:

    nf4 codes    the blocks that its rows of packed codes fall in (a shard
                 boundary inside a block widens the slice to the block);
                 blocks are independent, so that is exact.
    int8 codes   the absmax of each of its columns over the whole
                 contraction axis, which a sharded axis 0 splits.
    double quant the offset, a mean over every block absmax of the weight,
                 and the absmax2 of each 256-group of them, groups that
                 straddle shards.

So the host first reads the weight once, in chunks of at most
`array.CHUNK` values, for the float32 absmax per block (int8: per column):
max |w| is exact in any order, so this equals the absmax the whole-tensor
path computes. The double-quantization statistics (absmax2, offset) are then
computed from those (1/block_size of the weight's values, float32, on one
device) by the same code as `array.quantize`'s, and each device quantizes
its slice of the absmax values elementwise. Elementwise float32 ops are exact, so every
child is identical to the whole-tensor result (tests/test_sharded_loading.py).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

from flax_adapters.quant.array import (CHUNK, DQ_BLOCK, QuantizedArray, double_quant_codes,
                                       double_quant_stats, int8_codes, nf4_blocks)
from flax_adapters.sharding import assemble

Reader = Callable[[tuple], np.ndarray]  # index (a tuple of slices) -> that slice of w, on host


def host_absmax(read: Reader, shape: tuple[int, ...], kind: str, axis: int,
                block_size: int) -> np.ndarray:
    """float32 absmax of the weight `read` slices, on the host: per block of
    `block_size` along `axis` (nf4, shaped like `nf4_blocks`' absmax), or per
    slice along `axis` (int8, keepdims). Read in chunks along another axis."""
    other = next((i for i in range(len(shape)) if i != axis), None)
    size = int(np.prod(shape))
    count = 1 if other is None else shape[other]
    step = count if size <= CHUNK else max(1, CHUNK // (size // count))
    parts = []
    for start in range(0, count, step):
        index = [slice(None)] * len(shape)
        if other is not None:
            index[other] = slice(start, start + step)
        a = np.abs(np.asarray(read(tuple(index)), np.float32))
        if kind == "int8":
            parts.append(a.max(axis=axis, keepdims=True))
            continue
        pad = -shape[axis] % block_size
        a = np.pad(a, [(0, pad) if d == axis else (0, 0) for d in range(a.ndim)])
        nb = a.shape[axis] // block_size
        parts.append(a.reshape(a.shape[:axis] + (nb, block_size) + a.shape[axis + 1:])
                     .max(axis=axis + 1))
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=other)


def _put(host: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    return assemble(host.shape, sharding, lambda index, device: jax.device_put(host[index],
                                                                               device))


def quantize_sharded(read: Reader, shape: tuple[int, ...], kind: str, axis: int,
                     block_size: int, double_quant: bool, dtype: Any,
                     shardings: QuantizedArray) -> QuantizedArray:
    """`array.quantize(w, kind, axis, block_size, double_quant, dtype)` of the
    weight `w` of `shape` that `read(index)` slices, each child laid out by
    the matching child of `shardings` (a QuantizedArray of Shardings, as
    `sharding.tree_shardings` of `array.axes` gives)."""
    shape, axis = tuple(shape), axis % len(shape)
    dtype = str(np.dtype(dtype)) if not isinstance(dtype, str) else dtype
    absmax = host_absmax(read, shape, kind, axis, block_size)
    if kind == "int8":
        def codes(index, device):
            columns = tuple(slice(0, 1) if d == axis else s for d, s in enumerate(index))
            return int8_codes(jax.device_put(read(index), device),
                              jax.device_put(absmax[columns], device))
        return QuantizedArray(assemble(shape, shardings.codes, codes),
                              _put(absmax, shardings.absmax), kind="int8", shape=shape,
                              axis=axis, block_size=shape[axis], dtype=dtype)

    n = shape[axis]
    packed_shape = shape[:axis] + ((n + -n % block_size) // 2,) + shape[axis + 1:]

    def nf4_codes(index, device):
        r0, r1, _ = index[axis].indices(packed_shape[axis])
        # Packed row r holds values 2r, 2r + 1; widen to whole blocks.
        v0, v1 = 2 * r0 // block_size * block_size, -(-2 * r1 // block_size) * block_size
        src = tuple(slice(v0, min(v1, n)) if d == axis else s for d, s in enumerate(index))
        x = np.asarray(read(src))
        if x.shape[axis] < v1 - v0:  # the zero padding past the weight's end
            x = np.pad(x, [(0, v1 - v0 - x.shape[axis]) if d == axis else (0, 0)
                           for d in range(x.ndim)])
        packed, _ = nf4_blocks(jax.device_put(x, device), axis, block_size)
        return jax.lax.slice_in_dim(packed, r0 - v0 // 2, r1 - v0 // 2, axis=axis)

    codes = assemble(packed_shape, shardings.codes, nf4_codes)
    meta = dict(kind="nf4", shape=shape, axis=axis, block_size=block_size, dtype=dtype)
    if not double_quant:
        return QuantizedArray(codes, _put(absmax, shardings.absmax), **meta)
    # The statistics of all blocks, on one device: float32, 1/block_size of the
    # weight's values (the one buffer here not cut by the sharding).
    absmax2, offset = (np.asarray(v) for v in double_quant_stats(absmax, axis))
    moved = np.moveaxis(absmax, axis, -1)  # bitsandbytes' order, as array._double_quant
    group = np.moveaxis(np.arange(moved.size).reshape(moved.shape) // DQ_BLOCK, -1, axis)

    def dq_codes(index, device):
        return double_quant_codes(jax.device_put(absmax[index], device),
                                  jax.device_put(offset, device),
                                  jax.device_put(absmax2[group[index]], device))
    return QuantizedArray(codes, assemble(absmax.shape, shardings.absmax, dq_codes),
                          _put(absmax2, shardings.absmax2), _put(offset, shardings.offset),
                          **meta)
