"""A quantized weight: `QuantizedArray`, weight-only int8 and NF4 with
optional double quantization, and the ops the model runs on it.

    int8  per-channel absmax (the weight-only half of LLM.int8(), Dettmers
          et al. 2022, arXiv:2208.07339): one absmax per slice along `axis`
          (the contraction axis, so one per output channel of a kernel);
          codes = round(w / (absmax / 127)), int8 in [-127, 127].
    nf4   QLoRA (Dettmers et al. 2023, arXiv:2305.14314) as bitsandbytes
          stores it: blocks of `block_size` consecutive values along `axis`,
          absmax per block, codes = the nearest NF4 value of w / absmax
          (codes.py), two 4-bit codes per uint8 (the first of a pair in the
          high nibble, as bitsandbytes packs them). Double quantization
          (QLoRA sec. 3, bitsandbytes `compress_statistics`): the float32
          absmax values, minus their mean, quantized again with the 8-bit
          dynamic code in blocks of 256.

bitsandbytes blocks the flattened PyTorch tensor, i.e. runs along the
input axis of a (out, in) weight -- our axis 0 of the (in, out) kernel --
so when `block_size` divides the blocked axis (every common model at 64)
the blocks, absmax values and double-quantization groups are bitsandbytes'
own, and so are the codes up to float rounding of a value on a decision
boundary (its kernels multiply by 1/absmax and compare against float
midpoints; we divide and round exactly to the nearest code). Otherwise we
zero-pad each row of blocks (bitsandbytes lets a block straddle two rows).

Layout, for a kernel W (in, out) quantized along axis 0 with block B (the
blocked axis is zero-padded up to a multiple of B, `n_pad`):

    codes   nf4: uint8 (n_pad / 2, out)   int8: int8 (in, out)
    absmax  float32 (n_pad / B, out)      int8: float32 (1, out)
            double quant: uint8 codes of (absmax - offset), same shape
    absmax2 double quant: float32 (ceil(absmax.size / 256),)
    offset  double quant: float32 ()

Why a registered pytree and not several plain leaves beside `kernel`: the
tree keeps its shape -- a site still holds one `kernel`, so split/combine
(leaf names), targeting and every adapter's `.shape` reads see the same
tree as for a float base -- while every array in it is an ordinary pytree
leaf, so jit, device_put, eval_shape and orbax handle it unchanged. Its
static fields (kind, logical shape, axis, block size, original dtype) are
pytree metadata: no shape has to be re-derived, and two trees of the same
quantized model have equal structure. Every child keeps the float
array's rank and axis order, so it shards with the same logical axes as
the float kernel (`axes`): the packed axis follows the kernel's.

Dequantization happens inside the jitted computation that uses the weight
(`matmul`, `apply`, `take`), under `jax.checkpoint`: the full-precision
weight is a temporary of that one op, and the backward pass recomputes it
from the packed codes instead of keeping it alive between the passes.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from flax_adapters.quant import codes as codebook

KINDS = ("nf4", "int8")
DQ_BLOCK = 256  # bitsandbytes' block for the second quantization


@dataclasses.dataclass(frozen=True)
class QuantizedArray:
    codes: Any
    absmax: Any
    absmax2: Any = None
    offset: Any = None
    kind: str = "nf4"
    shape: tuple[int, ...] = ()
    axis: int = 0
    block_size: int = 64
    dtype: str = "float32"  # what it was quantized from; `dequantize`'s default

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None

    @property
    def nbytes(self) -> int:
        return stored_bytes(self)


jax.tree_util.register_dataclass(
    QuantizedArray, data_fields=["codes", "absmax", "absmax2", "offset"],
    meta_fields=["kind", "shape", "axis", "block_size", "dtype"])


def is_quantized(x: Any) -> bool:
    return isinstance(x, QuantizedArray)


def quantized_leaves(tree: Any) -> list[str]:
    """Paths ('a/b/kernel') of the quantized leaves of `tree`."""
    return ["/".join(str(getattr(k, "key", k)) for k in path) for path, leaf in
            jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_quantized)[0]
            if is_quantized(leaf)]


def stored_bytes(tree: Any) -> int:
    """Exact bytes of every array of `tree` (arrays, ShapeDtypeStructs, quantized or not)."""
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
               for x in jax.tree_util.tree_leaves(tree))


# ----------------------------------------------------------------------------- quantize

def _safe(absmax: jax.Array) -> jax.Array:
    # An all-zero block: any divisor gives code 0 (nf4: the code of 0.0), and
    # dequantization multiplies by the stored absmax 0 again.
    return jnp.where(absmax > 0, absmax, 1.0)


def _blocked(shape: tuple[int, ...], axis: int, nb: int, b: int) -> tuple[int, ...]:
    """`shape` with dimension `axis` split into (nb blocks, b values)."""
    return shape[:axis] + (nb, b) + shape[axis + 1:]


def _with(shape: tuple[int, ...], axis: int, n: int) -> tuple[int, ...]:
    return shape[:axis] + (n,) + shape[axis + 1:]


def quantize(w: Any, kind: str = "nf4", axis: int = 0, block_size: int = 64,
             double_quant: bool = True, dtype: Any = None) -> QuantizedArray:
    """`w` (a float array) quantized along `axis` (see the module docstring).
    `block_size` and `double_quant` apply to nf4; int8 has one absmax per slice.
    `dtype` (default: w's) is what `dequantize` returns by default."""
    if kind not in KINDS:
        raise ValueError(f"unknown quantization {kind!r}; choose one of {', '.join(KINDS)}")
    if kind == "nf4" and (block_size < 2 or block_size % 2):
        raise ValueError(f"NF4 block_size must be even and >= 2 (two codes per byte), "
                         f"got {block_size}")
    shape = tuple(int(d) for d in np.shape(w))
    if len(shape) < 1:
        raise ValueError("cannot quantize a scalar")
    axis = axis % len(shape)
    dtype = str(jnp.dtype(w.dtype if dtype is None else dtype))
    parts, other = _slices(w, shape, axis)
    if kind == "int8":
        q, absmax = _concat([_int8(p, axis) for p in parts], other)
        return QuantizedArray(q, absmax, kind="int8", shape=shape, axis=axis,
                              block_size=shape[axis], dtype=dtype)
    q, absmax = _concat([nf4_blocks(p, axis, block_size) for p in parts], other)
    absmax2 = offset = None
    if double_quant:
        absmax, absmax2, offset = _double_quant(absmax, axis)
    return QuantizedArray(q, absmax, absmax2, offset, kind="nf4", shape=shape, axis=axis,
                          block_size=block_size, dtype=dtype)


CHUNK = 1 << 22  # values per quantization call (16 MB of float32)


def _slices(w: Any, shape: tuple[int, ...], axis: int) -> tuple[list, int | None]:
    """`w` cut along its first other axis into pieces of at most CHUNK values
    (blocks run along `axis`, so none is cut): the float32 temporaries of a
    49152 x 576 embedding would otherwise be several times the weight."""
    other = next((i for i in range(len(shape)) if i != axis), None)
    size = int(np.prod(shape))
    if other is None or size <= CHUNK:
        return [w], other
    step = max(1, CHUNK // (size // shape[other]))
    return [w[(slice(None),) * other + (slice(i, i + step),)]
            for i in range(0, shape[other], step)], other


def _concat(parts: list[tuple], axis: int | None) -> tuple:
    if len(parts) == 1:
        return parts[0]
    return tuple(jnp.concatenate(xs, axis=axis) for xs in zip(*parts))


@functools.partial(jax.jit, static_argnums=1)
def _int8(w, axis):
    w = w.astype(jnp.float32)
    absmax = jnp.max(jnp.abs(w), axis=axis, keepdims=True)
    return _int8_q(w, absmax), absmax


def _int8_q(w_f32, absmax):
    return jnp.clip(jnp.round(w_f32 / (_safe(absmax) / 127.0)), -127, 127).astype(jnp.int8)


@jax.jit
def int8_codes(w: jax.Array, absmax: jax.Array) -> jax.Array:
    """The int8 codes of `w` given its absmax (broadcast against `w`): the
    codes of `quantize(..., kind="int8")` for a slice of the weight whose
    absmax was found over the whole contraction axis (quant/sharded.py)."""
    return _int8_q(w.astype(jnp.float32), absmax)


@functools.partial(jax.jit, static_argnums=(1, 2))
def nf4_blocks(w: jax.Array, axis: int, block: int) -> tuple[jax.Array, jax.Array]:
    """(packed uint8 codes, float32 absmax per block) of `w`, blocked along
    `axis` and zero-padded there to a multiple of `block`. Blocks are
    independent, so a block-aligned slice of a weight gives exactly the
    matching slice of the whole weight's codes (quant/sharded.py)."""
    w = w.astype(jnp.float32)
    n = w.shape[axis]
    pad = -n % block
    w = jnp.pad(w, [(0, pad) if i == axis else (0, 0) for i in range(w.ndim)])
    padded, nb = w.shape, (n + pad) // block
    w_blocks = w.reshape(_blocked(padded, axis, nb, block))
    absmax = jnp.max(jnp.abs(w_blocks), axis=axis + 1)
    idx = codebook.nearest(w_blocks / jnp.expand_dims(_safe(absmax), axis + 1), "nf4")
    pairs = idx.reshape(_blocked(padded, axis, (n + pad) // 2, 2))
    packed = (jnp.take(pairs, 0, axis=axis + 1) << 4) | jnp.take(pairs, 1, axis=axis + 1)
    return packed, absmax


@functools.partial(jax.jit, static_argnums=1)
def _double_quant(absmax, axis):
    """(uint8 codes of absmax - offset, absmax2 per 256-block, offset), as
    bitsandbytes' quantize_4bit(compress_statistics=True). The absmax values
    are taken in bitsandbytes' order -- the blocked axis last, as the blocks
    lie in the flattened PyTorch tensor -- so the 256-blocks group the same
    values."""
    moved = jnp.moveaxis(absmax, axis, -1)
    flat = moved.reshape(-1)
    blocks, absmax2, offset = _dq_statistics(flat)
    q = _dq_q(blocks, absmax2[:, None])
    q = q.reshape(-1)[:flat.size].reshape(moved.shape)
    return jnp.moveaxis(q, -1, axis), absmax2, offset


def _dq_statistics(flat):
    offset = jnp.mean(flat)
    centred = flat - offset
    pad = -centred.size % DQ_BLOCK
    blocks = jnp.pad(centred, (0, pad)).reshape(-1, DQ_BLOCK)
    return blocks, jnp.max(jnp.abs(blocks), axis=1), offset


def _dq_q(centred, absmax2):
    return codebook.nearest(centred / _safe(absmax2), "dynamic")


@functools.partial(jax.jit, static_argnums=1)
def double_quant_stats(absmax: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """(absmax2, offset) of the double quantization of the float32 block
    `absmax` of a weight blocked along `axis`: `_double_quant`'s own steps
    (the mean's float32 summation order, which XLA picks from the whole
    computation, is then the same, so the offset is bit for bit its)."""
    _, absmax2, offset = _dq_statistics(jnp.moveaxis(absmax, axis, -1).reshape(-1))
    return absmax2, offset


@jax.jit
def double_quant_codes(absmax: jax.Array, offset: jax.Array, absmax2: jax.Array) -> jax.Array:
    """uint8 codes of block absmax values given the whole weight's `offset`
    and, per value, the absmax2 of its 256-group (same shape as `absmax`)."""
    return _dq_q(absmax - offset, absmax2)


# ----------------------------------------------------------------------------- dequantize

def block_absmax(q: QuantizedArray) -> jax.Array:
    """The float32 absmax per block (undoing the double quantization)."""
    if not q.double_quant:
        return q.absmax
    moved = jnp.moveaxis(q.absmax, q.axis, -1)  # bitsandbytes' order (_double_quant)
    flat = moved.reshape(-1)
    pad = q.absmax2.shape[0] * DQ_BLOCK - flat.size
    blocks = codebook.values("dynamic")[jnp.pad(flat, (0, pad))].reshape(-1, DQ_BLOCK)
    values = (blocks * q.absmax2[:, None]).reshape(-1)[:flat.size].reshape(moved.shape)
    return jnp.moveaxis(values, -1, q.axis) + q.offset


def dequantize(q: QuantizedArray, dtype: Any = None) -> jax.Array:
    """The float array `q` stands for, in `dtype` (default: the dtype it was
    quantized from). Computed in float32, then cast."""
    dtype = q.dtype if dtype is None else dtype
    absmax = block_absmax(q)
    if q.kind == "int8":
        return (q.codes.astype(jnp.float32) * (absmax / 127.0)).astype(dtype)
    axis, n, b = q.axis, q.shape[q.axis], q.block_size
    nb = absmax.shape[axis]
    padded = _with(q.shape, axis, nb * b)
    # Unpack: byte k holds codes 2k (high nibble) and 2k + 1 (low nibble).
    idx = jnp.stack([q.codes >> 4, q.codes & 0xF], axis=axis + 1).reshape(padded)
    w = codebook.values("nf4")[idx].reshape(_blocked(padded, axis, nb, b))
    w = (w * jnp.expand_dims(absmax, axis + 1)).reshape(padded)
    return jax.lax.slice_in_dim(w, 0, n, axis=axis).astype(dtype)


def as_float(w: Any, dtype: Any) -> jax.Array:
    """`w` in `dtype`: a float array cast, a quantized one dequantized."""
    return dequantize(w, dtype) if is_quantized(w) else jnp.asarray(w).astype(dtype)


# ----------------------------------------------------------------------------- model ops

def param(mdl: Any, name: str, init_fn: Callable, shape: tuple[int, ...], dtype: Any) -> Any:
    """`mdl.param(name, init_fn, shape, dtype)` of a flax module, except that a
    QuantizedArray stored under `name` is returned as it is (flax's own check
    would compare its packed leaves with the float shape and fail)."""
    if mdl.has_variable("params", name):
        value = mdl.get_variable("params", name)
        if is_quantized(value):
            if value.shape != tuple(shape):
                raise ValueError(f"{mdl.name}/{name}: the quantized weight has shape "
                                 f"{value.shape}, but the model expects {tuple(shape)}")
            return value
    return mdl.param(name, init_fn, shape, dtype)


def apply(fn: Callable[[jax.Array, jax.Array], jax.Array], x: jax.Array, w: Any,
          dtype: Any) -> jax.Array:
    """fn(x, w in `dtype`). A quantized `w` is dequantized inside a
    `jax.checkpoint`, so its float copy lives only for this op (forward) and
    is recomputed from the codes for the backward pass, never stored."""
    if not is_quantized(w):
        return fn(x, jnp.asarray(w).astype(dtype))
    return jax.checkpoint(lambda x_, w_: fn(x_, dequantize(w_, dtype)))(x, w)


def matmul(x: jax.Array, w: Any, dtype: Any) -> jax.Array:
    """x @ w, `w` a float or quantized (in, out) kernel."""
    return apply(jnp.matmul, x, w, dtype)


def take(w: Any, ids: jax.Array, dtype: Any) -> jax.Array:
    """Rows `ids` of a (v, d) table in `dtype`: an embedding lookup. A
    quantized table dequantizes only the gathered rows."""
    if not is_quantized(w):
        return jnp.take(w, ids, axis=0).astype(dtype)
    if w.axis == 0:
        raise ValueError("take() gathers rows, but this table is quantized along its rows "
                         "(axis 0); quantize embedding tables along axis 1")
    rows = QuantizedArray(jnp.take(w.codes, ids, axis=0), jnp.take(block_absmax(w), ids, axis=0),
                          kind=w.kind, shape=tuple(ids.shape) + w.shape[1:],
                          axis=ids.ndim + w.axis - 1, block_size=w.block_size, dtype=w.dtype)
    return dequantize(rows, dtype)


# ----------------------------------------------------------------------------- sharding

def axes(w: Any, names: tuple) -> Any:
    """The logical axes of `w`'s arrays, from the float array's `names`: for a
    quantized `w`, a QuantizedArray whose children are axis tuples. codes and
    absmax keep the array's rank and axis order, so they take `names` (a
    blocked dimension that a mesh axis does not divide is replicated by
    sharding.spec_for); the double-quantization statistics are small and
    replicated."""
    if not is_quantized(w):
        return names
    return dataclasses.replace(w, codes=names, absmax=names,
                               absmax2=None if w.absmax2 is None else (None,),
                               offset=None if w.offset is None else ())
