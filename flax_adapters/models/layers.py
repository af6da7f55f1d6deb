"""Layers shared by the model families: linear, RMSNorm, LayerNorm, rotary
embeddings (half-split, GPT-J's interleaved, partial), ALiBi, masks and
grouped-query attention (the KV cache and the layer stack: decoder.py).

Axis legend: b batch, t query time, s key time, d model width, h query heads,
k kv heads, g query heads per kv head, n head dim, f MLP width, v vocab.

Every `Linear` is an adapter site: `adapters.sites.linear_in` may rewrite its
input and `adapters.sites.linear` its output, each applying whichever adapter
leaves sit beside the kernel (untouched, at no cost, when there are none).
Kernels are stored (in, out), i.e. the transpose of PyTorch's `weight`; a
kernel may be a quant.array.QuantizedArray (a quantized frozen base), which
`Linear` dequantizes inside its matmul, so every family built on `Linear`
takes quantized kernels.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flax_adapters.adapters import sites
from flax_adapters.models.config import RopeScaling
from flax_adapters.quant import array as qarray

Dtype = Any
NEG_INF = -1e30  # finite, so a fully masked (padding) row gives no NaN


class Linear(nn.Module):
    """y = x @ kernel (+ bias), then the adapter site.

    The site works on the rows of x flattened to 2-D, (b*t, in): the weight
    gradients of adapters (LoRA's A and B, bottlenecks) then contract over one
    dimension. Over (b, t) of a 3-D array, XLA:CPU first transposes both
    operands into a (features, b*t) layout, a copy of each activation per site
    (measured in commit 0d14344)."""

    features: int
    axes: tuple[str, str]
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    settings: sites.Settings = sites.Settings()

    @nn.compact
    def __call__(self, x_bti: jax.Array, deterministic: bool = True) -> jax.Array:
        kernel = qarray.param(
            self, "kernel", nn.with_logical_partitioning(nn.initializers.normal(0.02), self.axes),
            (x_bti.shape[-1], self.features), self.param_dtype)
        lead = x_bti.shape[:-1]
        x_ri = x_bti.reshape(-1, x_bti.shape[-1]).astype(self.dtype)
        x_in = sites.linear_in(self, x_ri, self.settings, deterministic)
        y_ro = qarray.matmul(x_in, kernel, self.dtype)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(
                nn.initializers.zeros, self.axes[1:]), (self.features,), self.param_dtype)
            y_ro = y_ro + bias.astype(self.dtype)
        y_ro = sites.linear(self, x_ri, y_ro, self.settings, deterministic)
        return y_ro.reshape(*lead, self.features)


class RMSNorm(nn.Module):
    eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        # As transformers: normalise in float32, cast back, then scale.
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * x32.astype(self.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> jax.Array:
    """Inverse frequencies (n/2,), with the 'linear' or 'llama3' scaling of transformers."""
    inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling is None:
        return inv
    if scaling.rope_type == "linear":
        return inv / scaling.factor
    # llama3: long wavelengths slowed by `factor`, short kept, smooth in between.
    old = scaling.original_max_position_embeddings
    low_wavelen = old / scaling.low_freq_factor
    high_wavelen = old / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > low_wavelen, inv / scaling.factor, inv)
    smooth = (old / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def apply_rope(x_btkn: jax.Array, positions_bt: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotary embedding in the half-split layout of transformers (rotate_half)."""
    freqs_btn = positions_bt.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs_btn, freqs_btn], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb).astype(x_btkn.dtype), jnp.sin(emb).astype(x_btkn.dtype)
    half = x_btkn.shape[-1] // 2
    rotated = jnp.concatenate([-x_btkn[..., half:], x_btkn[..., :half]], axis=-1)
    return x_btkn * cos + rotated * sin


def attention_mask(q_slots_t: jax.Array, key_valid_bs: jax.Array,
                   sliding_window: int | None = None) -> jax.Array:
    """Boolean (b, t, s) mask: key slot s is visible from query slot t if it
    is valid (not padding) and not in the future (and inside the window)."""
    s_slots = jnp.arange(key_valid_bs.shape[1])
    causal_ts = s_slots[None, :] <= q_slots_t[:, None]
    if sliding_window is not None:
        causal_ts &= s_slots[None, :] > q_slots_t[:, None] - sliding_window
    return causal_ts[None] & key_valid_bs[:, None, :].astype(bool)


def attention_implementation(backend: str, dtype: Dtype, head_dim: int, q_len: int,
                             k_len: int, has_bias: bool,
                             compute_capability: str | None = None) -> str:
    """The `implementation` of `jax.nn.dot_product_attention` for these
    shapes: 'cudnn' (cuDNN's fused flash attention: no (b, h, t, s) scores in
    memory) where it applies, else 'xla'.

    cuDNN needs a CUDA GPU of compute capability >= 8.0, 16-bit inputs and a
    head dim that is a multiple of 8, at most 128 (256 from Hopper, 9.0). Our
    mask reaches it as an additive bias, and with a bias its backward pass
    needs even query and key lengths. A scores bias (ALiBi's) keeps XLA: cuDNN
    would add it in the inputs' 16-bit dtype (bfloat16: up to |bias| / 256 off)."""
    if backend != "gpu" or has_bias or jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        return "xla"
    try:
        capability = tuple(int(c) for c in (compute_capability or "").split("."))
    except ValueError:  # ROCm's "gfx90a" and the like
        return "xla"
    if capability < (8, 0):
        return "xla"
    max_head_dim = 256 if capability >= (9, 0) else 128
    if head_dim % 8 or head_dim > max_head_dim or q_len % 2 or k_len % 2:
        return "xla"
    return "cudnn"


def dot_attention(q_btkgn: jax.Array, k_bskn: jax.Array, v_bskn: jax.Array,
                  mask_bts: jax.Array, scale: float | None = None,
                  bias: jax.Array | None = None, softcap: float | None = None) -> jax.Array:
    """Softmax attention, scores and softmax in float32. `scale` defaults to
    1 / sqrt(head dim); `bias` (broadcastable to the (b, k, g, t, s) scores,
    e.g. ALiBi's) is added before masking. `softcap` (Gemma 2) soft-caps the
    scaled scores to softcap * tanh(scores / softcap), before the bias and
    the mask, as transformers. A fully masked query row (left padding)
    attends uniformly to every slot: finite, and ignored downstream.

    Through `jax.nn.dot_product_attention`, cuDNN's flash attention where
    `attention_implementation` allows it (the backend is read at trace time),
    XLA's elsewhere; one-token decoding on CPU keeps its own form (below).
    Soft-capped scores are computed here on every backend (`_softcapped`):
    jax.nn.dot_product_attention has no soft-capping, neither as XLA nor as
    cuDNN."""
    b, t, k, g, n = q_btkgn.shape
    scale = 1.0 / math.sqrt(n) if scale is None else scale
    backend = jax.default_backend()
    if t == 1 and backend == "cpu":
        return _decode_attention_cpu(q_btkgn, k_bskn, v_bskn, mask_bts, scale, bias, softcap)
    if softcap is not None:
        return _softcapped(q_btkgn, k_bskn, v_bskn, mask_bts, scale, bias, softcap)
    if bias is not None:  # (b, k, g, t, s) -> (b, h, t, s), h = k * g as q's heads
        bias = jnp.reshape(bias, (1,) * (5 - bias.ndim) + bias.shape)
        if bias.shape[1:3] != (1, 1):
            bias = jnp.broadcast_to(bias, (bias.shape[0], k, g, *bias.shape[3:]))
        bias = bias.reshape(bias.shape[0], -1, *bias.shape[3:])
    dtype = jnp.result_type(q_btkgn, k_bskn, v_bskn)  # one dtype for all three, as einsum's
    capability = getattr(jax.devices()[0], "compute_capability", None)
    impl = attention_implementation(backend, dtype, n, t, k_bskn.shape[1], bias is not None,
                                    capability)
    out_bthn = jax.nn.dot_product_attention(
        q_btkgn.reshape(b, t, k * g, n).astype(dtype), k_bskn.astype(dtype),
        v_bskn.astype(dtype), bias, mask_bts[:, None], scale=scale, implementation=impl)
    return out_bthn.reshape(b, t, k, g, n)


def _softcapped(q_btkgn: jax.Array, k_bskn: jax.Array, v_bskn: jax.Array, mask_bts: jax.Array,
               scale: float, bias: jax.Array | None, softcap: float) -> jax.Array:
    """dot_attention with soft-capped scores, in the operations of
    jax.nn.dot_product_attention's XLA form (scores accumulated in float32
    from the inputs' dtype, float32 softmax, probabilities in the values'
    dtype), with the kv heads grouped rather than repeated."""
    dtype = jnp.result_type(q_btkgn, k_bskn, v_bskn)
    scores = jnp.einsum("btkgn,bskn->bkgts", q_btkgn.astype(dtype), k_bskn.astype(dtype),
                        preferred_element_type=jnp.float32) * scale
    scores = jnp.tanh(scores / softcap) * softcap
    if bias is not None:
        scores = scores + bias
    scores = jnp.where(mask_bts[:, None, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    return jnp.einsum("bkgts,bskn->btkgn", probs, v_bskn.astype(dtype))


def _decode_attention_cpu(q_btkgn: jax.Array, k_bskn: jax.Array, v_bskn: jax.Array,
                          mask_bts: jax.Array, scale: float, bias: jax.Array | None,
                          softcap: float | None = None) -> jax.Array:
    """Cached decoding (t = 1) on XLA:CPU: products summed in place read the
    cache in its (b, s, k, n) layout. As dots, XLA:CPU copies the whole K and
    V cache transposed at every step (SmolLM2, batch 16, ~480 slots: 260 ->
    153 ms)."""
    q_bkgn = q_btkgn[:, 0].astype(jnp.float32)
    s_bskg = jnp.sum(q_bkgn[:, None] * k_bskn[:, :, :, None].astype(jnp.float32), axis=-1)
    scores = jnp.transpose(s_bskg, (0, 2, 3, 1))[:, :, :, None] * scale
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    if bias is not None:
        scores = scores + bias
    scores = jnp.where(mask_bts[:, None, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1)
    p_bskg = jnp.transpose(probs[:, :, :, 0], (0, 3, 1, 2))
    out_bkgn = jnp.sum(p_bskg[..., None] * v_bskn[:, :, :, None].astype(jnp.float32), axis=1)
    return out_bkgn[:, None].astype(v_bskn.dtype)


class LayerNorm(nn.Module):
    """torch.nn.LayerNorm: (x - mean) / sqrt(biased var + eps) * scale + bias,
    computed in float32 (as torch's kernel does for half inputs) and cast
    back. `use_scale=False, use_bias=False` is `elementwise_affine=False`."""

    eps: float = 1e-5
    use_scale: bool = True
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        if self.use_scale:
            y = y * self.param("scale", nn.with_logical_partitioning(
                nn.initializers.ones, ("norm",)), (d,), self.param_dtype).astype(jnp.float32)
        if self.use_bias:
            y = y + self.param("bias", nn.with_logical_partitioning(
                nn.initializers.zeros, ("norm",)), (d,), self.param_dtype).astype(jnp.float32)
        return y.astype(self.dtype)


def apply_rope_interleaved(x_btkn: jax.Array, positions_bt: jax.Array,
                           inv_freq: jax.Array) -> jax.Array:
    """Rotary embedding in GPT-J's interleaved layout (rotate_every_two):
    dimensions (2i, 2i+1) rotate together by positions * inv_freq[i]."""
    freqs_btn = positions_bt.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.repeat(freqs_btn, 2, axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb).astype(x_btkn.dtype), jnp.sin(emb).astype(x_btkn.dtype)
    pairs = x_btkn.reshape(*x_btkn.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x_btkn.shape)
    return x_btkn * cos + rotated * sin


def apply_partial_rope(x_btkn: jax.Array, positions_bt: jax.Array, inv_freq: jax.Array,
                       rope=apply_rope) -> jax.Array:
    """`rope` on the first 2 * len(inv_freq) dimensions of each head; the rest
    pass through (GPT-J's rotary_dim, GPT-NeoX's rotary_pct)."""
    rotary = 2 * inv_freq.shape[0]
    if rotary == x_btkn.shape[-1]:
        return rope(x_btkn, positions_bt, inv_freq)
    return jnp.concatenate([rope(x_btkn[..., :rotary], positions_bt, inv_freq),
                            x_btkn[..., rotary:]], axis=-1)


def alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi's per-head slopes (Press et al. 2021) as BLOOM computes them, in
    float32: a geometric sequence for the largest power of two <= heads, the
    odd powers of the next one's base for the remaining heads."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = np.float32(2 ** (-(2 ** -(math.log2(closest) - 3))))
    slopes = base ** np.arange(1, 1 + closest, dtype=np.float32)
    if closest != num_heads:
        extra = np.float32(2 ** (-(2 ** -(math.log2(2 * closest) - 3))))
        rest = min(closest, num_heads - closest)
        slopes = np.concatenate([slopes, extra ** np.arange(1, 1 + 2 * rest, 2,
                                                            dtype=np.float32)])
    return slopes.astype(np.float32)


def alibi_bias(slopes_h: np.ndarray, key_positions_bs: jax.Array) -> jax.Array:
    """(b, h, 1, 1, s) float32 scores bias slope_h * key position, laid out for
    `dot_attention`'s (b, k, g, t, s) scores with k = h, g = 1. Only key
    positions enter: softmax ignores a per-row constant, so this equals the
    causal slope_h * (key - query) form (transformers' build_alibi_tensor)."""
    bias_bhs = jnp.asarray(slopes_h)[None, :, None] * key_positions_bs.astype(
        jnp.float32)[:, None, :]
    return bias_bhs[:, :, None, None, :]


def key_positions(key_valid_bs: jax.Array) -> jax.Array:
    """Each key slot's index among its row's valid slots (0 at invalid slots),
    as transformers numbers ALiBi keys: (cumsum(mask) - 1) * mask."""
    valid = key_valid_bs.astype(jnp.int32)
    return (jnp.cumsum(valid, axis=1) - 1) * valid
