"""GPT-NeoX (Black et al. 2022, arXiv:2204.06745; Pythia too) as a Flax causal LM.

Follows transformers' `modeling_gpt_neox.py` operation for operation: a
fused `query_key_value` whose output is laid out per head as [q | k | v]
(viewed (heads, 3 * head_dim) and cut in three), half-split rotary
embeddings on the first `rotary_pct` of each head (`partial_rotary_factor`),
LayerNorms with bias, and `use_parallel_residual` both ways:

    parallel:   h = h + attn(ln_in(h)) + mlp(ln_post(h))
    sequential: a = h + attn(ln_in(h));  h = a + mlp(ln_post(a))

Parameter names mirror Hugging Face's
(`gpt_neox.layers.3.attention.query_key_value.weight` is
`layers_3/attention/query_key_value/kernel` transposed; the head is
`lm_head`, older checkpoints' `embed_out`). A PEFT LoRA on the fused
projection is a LoRA on this Linear.

Not modelled: dropout (0 in the published configs; the frozen base runs
deterministically) and RoPE scaling (only the default rope type).

Axis legend: b batch, t new tokens, s key slots, d model, h heads, n head
dim, f MLP width, v vocab.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_adapters.adapters import sites
from flax_adapters.adapters.targeting import Presets
from flax_adapters.activations import ACTIVATIONS
from flax_adapters.models.decoder import (Cache, attend, decoder_stack, embed_inputs,
                                          output_logits, real_outputs, token_embedding)
from flax_adapters.models.layers import LayerNorm, Linear, apply_partial_rope, rope_inv_freq

Dtype = Any

HF_NAMES = {"layers": "gpt_neox.layers", "embed_tokens": "gpt_neox.embed_in.weight",
            "final_layer_norm": "gpt_neox.final_layer_norm", "lm_head": "lm_head.weight",
            "base_prefix": "gpt_neox.", "aliases": {"embed_out.weight": "lm_head.weight"}}
# The adapter methods' default targets on this family (adapters/targeting.py).
PRESETS = Presets(
    # LLM-Adapters has no bottleneck mapping for GPT-NeoX: ours follows BLOOM's
    # (the same MLP and fused attention names).
    targets={"lora": ("query_key_value",), "ia3": ("query_key_value", "dense_4h_to_h"),
             "ia3_feedforward": ("dense_4h_to_h",),
             "bottleneck": ("dense_h_to_4h", "dense_4h_to_h"), "adapterp": ("dense_4h_to_h",),
             "parallel": ("query_key_value",)},
    series_placement={"dense_h_to_4h": "input", "dense_4h_to_h": "output"})


@dataclasses.dataclass(frozen=True)
class GPTNeoXConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    rotary_ndims: int
    rope_theta: float = 10000.0
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    use_parallel_residual: bool = True
    attention_bias: bool = True
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    model_type: str = "gpt_neox"
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
    def from_hf(cls, hf: Mapping[str, Any]) -> "GPTNeoXConfig":
        d, heads = hf["hidden_size"], hf["num_attention_heads"]
        if d % heads:
            raise ValueError(f"hidden_size={d} is not a multiple of num_attention_heads={heads}")
        # transformers >= 5 writes rope_parameters; older configs rotary_pct / rotary_emb_base.
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"unsupported rope_type {rope_type!r} for gpt_neox; only 'default'")
        pct = float(rope.get("partial_rotary_factor", hf.get("rotary_pct", 0.25)))
        theta = float(rope.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
        act = hf.get("hidden_act", "gelu")
        if act not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {act!r} for gpt_neox; supported: "
                             f"{sorted(ACTIVATIONS)}")
        eos = hf.get("eos_token_id")
        return cls(
            vocab_size=hf["vocab_size"], hidden_size=d,
            num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=heads,
            intermediate_size=hf["intermediate_size"],
            rotary_ndims=int(d // heads * pct), rope_theta=theta, hidden_act=act,
            layer_norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
            use_parallel_residual=bool(hf.get("use_parallel_residual", True)),
            attention_bias=bool(hf.get("attention_bias", True)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=hf.get("pad_token_id"))


class GPTNeoXAttention(nn.Module):
    cfg: GPTNeoXConfig
    dtype: Dtype
    param_dtype: Dtype
    settings: sites.Settings

    @nn.compact
    def __call__(self, x_btd, positions_bt, mask_bts, layer_cache, index, deterministic):
        cfg = self.cfg
        b, t, d = x_btd.shape
        h, n = cfg.num_attention_heads, cfg.head_dim
        dense = lambda feats, axes, name: Linear(  # noqa: E731
            feats, axes, cfg.attention_bias, self.dtype, self.param_dtype, self.settings,
            name=name)
        qkv_bth3n = dense(3 * d, ("embed", "heads"), "query_key_value")(
            x_btd, deterministic).reshape(b, t, h, 3 * n)
        q, k, v = (qkv_bth3n[..., i * n:(i + 1) * n] for i in range(3))
        inv_freq = rope_inv_freq(cfg.rotary_ndims, cfg.rope_theta, None)
        q = apply_partial_rope(q, positions_bt, inv_freq)
        k = apply_partial_rope(k, positions_bt, inv_freq)
        out_bthgn, layer_cache = attend(self, q[:, :, :, None], k, v, mask_bts, layer_cache,
                                        index)
        out = dense(d, ("heads", "embed"), "dense")(out_bthgn.reshape(b, t, d), deterministic)
        return out, layer_cache


class GPTNeoXMLP(nn.Module):
    cfg: GPTNeoXConfig
    dtype: Dtype
    param_dtype: Dtype
    settings: sites.Settings

    @nn.compact
    def __call__(self, x_btd, deterministic):
        cfg = self.cfg
        dense = lambda feats, axes, name: Linear(  # noqa: E731
            feats, axes, True, self.dtype, self.param_dtype, self.settings, name=name)
        f_btf = dense(cfg.intermediate_size, ("embed", "mlp"), "dense_h_to_4h")(
            x_btd, deterministic)
        return dense(cfg.hidden_size, ("mlp", "embed"), "dense_4h_to_h")(
            ACTIVATIONS[cfg.hidden_act](f_btf), deterministic)


class GPTNeoXLayer(nn.Module):
    cfg: GPTNeoXConfig
    dtype: Dtype
    param_dtype: Dtype
    settings: sites.Settings

    @nn.compact
    def __call__(self, h_btd, positions_bt, mask_bts, layer_cache, index, deterministic):
        cfg, args = self.cfg, (self.cfg, self.dtype, self.param_dtype, self.settings)
        norm = lambda name: LayerNorm(cfg.layer_norm_eps, dtype=self.dtype,  # noqa: E731
                                      param_dtype=self.param_dtype, name=name)
        attn, layer_cache = GPTNeoXAttention(*args, name="attention")(
            norm("input_layernorm")(h_btd), positions_bt, mask_bts, layer_cache, index,
            deterministic)
        mlp, post = GPTNeoXMLP(*args, name="mlp"), norm("post_attention_layernorm")
        if cfg.use_parallel_residual:
            return mlp(post(h_btd), deterministic) + attn + h_btd, layer_cache
        a_btd = attn + h_btd
        return mlp(post(a_btd), deterministic) + a_btd, layer_cache


class GPTNeoXForCausalLM(nn.Module):
    """Causal LM with the interface of LlamaForCausalLM:
    `__call__(tokens, valid=None, positions=None, cache=None)` -> (float32
    logits (b, t, v), new cache or None)."""

    cfg: GPTNeoXConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    settings: sites.Settings = sites.Settings()
    remat: bool = False

    @nn.compact
    def __call__(self, tokens_bt, valid_bt=None, positions_bt=None, cache: Cache | None = None,
                 deterministic: bool = True, logits_at_ba: jax.Array | None = None):
        cfg = self.cfg
        embedding = token_embedding(self, cfg.vocab_size, cfg.hidden_size)
        x = embed_inputs(self, embedding, tokens_bt, valid_bt, positions_bt, cache)
        h_btd, new_cache = decoder_stack(
            self, GPTNeoXLayer, (cfg, self.dtype, self.param_dtype, self.settings), x, x.h_btd,
            (x.positions_bt, x.mask_bts), deterministic, self.remat)
        h_btd = LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                          name="final_layer_norm")(real_outputs(h_btd, x, logits_at_ba))
        return output_logits(self, h_btd, embedding, cfg.tie_word_embeddings), new_cache
