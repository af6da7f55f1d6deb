"""OPT (Zhang et al. 2022, arXiv:2205.01068) as a Flax causal LM.

Follows transformers' `modeling_opt.py` operation for operation: learned
absolute positions looked up at position + 2 (OPT's offset), where a
token's position counts the valid tokens of its row (transformers computes
it from the attention mask, so left padding, a cache and a prompt's virtual
tokens number alike); the query scaled before the scores; pre-LN
(`do_layer_norm_before`, 125m and >= 1.3b) or post-LN (350m); a final
LayerNorm only with pre-LN; and `project_in` / `project_out` around the
stack when `word_embed_proj_dim` differs from `hidden_size` (350m). The head
is tied to the (v, word_embed_proj_dim) embeddings unless the config says
otherwise. Parameter names mirror Hugging Face's
(`model.decoder.layers.3.self_attn.q_proj.weight` is
`layers_3/self_attn/q_proj/kernel` transposed; `embed_positions` is
`model.decoder.embed_positions.weight`).

Positions past `max_position_embeddings` have no embedding: their logits
would come out NaN (transformers raises an IndexError there), so `generate`
refuses a prompt plus `max_new_tokens` longer than `position_limit`.

Not modelled: OPT's dropout (0.1 in the published configs). The frozen base
runs deterministically here, in training too; adapters apply their own
dropout.

Axis legend: b batch, t new tokens, s key slots, d model, e embedding width
(word_embed_proj_dim), h heads, n head dim, f MLP width, v vocab.
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
from flax_adapters.models.layers import LayerNorm, Linear

Dtype = Any

POSITION_OFFSET = 2  # OPTLearnedPositionalEmbedding looks positions up at index + 2

HF_NAMES = {"layers": "model.decoder.layers", "embed_tokens": "model.decoder.embed_tokens.weight",
            "embed_positions": "model.decoder.embed_positions.weight",
            "final_layer_norm": "model.decoder.final_layer_norm",
            "project_in": "model.decoder.project_in", "project_out": "model.decoder.project_out",
            "lm_head": "lm_head.weight", "base_prefix": "model."}
# The adapter methods' default targets on this family (adapters/targeting.py).
PRESETS = Presets(
    targets={"lora": ("q_proj", "v_proj"), "ia3": ("q_proj", "k_proj", "fc2"),
             "ia3_feedforward": ("fc2",), "bottleneck": ("fc1", "fc2"), "adapterp": ("fc2",),
             "parallel": ("q_proj", "k_proj", "v_proj")},
    series_placement={"fc1": "input", "fc2": "output"})


@dataclasses.dataclass(frozen=True)
class OPTConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    ffn_dim: int
    word_embed_proj_dim: int
    max_position_embeddings: int = 2048
    do_layer_norm_before: bool = True
    remove_final_layer_norm: bool = False
    activation_function: str = "relu"
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    tie_word_embeddings: bool = True
    model_type: str = "opt"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_key_value_heads(self) -> int:
        return self.num_attention_heads

    @property
    def position_limit(self) -> int:
        """Tokens a sequence may hold: learned positions end here."""
        return self.max_position_embeddings

    @property
    def final_norm(self) -> bool:
        return self.do_layer_norm_before and not self.remove_final_layer_norm

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> "OPTConfig":
        d, heads = hf["hidden_size"], hf["num_attention_heads"]
        if d % heads:
            raise ValueError(f"hidden_size={d} is not a multiple of num_attention_heads={heads}")
        act = hf.get("activation_function", "relu")
        if act not in ACTIVATIONS:
            raise ValueError(f"unsupported activation_function {act!r} for opt; supported: "
                             f"{sorted(ACTIVATIONS)}")
        eos = hf.get("eos_token_id")
        return cls(
            vocab_size=hf["vocab_size"], hidden_size=d,
            num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=heads,
            ffn_dim=hf["ffn_dim"], word_embed_proj_dim=hf.get("word_embed_proj_dim") or d,
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            do_layer_norm_before=bool(hf.get("do_layer_norm_before", True)),
            remove_final_layer_norm=bool(hf.get("_remove_final_layer_norm", False)),
            activation_function=act, enable_bias=bool(hf.get("enable_bias", True)),
            layer_norm_elementwise_affine=bool(hf.get("layer_norm_elementwise_affine", True)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=hf.get("pad_token_id"))


def _norm(mdl: nn.Module, name: str) -> LayerNorm:
    affine = mdl.cfg.layer_norm_elementwise_affine
    return LayerNorm(1e-5, affine, affine, mdl.dtype, mdl.param_dtype, name=name)


class OPTAttention(nn.Module):
    cfg: OPTConfig
    dtype: Dtype
    param_dtype: Dtype
    settings: sites.Settings

    @nn.compact
    def __call__(self, x_btd, mask_bts, layer_cache, index, deterministic):
        cfg = self.cfg
        b, t, d = x_btd.shape
        h, n = cfg.num_attention_heads, cfg.head_dim
        dense = lambda axes, name: Linear(  # noqa: E731
            d, axes, cfg.enable_bias, self.dtype, self.param_dtype, self.settings, name=name)
        # OPT scales the query, not the scores (kept for its rounding).
        q = dense(("embed", "heads"), "q_proj")(x_btd, deterministic) * n ** -0.5
        k = dense(("embed", "heads"), "k_proj")(x_btd, deterministic)
        v = dense(("embed", "heads"), "v_proj")(x_btd, deterministic)
        out_bthgn, layer_cache = attend(self, q.reshape(b, t, h, 1, n), k.reshape(b, t, h, n),
                                        v.reshape(b, t, h, n), mask_bts, layer_cache, index,
                                        scale=1.0)
        out = dense(("heads", "embed"), "out_proj")(out_bthgn.reshape(b, t, d), deterministic)
        return out, layer_cache


class OPTDecoderLayer(nn.Module):
    cfg: OPTConfig
    dtype: Dtype
    param_dtype: Dtype
    settings: sites.Settings

    @nn.compact
    def __call__(self, h_btd, mask_bts, layer_cache, index, deterministic):
        cfg = self.cfg
        pre = cfg.do_layer_norm_before
        dense = lambda feats, axes, name: Linear(  # noqa: E731
            feats, axes, cfg.enable_bias, self.dtype, self.param_dtype, self.settings, name=name)
        attn_norm, mlp_norm = _norm(self, "self_attn_layer_norm"), _norm(self, "final_layer_norm")
        attn, layer_cache = OPTAttention(cfg, self.dtype, self.param_dtype, self.settings,
                                         name="self_attn")(
            attn_norm(h_btd) if pre else h_btd, mask_bts, layer_cache, index, deterministic)
        h_btd = h_btd + attn
        if not pre:
            h_btd = attn_norm(h_btd)
        f_btf = dense(cfg.ffn_dim, ("embed", "mlp"), "fc1")(
            mlp_norm(h_btd) if pre else h_btd, deterministic)
        h_btd = h_btd + dense(cfg.hidden_size, ("mlp", "embed"), "fc2")(
            ACTIVATIONS[cfg.activation_function](f_btf), deterministic)
        if not pre:
            h_btd = mlp_norm(h_btd)
        return h_btd, layer_cache


class OPTForCausalLM(nn.Module):
    """Causal LM with the interface of LlamaForCausalLM:
    `__call__(tokens, valid=None, positions=None, cache=None)` -> (float32
    logits (b, t, v), new cache or None)."""

    cfg: OPTConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    settings: sites.Settings = sites.Settings()
    remat: bool = False

    @nn.compact
    def __call__(self, tokens_bt, valid_bt=None, positions_bt=None, cache: Cache | None = None,
                 deterministic: bool = True, logits_at_ba: jax.Array | None = None):
        cfg = self.cfg
        d, e = cfg.hidden_size, cfg.word_embed_proj_dim
        embedding = token_embedding(self, cfg.vocab_size, e)
        x = embed_inputs(self, embedding, tokens_bt, valid_bt, positions_bt, cache)
        positions = self.param("embed_positions", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), (None, "embed")),
            (cfg.max_position_embeddings + POSITION_OFFSET, d), self.param_dtype)
        h_btd = x.h_btd
        if e != d:
            h_btd = Linear(d, (None, "embed"), False, self.dtype, self.param_dtype, self.settings,
                           name="project_in")(h_btd, deterministic)
        h_btd = h_btd + jnp.take(positions, x.positions_bt + POSITION_OFFSET,
                                 axis=0).astype(self.dtype)
        h_btd, new_cache = decoder_stack(
            self, OPTDecoderLayer, (cfg, self.dtype, self.param_dtype, self.settings), x, h_btd,
            (x.mask_bts,), deterministic, self.remat)
        h_btd = real_outputs(h_btd, x, logits_at_ba)
        if cfg.final_norm:
            h_btd = _norm(self, "final_layer_norm")(h_btd)
        if e != d:
            h_btd = Linear(e, ("embed", None), False, self.dtype, self.param_dtype, self.settings,
                           name="project_out")(h_btd, deterministic)
        return output_logits(self, h_btd, embedding, cfg.tie_word_embeddings), new_cache
