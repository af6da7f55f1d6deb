"""Attention (models/layers.py): the implementation chosen per backend, and
`dot_attention` against the plain einsum maths it replaced (scores in
float32, masked to -1e30, softmax, probabilities in the values' dtype) on
random inputs: grouped-query heads, left padding (fully masked query rows),
prefix slots, ALiBi's bias, float32 and bfloat16, prefill and one-token
decoding, values and gradients.

Tolerances: float32 agrees to rounding (the two orders of summation differ,
~1e-6 of outputs of size ~1); bfloat16 to one bfloat16 ulp of the output
(2^-8 relative) where the probabilities are rounded at a different point.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_adapters.models import layers
from flax_adapters.models.layers import attention_implementation, dot_attention

NEG_INF = -1e30


def einsum_attention(q_btkgn, k_bskn, v_bskn, mask_bts, scale=None, bias=None, softcap=None):
    """The maths dot_attention had before jax.nn.dot_product_attention (and
    Gemma 2's soft-capped scores, cap * tanh(scores / cap), as transformers')."""
    scale = 1.0 / math.sqrt(q_btkgn.shape[-1]) if scale is None else scale
    scores = jnp.einsum("btkgn,bskn->bkgts", q_btkgn, k_bskn,
                        preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    if bias is not None:
        scores = scores + bias
    scores = jnp.where(mask_bts[:, None, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("bkgts,bskn->btkgn", probs.astype(v_bskn.dtype), v_bskn)


# ------------------------------------------------------------ the choice


BF16, F16, F32 = jnp.bfloat16, jnp.float16, jnp.float32


@pytest.mark.parametrize("args, want", [
    # (backend, dtype, head dim, q len, k len, has bias, compute capability)
    (("gpu", BF16, 64, 128, 128, False, "9.0"), "cudnn"),
    (("gpu", F16, 128, 256, 260, False, "8.0"), "cudnn"),
    (("gpu", BF16, 256, 128, 128, False, "9.0"), "cudnn"),  # Hopper: head dim up to 256
    (("gpu", BF16, 256, 128, 128, False, "8.6"), "xla"),
    (("gpu", BF16, 72, 128, 128, False, "8.0"), "cudnn"),
    (("gpu", BF16, 68, 128, 128, False, "9.0"), "xla"),    # not a multiple of 8
    (("gpu", F32, 64, 128, 128, False, "9.0"), "xla"),     # cuDNN's flash is 16-bit only
    (("gpu", BF16, 64, 128, 128, True, "9.0"), "xla"),     # ALiBi stays exact
    (("gpu", BF16, 64, 1, 128, False, "9.0"), "xla"),      # decoding: odd query length
    (("gpu", BF16, 64, 128, 129, False, "9.0"), "xla"),
    (("gpu", BF16, 64, 128, 128, False, "7.5"), "xla"),    # T4: before Ampere
    (("gpu", BF16, 64, 128, 128, False, "gfx90a"), "xla"),  # ROCm
    (("gpu", BF16, 64, 128, 128, False, None), "xla"),
    (("tpu", BF16, 64, 128, 128, False, None), "xla"),
    (("tpu", F32, 64, 128, 128, False, None), "xla"),
    (("cpu", BF16, 64, 128, 128, False, None), "xla"),
    (("cpu", F32, 64, 128, 128, True, None), "xla"),
])
def test_attention_implementation_per_backend(args, want):
    assert attention_implementation(*args) == want


def test_this_cpu_uses_xla():
    device = jax.devices()[0]
    assert attention_implementation(jax.default_backend(), BF16, 64, 128, 128, False,
                                    getattr(device, "compute_capability", None)) == "xla"


# ------------------------------------------------------------ the maths


def inputs(dtype, t, s, k=3, g=3, n=16, b=4, seed=0):
    """Random q/k/v; a causal mask over t queries at the last t of s slots,
    the first slots always visible (a prefix), rows left-padded by 0..b-1
    slots, and row 1's first query fully masked."""
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (b, t, k, g, n), jnp.float32).astype(dtype)
    k_ = jax.random.normal(kk, (b, s, k, n), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (b, s, k, n), jnp.float32).astype(dtype)
    prefix = 2
    valid_bs = (jnp.arange(s)[None] >= prefix + jnp.arange(b)[:, None]) | (
        jnp.arange(s)[None] < prefix)
    mask = layers.attention_mask(jnp.arange(s - t, s), valid_bs)
    if t > 1:
        mask = mask.at[1, 0].set(False)
    return q, k_, v, mask


def alibi(b, k, s):
    return layers.alibi_bias(layers.alibi_slopes(k), jnp.tile(jnp.arange(s), (b, 1)))


CASES = [  # (dtype, t, s, k, g, bias)
    (F32, 12, 14, 3, 3, False), (F32, 12, 14, 4, 1, True), (F32, 1, 14, 3, 3, False),
    (F32, 1, 14, 4, 1, True), (F32, 8, 8, 1, 4, False),
    (BF16, 12, 14, 3, 3, False), (BF16, 12, 14, 4, 1, True), (BF16, 1, 14, 3, 3, False),
    (BF16, 1, 14, 4, 1, True),
]


def tolerance(dtype):
    return dict(atol=2e-6, rtol=2e-6) if dtype == F32 else dict(atol=1e-2, rtol=2 ** -8)


@pytest.mark.parametrize("dtype, t, s, k, g, with_bias", CASES)
def test_dot_attention_equals_the_einsum_maths(dtype, t, s, k, g, with_bias):
    q, k_, v, mask = inputs(dtype, t, s, k, g)
    bias = alibi(q.shape[0], k, s) if with_bias else None
    got = jax.jit(dot_attention)(q, k_, v, mask, 0.3, bias)
    want = einsum_attention(q, k_, v, mask, 0.3, bias)
    assert got.dtype == want.dtype == dtype
    chex.assert_trees_all_close(got.astype(F32), want.astype(F32), **tolerance(dtype))


@pytest.mark.parametrize("dtype, t, s, k, g, with_bias",
                         [c for c in CASES if c[0] == F32])
def test_dot_attention_gradients_equal_the_einsum_maths(dtype, t, s, k, g, with_bias):
    q, k_, v, mask = inputs(dtype, t, s, k, g, seed=1)
    bias = alibi(q.shape[0], k, s) if with_bias else None
    w = jax.random.normal(jax.random.key(2), q.shape)

    def loss(fn):
        return jax.grad(lambda q, k_, v: jnp.sum(w * fn(q, k_, v, mask, None, bias)),
                        argnums=(0, 1, 2))
    chex.assert_trees_all_close(jax.jit(loss(dot_attention))(q, k_, v),
                                loss(einsum_attention)(q, k_, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_a_fully_masked_row_is_the_mean_of_the_values(dtype):
    """As with the -1e30 mask before: every slot equally weighted, finite
    (padded query rows are dropped by the loss, but a NaN would spread)."""
    q, k_, v, mask = inputs(dtype, 12, 14)
    out = dot_attention(q, k_, v, mask)
    assert bool(jnp.all(jnp.isfinite(out.astype(F32))))
    mean_kn = jnp.mean(v[1].astype(F32), axis=0)
    want = jnp.broadcast_to(mean_kn[:, None], out.shape[2:])
    chex.assert_trees_all_close(out[1, 0].astype(F32), want, **tolerance(dtype))


def test_decoding_off_cpu_takes_jax_attention(monkeypatch):
    """On GPU/TPU one query token goes through jax.nn.dot_product_attention
    (XLA's); its result equals the CPU's own decoding form."""
    q, k_, v, mask = inputs(F32, 1, 14)
    bias = alibi(q.shape[0], 3, 14)
    on_cpu = dot_attention(q, k_, v, mask, None, bias)
    calls = []
    real = jax.nn.dot_product_attention

    def spy(*a, **kw):
        calls.append(kw["implementation"])
        return real(*a, **kw)
    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    off_cpu = dot_attention(q, k_, v, mask, None, bias)
    assert calls == ["xla"]
    chex.assert_trees_all_close(off_cpu, on_cpu, atol=2e-6, rtol=2e-6)
    np.testing.assert_array_equal(np.isfinite(off_cpu), True)


@pytest.mark.parametrize("dtype, t, s, k, g, with_bias", [
    (F32, 12, 14, 3, 3, False), (F32, 1, 14, 4, 1, True), (BF16, 12, 14, 4, 1, True),
    (BF16, 1, 14, 3, 3, False)])
def test_soft_capped_attention_equals_the_einsum_maths(dtype, t, s, k, g, with_bias):
    """Gemma 2's soft-capping, prefill and one-token decoding: at scale 3 the
    scores reach past the cap of 2, so the tanh shows (uncapped: far off)."""
    q, k_, v, mask = inputs(dtype, t, s, k, g, seed=3)
    bias = alibi(q.shape[0], k, s) if with_bias else None
    got = jax.jit(dot_attention)(q, k_, v, mask, 3.0, bias, 2.0)
    want = einsum_attention(q, k_, v, mask, 3.0, bias, 2.0)
    assert got.dtype == want.dtype == dtype
    chex.assert_trees_all_close(got.astype(F32), want.astype(F32), **tolerance(dtype))
    uncapped = einsum_attention(q, k_, v, mask, 3.0, bias)
    assert float(jnp.abs(uncapped.astype(F32) - want.astype(F32)).max()) > 0.1


def test_soft_capping_never_reaches_jax_attention(monkeypatch):
    """jax.nn.dot_product_attention has no soft-capping (neither XLA's form
    nor cuDNN's): on a GPU, with 16-bit inputs cuDNN would take, soft-capped
    scores are computed by dot_attention itself."""
    q, k_, v, mask = inputs(BF16, 12, 14, seed=4)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax.nn, "dot_product_attention",
                        lambda *a, **kw: pytest.fail("soft-capped scores reached jax attention"))
    got = jax.jit(dot_attention)(q, k_, v, mask, None, None, 50.0)
    chex.assert_trees_all_close(got.astype(F32), einsum_attention(
        q, k_, v, mask, None, None, 50.0).astype(F32), **tolerance(BF16))
