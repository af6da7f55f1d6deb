"""The LLaMA family as a Flax (linen) causal LM: LLaMA 1/2/3, Mistral, Qwen2.

Follows transformers' `modeling_llama.py` operation for operation (RMSNorm in
float32, half-split rotary layout, SiLU-gated MLP), so logits match it to
float32 rounding. Parameters mirror Hugging Face names so PEFT keys map
one to one: `layers_3/self_attn/q_proj/kernel` is
`model.layers.3.self_attn.q_proj.weight` transposed; `embed_tokens` (v, d),
`norm/scale`, and `lm_head` (d, v) unless the embeddings are tied. The
kernels, `embed_tokens` and `lm_head` may be quantized (quant/); the model
reads them through quant.array's ops, which dequantize inside the jit.

Axis legend: b batch, t new tokens, s key slots, d model, k kv heads,
g query heads per kv head, n head dim, v vocab.

Layers are unrolled (not `nn.scan`): a scanned stack slices every weight
out of a stacked array each step, which on CPU copies the whole model per
decoded token; unrolled layers decode at memory bandwidth.

KV cache: an explicit pytree passed in and returned (see `init_cache`), with
a boolean `valid` per slot so left padding and prefixes mask correctly.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_adapters.adapters import sites
from flax_adapters.models.config import LlamaConfig
from flax_adapters.models.layers import (Linear, RMSNorm, apply_rope, attention_mask,
                                         dot_attention, rope_inv_freq)
from flax_adapters.quant import array as qarray

Dtype = Any
Cache = dict[str, Any]


def init_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype: Dtype = jnp.float32) -> Cache:
    """An empty KV cache with `max_len` slots per sequence.

    {'layers_i': {'k': (b, s, k, n), 'v': (b, s, k, n)}, 'valid': (b, s) bool,
     'index': () int32 -- the next slot to write}
    """
    shape = (batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
    cache: Cache = {f"layers_{i}": {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
                    for i in range(cfg.num_hidden_layers)}
    cache["valid"] = jnp.zeros((batch, max_len), bool)
    cache["index"] = jnp.zeros((), jnp.int32)
    return cache


class Attention(nn.Module):
    cfg: LlamaConfig
    dtype: Dtype
    param_dtype: Dtype
    settings: sites.Settings

    @nn.compact
    def __call__(self, x_btd, positions_bt, mask_bts, layer_cache, index, deterministic):
        cfg = self.cfg
        dense = lambda feats, axes, bias, name: Linear(  # noqa: E731
            feats, axes, bias, self.dtype, self.param_dtype, self.settings, name=name)
        b, t, _ = x_btd.shape
        q = dense(cfg.num_attention_heads * cfg.head_dim, ("embed", "heads"),
                  cfg.attention_bias, "q_proj")(x_btd, deterministic)
        k = dense(cfg.num_key_value_heads * cfg.head_dim, ("embed", "kv_heads"),
                  cfg.attention_bias, "k_proj")(x_btd, deterministic)
        v = dense(cfg.num_key_value_heads * cfg.head_dim, ("embed", "kv_heads"),
                  cfg.attention_bias, "v_proj")(x_btd, deterministic)
        q_btkgn = q.reshape(b, t, cfg.num_key_value_heads, cfg.num_groups, cfg.head_dim)
        k_btkn = k.reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
        v_btkn = v.reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)

        inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        q_btkgn = apply_rope(q_btkgn.reshape(b, t, -1, cfg.head_dim), positions_bt,
                             inv_freq).reshape(q_btkgn.shape)
        k_btkn = apply_rope(k_btkn, positions_bt, inv_freq)

        if layer_cache is not None:
            zero = jnp.zeros((), jnp.int32)
            k_all = jax.lax.dynamic_update_slice(
                layer_cache["k"], k_btkn.astype(layer_cache["k"].dtype), (zero, index, zero, zero))
            v_all = jax.lax.dynamic_update_slice(
                layer_cache["v"], v_btkn.astype(layer_cache["v"].dtype), (zero, index, zero, zero))
            layer_cache = {"k": k_all, "v": v_all}
            k_bskn, v_bskn = k_all.astype(self.dtype), v_all.astype(self.dtype)
        else:
            k_bskn, v_bskn = k_btkn, v_btkn
        k_bskn, v_bskn, mask_bts = sites.kv(self, k_bskn, v_bskn, mask_bts)
        out_btkgn = dot_attention(q_btkgn, k_bskn, v_bskn, mask_bts)
        out = dense(cfg.hidden_size, ("heads", "embed"), cfg.o_bias, "o_proj")(
            out_btkgn.reshape(b, t, -1), deterministic)
        return out, layer_cache


class MLP(nn.Module):
    cfg: LlamaConfig
    dtype: Dtype
    param_dtype: Dtype
    settings: sites.Settings

    @nn.compact
    def __call__(self, x_btd, deterministic):
        cfg = self.cfg
        dense = lambda feats, axes, name: Linear(  # noqa: E731
            feats, axes, cfg.mlp_bias, self.dtype, self.param_dtype, self.settings, name=name)
        gate = dense(cfg.intermediate_size, ("embed", "mlp"), "gate_proj")(x_btd, deterministic)
        up = dense(cfg.intermediate_size, ("embed", "mlp"), "up_proj")(x_btd, deterministic)
        return dense(cfg.hidden_size, ("mlp", "embed"), "down_proj")(
            nn.silu(gate) * up, deterministic)


class DecoderLayer(nn.Module):
    cfg: LlamaConfig
    dtype: Dtype
    param_dtype: Dtype
    settings: sites.Settings

    @nn.compact
    def __call__(self, h_btd, positions_bt, mask_bts, layer_cache, index, deterministic):
        cfg, args = self.cfg, (self.cfg, self.dtype, self.param_dtype, self.settings)
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype, name=name)  # noqa: E731
        attn, layer_cache = Attention(*args, name="self_attn")(
            norm("input_layernorm")(h_btd), positions_bt, mask_bts, layer_cache, index,
            deterministic)
        h_btd = h_btd + attn
        h_btd = h_btd + MLP(*args, name="mlp")(norm("post_attention_layernorm")(h_btd),
                                              deterministic)
        return h_btd, layer_cache


class LlamaForCausalLM(nn.Module):
    """Causal LM. `__call__(tokens, valid=None, positions=None, cache=None)`.

    tokens_bt: int (b, t). valid_bt: bool (b, t), False at padding (default
    all True). positions_bt: default counts valid tokens (left padding safe),
    continuing from the cache. Returns (float32 logits (b, t, v), new cache
    or None).
    """

    cfg: LlamaConfig
    dtype: Dtype = jnp.float32  # compute dtype
    param_dtype: Dtype = jnp.float32  # dtype of freshly initialised params
    settings: sites.Settings = sites.Settings()
    remat: bool = False  # recompute each layer's activations in the backward pass

    @nn.compact
    def __call__(self, tokens_bt, valid_bt=None, positions_bt=None, cache: Cache | None = None,
                 deterministic: bool = True):
        cfg = self.cfg
        b, t = tokens_bt.shape
        if valid_bt is None:
            valid_bt = jnp.ones((b, t), bool)
        valid_bt = valid_bt.astype(bool)
        if positions_bt is None:
            # Counts this row's real tokens (a cached prompt's virtual tokens excluded).
            past_bt = 0 if cache is None else (jnp.sum(cache["valid"], axis=1, keepdims=True)
                                               - cache.get(sites.CACHED_PROMPT, 0))
            positions_bt = jnp.maximum(past_bt + jnp.cumsum(valid_bt, axis=1) - 1, 0)

        embedding = qarray.param(
            self, "embed_tokens", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                            ("vocab", "embed")),
            (cfg.vocab_size, cfg.hidden_size), self.param_dtype)
        h_btd = qarray.take(embedding, tokens_bt, self.dtype)
        # Prompt / prefix tuning: real positions start after the virtual tokens, and a
        # prompt's are prepended here (to h, valid, positions and the cache's slots).
        h_btd, valid_bt, positions_bt, cache = sites.embed(self, h_btd, valid_bt, positions_bt,
                                                           cache)
        n_virtual, t = h_btd.shape[1] - t, h_btd.shape[1]
        if cache is None:
            index = jnp.zeros((), jnp.int32)
            key_valid_bs = valid_bt
        else:
            index = cache["index"]
            key_valid_bs = jax.lax.dynamic_update_slice(cache["valid"], valid_bt, (0, index))
        mask_bts = attention_mask(index + jnp.arange(t), key_valid_bs, cfg.sliding_window)

        layer_cls = DecoderLayer
        if self.remat:
            layer_cls = nn.remat(DecoderLayer, static_argnums=(6,))
        new_cache: Cache | None = None if cache is None else dict(cache)
        for i in range(cfg.num_hidden_layers):
            name = f"layers_{i}"
            h_btd, layer_cache = layer_cls(cfg, self.dtype, self.param_dtype, self.settings,
                                           name=name)(
                h_btd, positions_bt, mask_bts, None if cache is None else cache[name], index,
                deterministic)
            if new_cache is not None:
                new_cache[name] = layer_cache
        h_btd = h_btd[:, n_virtual:]  # logits for the real tokens only (PEFT's include P more)
        h_btd = RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype, name="norm")(h_btd)

        if cfg.tie_word_embeddings:
            logits = qarray.apply(functools.partial(jnp.einsum, "btd,vd->btv",
                                                    preferred_element_type=jnp.float32),
                                  h_btd, embedding, self.dtype)
        else:
            kernel = qarray.param(self, "lm_head", nn.with_logical_partitioning(
                nn.initializers.normal(0.02), ("embed", "vocab")),
                (cfg.hidden_size, cfg.vocab_size), self.param_dtype)
            logits = qarray.apply(functools.partial(jnp.einsum, "btd,dv->btv",
                                                    preferred_element_type=jnp.float32),
                                  h_btd, kernel, self.dtype)
        if new_cache is not None:
            new_cache["valid"] = key_valid_bs
            new_cache["index"] = index + t
        return logits, new_cache


def logical_axes(cfg: LlamaConfig) -> dict:
    """The base tree's logical axis names, e.g. {'embed_tokens': ('vocab', 'embed'),
    'layers_0': {'self_attn': {'q_proj': {'kernel': ('embed', 'heads')}}}, ...}."""
    abstract = jax.eval_shape(lambda: LlamaForCausalLM(cfg).init(
        jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    specs = nn.get_partition_spec(abstract)["params"]
    return jax.tree_util.tree_map(lambda s: tuple(s), specs,
                                  is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
