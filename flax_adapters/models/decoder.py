"""The causal-LM skeleton every family shares: the KV cache, the inputs
(default positions, token lookup, the prompt site, the attention mask), the
attention core (cache update, the prefix site, softmax attention), the stack
of layers and the output head.

Each family's model (llama.py, bloom.py, opt.py, gptj.py, gpt_neox.py,
gemma.py) reads like its transformers modeling file and calls these for the
parts that do not differ between families. They take the calling module
`mdl` and create parameters and submodules in its scope, as the adapter
sites do.

Axis legend: b batch, t new tokens, s key slots, d model, k kv heads,
g query heads per kv head, n head dim, v vocab, p prefix slots.

KV cache: an explicit pytree passed in and returned, with a boolean `valid`
per slot so left padding and prefixes mask correctly:

    {'layers_i': {'k': (b, s, k, n), 'v': (b, s, k, n)}, 'valid': (b, s) bool,
     'index': () int32 -- the next slot to write}
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_adapters import sharding
from flax_adapters.adapters import sites
from flax_adapters.models.layers import attention_mask, dot_attention
from flax_adapters.quant import array as qarray

Dtype = Any
Cache = dict[str, Any]


def init_cache(cfg: Any, batch: int, max_len: int, dtype: Dtype = jnp.float32) -> Cache:
    """An empty KV cache with `max_len` slots per sequence for any family's
    config (it needs num_hidden_layers, num_key_value_heads, head_dim)."""
    shape = (batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
    cache: Cache = {f"layers_{i}": {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
                    for i in range(cfg.num_hidden_layers)}
    cache["valid"] = jnp.zeros((batch, max_len), bool)
    cache["index"] = jnp.zeros((), jnp.int32)
    return cache


def token_embedding(mdl: nn.Module, vocab: int, width: int) -> Any:
    """The (v, d) `embed_tokens` parameter of `mdl` (an array, or a
    QuantizedArray that `embed_inputs` and `output_logits` read through
    quant/array.py, dequantizing only what each op needs)."""
    return qarray.param(mdl, "embed_tokens", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), ("vocab", "embed")), (vocab, width), mdl.param_dtype)


class Inputs(NamedTuple):
    """What the layers see, after the prompt site (sites.embed)."""

    h_btd: jax.Array  # input embeddings, a prompt's P virtual tokens first
    positions_bt: jax.Array  # each row's token positions (virtual tokens included)
    mask_bts: jax.Array  # which key slot each query sees
    key_valid_bs: jax.Array  # which key slots hold a token (the cache's, updated)
    index: jax.Array  # the first cache slot these tokens take
    n_virtual: int  # prepended virtual tokens (their outputs are dropped)
    cache: Cache | None  # the cache, grown by the prompt's slots on its first call


def embed_inputs(mdl: nn.Module, embedding_vd: jax.Array, tokens_bt: jax.Array,
                 valid_bt: jax.Array | None, positions_bt: jax.Array | None,
                 cache: Cache | None, sliding_window: int | None = None,
                 embed_scale: float | None = None) -> Inputs:
    """Token lookup, default validity and positions, the prompt site, the mask.

    valid_bt defaults to all True; positions_bt by default count the row's
    valid tokens (left padding safe), continuing from the cache (a cached
    prompt's virtual tokens excluded: sites.embed adds them back).
    `embed_scale` multiplies the looked-up embeddings, cast to the compute
    dtype first (Gemma's sqrt(d)), before the prompt site: as in PEFT, whose
    virtual tokens enter as inputs_embeds past the scaled embedding module."""
    b, t = tokens_bt.shape
    valid_bt = jnp.ones((b, t), bool) if valid_bt is None else valid_bt.astype(bool)
    if positions_bt is None:
        past_bt = 0 if cache is None else (jnp.sum(cache["valid"], axis=1, keepdims=True)
                                           - cache.get(sites.CACHED_PROMPT, 0))
        positions_bt = jnp.maximum(past_bt + jnp.cumsum(valid_bt, axis=1) - 1, 0)
    h_btd = qarray.take(embedding_vd, tokens_bt, mdl.dtype)
    if embed_scale is not None:
        h_btd = h_btd * jnp.asarray(embed_scale, mdl.dtype)
    # Prompt / prefix tuning: real positions start after the virtual tokens, and a
    # prompt's are prepended here (to h, valid, positions and the cache's slots).
    h_btd, valid_bt, positions_bt, cache = sites.embed(mdl, h_btd, valid_bt, positions_bt, cache)
    n_virtual, t = h_btd.shape[1] - t, h_btd.shape[1]
    if cache is None:
        index = jnp.zeros((), jnp.int32)
        key_valid_bs = valid_bt
    else:
        index = cache["index"]
        key_valid_bs = jax.lax.dynamic_update_slice(cache["valid"], valid_bt, (0, index))
    mask_bts = attention_mask(index + jnp.arange(t), key_valid_bs, sliding_window)
    return Inputs(h_btd, positions_bt, mask_bts, key_valid_bs, index, n_virtual, cache)


def sliding_window_mask(x: Inputs, sliding_window: int) -> jax.Array:
    """`x`'s mask restricted to a sliding window, for the families whose
    layers alternate windowed and full attention (Gemma 2 / 3): embed_inputs
    builds the full one."""
    return attention_mask(x.index + jnp.arange(x.h_btd.shape[1]), x.key_valid_bs,
                          sliding_window)


def attend(mdl: nn.Module, q_btkgn: jax.Array, k_btkn: jax.Array, v_btkn: jax.Array,
           mask_bts: jax.Array, layer_cache: dict | None, index: jax.Array,
           scale: float | None = None,
           bias_fn: Callable[[int], jax.Array] | None = None,
           softcap: float | None = None,
           sliding_window: int | None = None) -> tuple[jax.Array, dict | None]:
    """Writes the new keys/values into the layer's cache slots, applies the
    prefix site (sites.kv) and attends. `bias_fn(p)` gives the scores bias
    once the p prefix slots are known (ALiBi); `softcap` soft-caps the scores
    (dot_attention). `sliding_window`: the layer's window, which `mask_bts`
    already applies; given, the p prefix slots count as the p slots before
    the sequence and are seen only inside it, as in transformers' cache that
    PEFT's prefix fills (Gemma 2 / 3). Returns (out (b, t, k, g, n), the
    layer's new cache)."""
    if layer_cache is not None:
        zero = jnp.zeros((), jnp.int32)
        k_all = jax.lax.dynamic_update_slice(
            layer_cache["k"], k_btkn.astype(layer_cache["k"].dtype), (zero, index, zero, zero))
        v_all = jax.lax.dynamic_update_slice(
            layer_cache["v"], v_btkn.astype(layer_cache["v"].dtype), (zero, index, zero, zero))
        layer_cache = {"k": k_all, "v": v_all}
        k_bskn, v_bskn = k_all.astype(mdl.dtype), v_all.astype(mdl.dtype)
    else:
        k_bskn, v_bskn = k_btkn, v_btkn
    s = k_bskn.shape[1]
    k_bskn, v_bskn, mask_bts = sites.kv(mdl, k_bskn, v_bskn, mask_bts)
    p = k_bskn.shape[1] - s
    if p and sliding_window is not None:  # query slot q sees prefix slot j if q + p - j < window
        q_t = index + jnp.arange(q_btkgn.shape[1])
        in_window_tp = q_t[:, None] + p - jnp.arange(p)[None, :] < sliding_window
        mask_bts = mask_bts.at[:, :, :p].set(mask_bts[:, :, :p] & in_window_tp[None])
    bias = None if bias_fn is None else bias_fn(p)
    return (dot_attention(q_btkgn, k_bskn, v_bskn, mask_bts, scale, bias, softcap),
            layer_cache)


def decoder_stack(mdl: nn.Module, layer_cls: type[nn.Module], layer_args: tuple,
                  x: Inputs, h_btd: jax.Array, per_call: tuple, deterministic: bool,
                  remat: bool, layer_attrs: Callable[[int], dict] | None = None
                  ) -> tuple[jax.Array, Cache | None]:
    """Runs `num_hidden_layers` layers `layer_cls(*layer_args, name='layers_i')`
    (plus the module attributes `layer_attrs(i)` where layers differ, e.g.
    Gemma's layer type), each called as layer(h, *per_call, layer_cache,
    index, deterministic) and returning (h, layer_cache). Returns (h, the new
    cache or None).

    Layers are unrolled (not `nn.scan`): a scanned stack slices every weight
    out of a stacked array each step, which on CPU copies the whole model per
    decoded token; unrolled layers decode at memory bandwidth."""
    if remat:  # recompute each layer's activations in the backward pass
        layer_cls = nn.remat(layer_cls, static_argnums=(len(per_call) + 4,))
    cache = x.cache
    new_cache: Cache | None = None if cache is None else dict(cache)
    h_btd = sharding.constrain(h_btd, "batch", None, None)
    for i in range(mdl.cfg.num_hidden_layers):
        name = f"layers_{i}"
        attrs = {} if layer_attrs is None else layer_attrs(i)
        h_btd, layer_cache = layer_cls(*layer_args, **attrs, name=name)(
            h_btd, *per_call, None if cache is None else cache[name], x.index, deterministic)
        h_btd = sharding.constrain(h_btd, "batch", None, None)
        if new_cache is not None:
            new_cache[name] = layer_cache
    if new_cache is not None:
        new_cache["valid"] = x.key_valid_bs
        new_cache["index"] = x.index + x.h_btd.shape[1]
    return h_btd, new_cache


def real_outputs(h_btd: jax.Array, x: Inputs, logits_at_ba: jax.Array | None) -> jax.Array:
    """The hidden states whose logits are wanted: the real tokens' (a prompt's
    virtual tokens dropped; PEFT's logits include P more), or, given int (b, a)
    indices into t, those positions only (the loss needs logits only where its
    targets are, and the vocab-wide head is a training step's largest activation)."""
    h_btd = h_btd[:, x.n_virtual:]
    if logits_at_ba is not None:
        h_btd = jnp.take_along_axis(h_btd, logits_at_ba[..., None], axis=1)
    return h_btd


def output_logits(mdl: nn.Module, h_btd: jax.Array, embedding_vd: Any, tied: bool,
                  head_bias: bool = False) -> jax.Array:
    """float32 logits (b, t, v): the tied embedding matrix or an `lm_head`
    (d, v) parameter, plus an `lm_head_bias` (v,) when `head_bias` (GPT-J)."""
    if tied:
        logits = qarray.apply(functools.partial(jnp.einsum, "btd,vd->btv",
                                                preferred_element_type=jnp.float32),
                              h_btd, embedding_vd, mdl.dtype)
    else:
        kernel = qarray.param(mdl, "lm_head", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("embed", "vocab")),
            (h_btd.shape[-1], embedding_vd.shape[0]), mdl.param_dtype)
        logits = qarray.apply(functools.partial(jnp.einsum, "btd,dv->btv",
                                                preferred_element_type=jnp.float32),
                              h_btd, kernel, mdl.dtype)
    if head_bias:
        bias = mdl.param("lm_head_bias", nn.with_logical_partitioning(
            nn.initializers.zeros, ("vocab",)), (embedding_vd.shape[0],), mdl.param_dtype)
        logits = logits + bias.astype(jnp.float32)
    return sharding.constrain(logits, "batch", None, "vocab")
