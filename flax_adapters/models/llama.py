"""The LLaMA family as a Flax (linen) causal LM: LLaMA 1/2/3, Mistral, Qwen2, Qwen3.

Follows transformers' `modeling_llama.py` operation for operation (RMSNorm in
float32, half-split rotary layout, SiLU-gated MLP), so logits match it to
float32 rounding. Parameters mirror Hugging Face names so PEFT keys map
one to one: `layers_3/self_attn/q_proj/kernel` is
`model.layers.3.self_attn.q_proj.weight` transposed; `embed_tokens` (v, d),
`norm/scale`, and `lm_head` (d, v) unless the embeddings are tied.
Qwen3 (`modeling_qwen3.py`) adds `self_attn/q_norm/scale` and `k_norm/scale`
(n,): an RMSNorm of each query and key head before rope (`qk_norm`); they
are norms, not linear sites, so no adapter targets them.

Axis legend: b batch, t new tokens, s key slots, d model, k kv heads,
g query heads per kv head, h heads (q or kv), n head dim, v vocab.

The inputs, the KV cache, the attention core, the (unrolled) layer stack
and the head are the shared skeleton of decoder.py.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_adapters.adapters import sites
from flax_adapters.adapters.targeting import Presets
from flax_adapters.models.config import LlamaConfig
from flax_adapters.models.decoder import (Cache, attend, decoder_stack, embed_inputs,
                                          output_logits, real_outputs, token_embedding)
from flax_adapters.models.layers import Linear, RMSNorm, apply_rope, rope_inv_freq

Dtype = Any

# Hugging Face names of the top-level entries and of the layer stack (models/names.py).
HF_NAMES = {"layers": "model.layers", "embed_tokens": "model.embed_tokens.weight",
            "norm": "model.norm", "lm_head": "lm_head.weight", "base_prefix": "model."}
# The adapter methods' default targets on this family (adapters/targeting.py).
PRESETS = Presets(
    # PEFT's / LLM-Adapters' target mappings for LLaMA (IA3: PEFT's).
    targets={"lora": ("q_proj", "v_proj"), "ia3": ("k_proj", "v_proj", "down_proj"),
             "ia3_feedforward": ("down_proj",),
             "bottleneck": ("gate_proj", "up_proj", "down_proj"),  # AdapterH (series)
             "adapterp": ("down_proj",), "parallel": ("q_proj", "k_proj", "v_proj")},
    series_placement={"gate_proj": "input", "up_proj": "input", "down_proj": "output"})
# Qwen2 and Qwen3: PEFT's IA3 mapping for them scales q, not k (LLM-Adapters has none of its own).
QWEN_PRESETS = Presets(targets={**PRESETS.targets, "ia3": ("q_proj", "v_proj", "down_proj")},
                       series_placement=PRESETS.series_placement)


def rope_heads(norm, x_bthn, positions_bt, inv_freq):
    """Rope of q or k heads (b, t, heads, n), after the per-head norm (Qwen3's
    q_norm / k_norm; the identity elsewhere), in transformers' order."""
    return apply_rope(norm(x_bthn), positions_bt, inv_freq)


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

        def norm(name):  # Qwen3's per-head q_norm / k_norm; the identity elsewhere
            if not cfg.qk_norm:
                return lambda x: x
            return RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype, name=name)

        q_btkgn = rope_heads(norm("q_norm"), q_btkgn.reshape(b, t, -1, cfg.head_dim),
                             positions_bt, inv_freq).reshape(q_btkgn.shape)
        k_btkn = rope_heads(norm("k_norm"), k_btkn, positions_bt, inv_freq)

        # With a window (Mistral, Mixtral), prefix slots are seen only inside it, as
        # the cache slots before the sequence that PEFT's prefix fills in transformers.
        out_btkgn, layer_cache = attend(self, q_btkgn, k_btkn, v_btkn, mask_bts, layer_cache,
                                        index, sliding_window=cfg.sliding_window)
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
    continuing from the cache. logits_at_ba: optional int (b, a) indices into
    t; the logits are then computed at those positions only (see
    decoder.real_outputs). Returns (float32 logits (b, t or a, v), new cache
    or None).
    """

    cfg: LlamaConfig
    dtype: Dtype = jnp.float32  # compute dtype
    param_dtype: Dtype = jnp.float32  # dtype of freshly initialised params
    settings: sites.Settings = sites.Settings()
    remat: bool = False  # recompute each layer's activations in the backward pass

    @nn.compact
    def __call__(self, tokens_bt, valid_bt=None, positions_bt=None, cache: Cache | None = None,
                 deterministic: bool = True, logits_at_ba: jax.Array | None = None):
        cfg = self.cfg
        embedding = token_embedding(self, cfg.vocab_size, cfg.hidden_size)
        x = embed_inputs(self, embedding, tokens_bt, valid_bt, positions_bt, cache,
                         cfg.sliding_window)
        h_btd, new_cache = decoder_stack(
            self, DecoderLayer, (cfg, self.dtype, self.param_dtype, self.settings), x, x.h_btd,
            (x.positions_bt, x.mask_bts), deterministic, self.remat)
        h_btd = real_outputs(h_btd, x, logits_at_ba)
        h_btd = RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype, name="norm")(h_btd)
        return output_logits(self, h_btd, embedding, cfg.tie_word_embeddings), new_cache
