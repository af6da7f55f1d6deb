"""GPT-J (Wang & Komatsuzaki 2021) as a Flax causal LM.

Follows transformers' `modeling_gptj.py` operation for operation: one
LayerNorm (`ln_1`) feeds attention and the MLP in parallel, whose outputs
are added to the residual together; rotary embeddings on the first
`rotary_dim` dimensions of each head in the interleaved layout
(rotate_every_two: dimensions 2i and 2i+1 rotate together), the rest of the
head untouched; q, k, v, out projections without bias; an untied `lm_head`
with a bias. Parameter names mirror Hugging Face's
(`transformer.h.3.attn.q_proj.weight` is `layers_3/attn/q_proj/kernel`
transposed; `lm_head.weight` / `lm_head.bias` are `lm_head` / `lm_head_bias`).

Not modelled: dropout (0 in the published config; the frozen base runs
deterministically).

Axis legend: b batch, t new tokens, s key slots, d model, h heads, n head
dim, f MLP width, v vocab.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_adapters.adapters import sites
from flax_adapters.adapters.targeting import Presets
from flax_adapters.activations import ACTIVATIONS
from flax_adapters.models.decoder import (Cache, attend, decoder_stack, embed_inputs,
                                          output_logits, real_outputs, token_embedding)
from flax_adapters.models.layers import (LayerNorm, Linear, apply_partial_rope,
                                         apply_rope_interleaved, rope_inv_freq)

Dtype = Any

HF_NAMES = {"layers": "transformer.h", "embed_tokens": "transformer.wte.weight",
            "ln_f": "transformer.ln_f", "lm_head": "lm_head.weight",
            "lm_head_bias": "lm_head.bias", "base_prefix": "transformer."}
# The adapter methods' default targets on this family (adapters/targeting.py).
PRESETS = Presets(
    targets={"lora": ("q_proj", "v_proj"), "ia3": ("q_proj", "v_proj", "fc_out"),
             "ia3_feedforward": ("fc_out",), "bottleneck": ("fc_in", "fc_out"),
             "adapterp": ("fc_out",), "parallel": ("q_proj", "k_proj", "v_proj")},
    series_placement={"fc_in": "input", "fc_out": "output"})


@dataclasses.dataclass(frozen=True)
class GPTJConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    rotary_dim: int
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    model_type: str = "gptj"
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
    def from_hf(cls, hf: Mapping[str, Any]) -> "GPTJConfig":
        d = hf.get("n_embd", hf.get("hidden_size"))
        heads = hf.get("n_head", hf.get("num_attention_heads"))
        if d % heads:
            raise ValueError(f"n_embd={d} is not a multiple of n_head={heads}")
        rotary = hf.get("rotary_dim") or d // heads  # None: the whole head
        if rotary % 2 or rotary > d // heads:
            raise ValueError(f"rotary_dim={rotary} must be even and at most the head dim "
                             f"{d // heads}")
        act = hf.get("activation_function", "gelu_new")
        if act not in ACTIVATIONS:
            raise ValueError(f"unsupported activation_function {act!r} for gptj; supported: "
                             f"{sorted(ACTIVATIONS)}")
        eos = hf.get("eos_token_id")
        return cls(
            vocab_size=hf["vocab_size"], hidden_size=d,
            num_hidden_layers=hf.get("n_layer", hf.get("num_hidden_layers")),
            num_attention_heads=heads, intermediate_size=hf.get("n_inner") or 4 * d,
            rotary_dim=rotary, activation_function=act,
            layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)),
            max_position_embeddings=int(hf.get("n_positions",
                                               hf.get("max_position_embeddings", 2048))),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=hf.get("pad_token_id"))


class GPTJAttention(nn.Module):
    cfg: GPTJConfig
    dtype: Dtype
    param_dtype: Dtype
    settings: sites.Settings

    @nn.compact
    def __call__(self, x_btd, positions_bt, mask_bts, layer_cache, index, deterministic):
        cfg = self.cfg
        b, t, d = x_btd.shape
        h, n = cfg.num_attention_heads, cfg.head_dim
        dense = lambda axes, name: Linear(  # noqa: E731
            d, axes, False, self.dtype, self.param_dtype, self.settings, name=name)
        q = dense(("embed", "heads"), "q_proj")(x_btd, deterministic).reshape(b, t, h, n)
        k = dense(("embed", "heads"), "k_proj")(x_btd, deterministic).reshape(b, t, h, n)
        v = dense(("embed", "heads"), "v_proj")(x_btd, deterministic).reshape(b, t, h, n)
        inv_freq = rope_inv_freq(cfg.rotary_dim, 10000.0, None)
        q = apply_partial_rope(q, positions_bt, inv_freq, apply_rope_interleaved)
        k = apply_partial_rope(k, positions_bt, inv_freq, apply_rope_interleaved)
        # GPT-J divides the scores by sqrt(head_dim).
        out_bthgn, layer_cache = attend(self, q[:, :, :, None], k, v, mask_bts, layer_cache,
                                        index, scale=1.0 / math.sqrt(n))
        out = dense(("heads", "embed"), "out_proj")(out_bthgn.reshape(b, t, d), deterministic)
        return out, layer_cache


class GPTJMLP(nn.Module):
    cfg: GPTJConfig
    dtype: Dtype
    param_dtype: Dtype
    settings: sites.Settings

    @nn.compact
    def __call__(self, x_btd, deterministic):
        cfg = self.cfg
        dense = lambda feats, axes, name: Linear(  # noqa: E731
            feats, axes, True, self.dtype, self.param_dtype, self.settings, name=name)
        f_btf = dense(cfg.intermediate_size, ("embed", "mlp"), "fc_in")(x_btd, deterministic)
        return dense(cfg.hidden_size, ("mlp", "embed"), "fc_out")(
            ACTIVATIONS[cfg.activation_function](f_btf), deterministic)


class GPTJBlock(nn.Module):
    cfg: GPTJConfig
    dtype: Dtype
    param_dtype: Dtype
    settings: sites.Settings

    @nn.compact
    def __call__(self, h_btd, positions_bt, mask_bts, layer_cache, index, deterministic):
        args = (self.cfg, self.dtype, self.param_dtype, self.settings)
        x_btd = LayerNorm(self.cfg.layer_norm_epsilon, dtype=self.dtype,
                          param_dtype=self.param_dtype, name="ln_1")(h_btd)
        attn, layer_cache = GPTJAttention(*args, name="attn")(
            x_btd, positions_bt, mask_bts, layer_cache, index, deterministic)
        return attn + GPTJMLP(*args, name="mlp")(x_btd, deterministic) + h_btd, layer_cache


class GPTJForCausalLM(nn.Module):
    """Causal LM with the interface of LlamaForCausalLM:
    `__call__(tokens, valid=None, positions=None, cache=None)` -> (float32
    logits (b, t, v), new cache or None)."""

    cfg: GPTJConfig
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
            self, GPTJBlock, (cfg, self.dtype, self.param_dtype, self.settings), x, x.h_btd,
            (x.positions_bt, x.mask_bts), deterministic, self.remat)
        h_btd = LayerNorm(cfg.layer_norm_epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
                          name="ln_f")(real_outputs(h_btd, x, logits_at_ba))
        return (output_logits(self, h_btd, embedding, cfg.tie_word_embeddings, head_bias=True),
                new_cache)
