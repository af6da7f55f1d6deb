"""BLOOM (BigScience 2022; BLOOMZ is the same architecture) as a Flax causal LM.

Follows transformers' `modeling_bloom.py` operation for operation: ALiBi
instead of position embeddings, a LayerNorm on the word embeddings, a fused
`query_key_value` projection laid out per head as [q, k, v] (its output is
viewed (heads, 3, head_dim)), BLOOM's tanh GELU, LayerNorms with bias, and
the head tied to the embeddings. Parameter names mirror Hugging Face's
(`transformer.h.3.self_attention.query_key_value.weight` is
`layers_3/self_attention/query_key_value/kernel` transposed), so PEFT keys
map one to one; a PEFT LoRA on the fused projection is a LoRA on this
Linear, the per-head layout only matters for how we split its output.

ALiBi: the scores get slope_h * (key position), the key's index among its
row's valid slots, as transformers' build_alibi_tensor does from the
attention mask; so left padding, a cache and a prompt's virtual tokens
(which are valid slots) number keys as transformers does under PEFT. A
prefix's P slots come first (positions 0..P-1, the real keys after them),
as PEFT's prepended mask of ones gives.

Axis legend: b batch, t new tokens, s key slots, d model, h heads, n head
dim, f MLP width (4d), v vocab.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_adapters.adapters import sites
from flax_adapters.adapters.targeting import Presets
from flax_adapters.models.decoder import (Cache, attend, decoder_stack, embed_inputs,
                                          output_logits, real_outputs, token_embedding)
from flax_adapters.models.layers import (LayerNorm, Linear, alibi_bias, alibi_slopes,
                                         key_positions)

Dtype = Any

HF_NAMES = {"layers": "transformer.h", "embed_tokens": "transformer.word_embeddings.weight",
            "word_embeddings_layernorm": "transformer.word_embeddings_layernorm",
            "ln_f": "transformer.ln_f", "lm_head": "lm_head.weight",
            "base_prefix": "transformer."}
# The adapter methods' default targets on this family (adapters/targeting.py).
PRESETS = Presets(
    targets={"lora": ("query_key_value",),
             "ia3": ("query_key_value", "dense_4h_to_h"),  # PEFT: mlp.dense_4h_to_h, the same
             "ia3_feedforward": ("dense_4h_to_h",),
             "bottleneck": ("dense_h_to_4h", "dense_4h_to_h"), "adapterp": ("dense_4h_to_h",),
             "parallel": ("query_key_value",)},
    series_placement={"dense_h_to_4h": "input", "dense_4h_to_h": "output"})


@dataclasses.dataclass(frozen=True)
class BloomConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    layer_norm_epsilon: float = 1e-5
    apply_residual_connection_post_layernorm: bool = False
    tie_word_embeddings: bool = True
    model_type: str = "bloom"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_key_value_heads(self) -> int:
        return self.num_attention_heads

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> "BloomConfig":
        d = hf.get("hidden_size", hf.get("n_embed"))
        heads = hf.get("n_head", hf.get("num_attention_heads"))
        if d % heads:
            raise ValueError(f"hidden_size={d} is not a multiple of n_head={heads}")
        eos = hf.get("eos_token_id")
        return cls(
            vocab_size=hf["vocab_size"], hidden_size=d,
            num_hidden_layers=hf.get("n_layer", hf.get("num_hidden_layers")),
            num_attention_heads=heads,
            layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)),
            apply_residual_connection_post_layernorm=bool(
                hf.get("apply_residual_connection_post_layernorm", False)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=hf.get("pad_token_id"))


def bloom_gelu(x: jax.Array) -> jax.Array:
    """transformers' bloom_gelu_forward (the tanh GELU with its constants)."""
    return x * 0.5 * (1.0 + jnp.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


class BloomAttention(nn.Module):
    cfg: BloomConfig
    dtype: Dtype
    param_dtype: Dtype
    settings: sites.Settings

    @nn.compact
    def __call__(self, x_btd, key_pos_bs, mask_bts, layer_cache, index, deterministic):
        cfg = self.cfg
        b, t, d = x_btd.shape
        h, n = cfg.num_attention_heads, cfg.head_dim
        qkv = Linear(3 * d, ("embed", "heads"), True, self.dtype, self.param_dtype, self.settings,
                     name="query_key_value")(x_btd, deterministic)
        qkv_bth3n = qkv.reshape(b, t, h, 3, n)
        q_bthn, k_bthn, v_bthn = (qkv_bth3n[:, :, :, i] for i in range(3))
        slopes = alibi_slopes(h)

        def bias(p):  # p prefix slots first, numbered 0..p-1; the others after them
            pos_bs = key_pos_bs if not p else jnp.concatenate(
                [jnp.broadcast_to(jnp.arange(p), (b, p)), key_pos_bs + p], axis=1)
            return alibi_bias(slopes, pos_bs)

        out_bthgn, layer_cache = attend(self, q_bthn[:, :, :, None], k_bthn, v_bthn, mask_bts,
                                        layer_cache, index, bias_fn=bias)
        out = Linear(d, ("heads", "embed"), True, self.dtype, self.param_dtype, self.settings,
                     name="dense")(out_bthgn.reshape(b, t, d), deterministic)
        return out, layer_cache


class BloomMLP(nn.Module):
    cfg: BloomConfig
    dtype: Dtype
    param_dtype: Dtype
    settings: sites.Settings

    @nn.compact
    def __call__(self, x_btd, deterministic):
        d = self.cfg.hidden_size
        dense = lambda feats, axes, name: Linear(  # noqa: E731
            feats, axes, True, self.dtype, self.param_dtype, self.settings, name=name)
        h_btf = bloom_gelu(dense(4 * d, ("embed", "mlp"), "dense_h_to_4h")(x_btd, deterministic))
        return dense(d, ("mlp", "embed"), "dense_4h_to_h")(h_btf, deterministic)


class BloomBlock(nn.Module):
    cfg: BloomConfig
    dtype: Dtype
    param_dtype: Dtype
    settings: sites.Settings

    @nn.compact
    def __call__(self, h_btd, key_pos_bs, mask_bts, layer_cache, index, deterministic):
        cfg, args = self.cfg, (self.cfg, self.dtype, self.param_dtype, self.settings)
        norm = lambda name: LayerNorm(cfg.layer_norm_epsilon, dtype=self.dtype,  # noqa: E731
                                      param_dtype=self.param_dtype, name=name)
        post = cfg.apply_residual_connection_post_layernorm
        ln_btd = norm("input_layernorm")(h_btd)
        attn, layer_cache = BloomAttention(*args, name="self_attention")(
            ln_btd, key_pos_bs, mask_bts, layer_cache, index, deterministic)
        h_btd = attn + (ln_btd if post else h_btd)
        ln_btd = norm("post_attention_layernorm")(h_btd)
        h_btd = BloomMLP(*args, name="mlp")(ln_btd, deterministic) + (ln_btd if post else h_btd)
        return h_btd, layer_cache


class BloomForCausalLM(nn.Module):
    """Causal LM with the interface of LlamaForCausalLM:
    `__call__(tokens, valid=None, positions=None, cache=None)` -> (float32
    logits (b, t, v), new cache or None). BLOOM has no positions; they are
    accepted (and shifted by the prompt site) but unused."""

    cfg: BloomConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    settings: sites.Settings = sites.Settings()
    remat: bool = False

    @nn.compact
    def __call__(self, tokens_bt, valid_bt=None, positions_bt=None, cache: Cache | None = None,
                 deterministic: bool = True, logits_at_ba: jax.Array | None = None):
        cfg = self.cfg
        norm = lambda name: LayerNorm(cfg.layer_norm_epsilon, dtype=self.dtype,  # noqa: E731
                                      param_dtype=self.param_dtype, name=name)
        embedding = token_embedding(self, cfg.vocab_size, cfg.hidden_size)
        x = embed_inputs(self, embedding, tokens_bt, valid_bt, positions_bt, cache)
        h_btd = norm("word_embeddings_layernorm")(x.h_btd)
        h_btd, new_cache = decoder_stack(
            self, BloomBlock, (cfg, self.dtype, self.param_dtype, self.settings), x, h_btd,
            (key_positions(x.key_valid_bs), x.mask_bts), deterministic, self.remat)
        h_btd = norm("ln_f")(real_outputs(h_btd, x, logits_at_ba))
        return output_logits(self, h_btd, embedding, cfg.tie_word_embeddings), new_cache

