"""Gemma (Gemma Team 2024, arXiv:2403.08295), Gemma 2 (arXiv:2408.00118) and
Gemma 3's text model (arXiv:2503.19786) as a Flax causal LM.

Follows transformers' `modeling_gemma.py`, `modeling_gemma2.py` and
`modeling_gemma3.py` (Gemma3ForCausalLM) operation for operation:

- RMSNorm x / rms(x) * (1 + w) in float32, cast after the product (LLaMA's
  casts before it); w is stored as Hugging Face stores it, an offset from 0
  (`input_layernorm/scale` is `input_layernorm.weight`).
- Token embeddings times sqrt(hidden_size), the factor cast to the compute
  dtype first (bfloat16: sqrt(3072) = 55.43 becomes 55.5, as transformers).
- A tanh-GELU gated MLP, down(gelu(gate(x)) * up(x)).
- Gemma 1 keeps LLaMA's layer; Gemma 2 / 3 normalise each block's input and
  output ("sandwich" norms):

      h = h + post_attention_layernorm(attn(input_layernorm(h)))
      h = h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))

- Scores scaled by query_pre_attn_scalar^-1/2 (Gemma 1: head_dim^-1/2);
  Gemma 2 soft-caps them, cap * tanh(scores / cap), before the mask.
- `layer_types`: a "sliding_attention" layer sees its last `sliding_window`
  slots, a "full_attention" layer all. Gemma 2 alternates (sliding first),
  Gemma 3 has one full layer in `sliding_window_pattern` (6). Gemma 3's
  sliding layers take their own rope base (`rope_local_base_freq`, no
  scaling), its full layers `rope_theta` with the rope scaling (linear in
  the published 4B and larger); Gemma 3 also normalises each head's q and k
  (q_norm, k_norm) before the rotary embedding.
- The logits soft-capped the same way (final_logit_softcapping, Gemma 2's
  30); the head tied to the embeddings unless the config says otherwise.

Parameter names mirror Hugging Face's, as LLaMA's (`layers_3/self_attn/
q_proj/kernel` is `model.layers.3.self_attn.q_proj.weight` transposed).
Prefix tuning as PEFT: its prefix fills transformers' cache as the P slots
before the sequence, so a sliding layer sees it only inside its window.

Not modelled: dropout (the frozen base runs deterministically); bidirectional
attention (`use_bidirectional_attention`, EmbeddingGemma's encoder) and the
multimodal Gemma3ForConditionalGeneration (model_type "gemma3"), both refused.
Gemma 3 reads `attn_logit_softcapping` but transformers never applies it
(its attention call does not pass it): neither do we. The KV cache keeps
every slot on sliding layers too (masked, not evicted: exact, but a sliding
layer's cache is as long as a full one's).

Axis legend: b batch, t new tokens, s key slots, d model, k kv heads,
g query heads per kv head, n head dim, f MLP width, v vocab.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_adapters.activations import ACTIVATIONS
from flax_adapters.adapters import sites
from flax_adapters.adapters.targeting import Presets
from flax_adapters.models.config import RopeScaling, kv_heads
from flax_adapters.models.decoder import (Cache, attend, decoder_stack, embed_inputs,
                                          output_logits, real_outputs, sliding_window_mask,
                                          token_embedding)
from flax_adapters.models.layers import Linear, apply_rope, rope_inv_freq

Dtype = Any

MODEL_TYPES = ("gemma", "gemma2", "gemma3_text")
# model_type -> why it is refused (models/registry.py raises it).
REFUSED = {"gemma3": (
    "model_type 'gemma3' is the multimodal Gemma3ForConditionalGeneration (a vision tower and "
    "a nested text_config); flax_adapters runs Gemma 3's text model only: use a text "
    "checkpoint (model_type 'gemma3_text', e.g. google/gemma-3-1b-it), or save the language "
    "model of this one on its own with transformers")}
SLIDING, FULL = "sliding_attention", "full_attention"

HF_NAMES = {"layers": "model.layers", "embed_tokens": "model.embed_tokens.weight",
            "norm": "model.norm", "lm_head": "lm_head.weight", "base_prefix": "model."}
# The adapter methods' default targets on this family (adapters/targeting.py).
PRESETS = Presets(
    # PEFT's mappings for gemma / gemma2 / gemma3_text (LoRA q, v; IA3 q, v, down);
    # LLM-Adapters has no Gemma: its LLaMA bottleneck mapping, the same module names.
    targets={"lora": ("q_proj", "v_proj"), "ia3": ("q_proj", "v_proj", "down_proj"),
             "ia3_feedforward": ("down_proj",),
             "bottleneck": ("gate_proj", "up_proj", "down_proj"),  # AdapterH (series)
             "adapterp": ("down_proj",), "parallel": ("q_proj", "k_proj", "v_proj")},
    series_placement={"gate_proj": "input", "up_proj": "input", "down_proj": "output"},
    embedding_scale=lambda d: embedding_scale(d))

# transformers' defaults where a config.json leaves a field out (save_pretrained
# writes only the fields that differ from them).
_DEFAULTS = {
    "gemma": dict(num_key_value_heads=16, query_pre_attn_scalar=None, sliding_window=None,
                  final_logit_softcapping=None, attn_logit_softcapping=None, rope_theta=10000.0),
    "gemma2": dict(num_key_value_heads=4, query_pre_attn_scalar=256, sliding_window=4096,
                   final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                   rope_theta=10000.0),
    "gemma3_text": dict(num_key_value_heads=4, query_pre_attn_scalar=256, sliding_window=4096,
                        final_logit_softcapping=None, attn_logit_softcapping=None,
                        rope_theta=1_000_000.0, rope_local_base_freq=10000.0),
}


def _rope(params: Mapping[str, Any], where: str) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) of one rope_parameters entry ('default' or 'linear')."""
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return float(params["rope_theta"]), None
    if rope_type == "linear":
        return float(params["rope_theta"]), RopeScaling("linear", float(params["factor"]))
    raise ValueError(f"unsupported rope_type {rope_type!r} for {where}; supported: default, "
                     "linear")


def _rope_by_layer_type(hf: Mapping[str, Any], model_type: str) -> dict:
    """layer type -> rope parameters, in both spellings: transformers >= 5's
    rope_parameters (per layer type on Gemma 3) and the older rope_theta,
    rope_scaling and Gemma 3's rope_local_base_freq."""
    defaults = _DEFAULTS[model_type]
    new = dict(hf.get("rope_parameters") or {})
    legacy = dict(hf.get("rope_scaling") or {})
    if model_type != "gemma3_text":  # one rotary embedding for every layer
        rope = {**legacy, **new}
        rope.setdefault("rope_theta", hf.get("rope_theta", defaults["rope_theta"]))
        return {FULL: rope, SLIDING: rope}
    if new and not set(new) <= {FULL, SLIDING}:
        raise ValueError(f"gemma3_text's rope_parameters are per layer type ({FULL!r}, "
                         f"{SLIDING!r}), got keys {sorted(new)}")
    full = {"rope_type": "default", **dict(new.get(FULL) or {}), **legacy}
    full.setdefault("rope_theta", hf.get("rope_theta", defaults["rope_theta"]))
    local = {"rope_type": "default", **dict(new.get(SLIDING) or {})}
    local.setdefault("rope_theta", hf.get("rope_local_base_freq",
                                          defaults["rope_local_base_freq"]))
    return {FULL: full, SLIDING: local}


def _layer_types(hf: Mapping[str, Any], model_type: str, layers: int) -> tuple[str, ...]:
    types = hf.get("layer_types")
    if types is None:
        if model_type == "gemma":
            return (FULL,) * layers
        pattern = 2 if model_type == "gemma2" else int(hf.get("sliding_window_pattern", 6))
        return tuple(SLIDING if (i + 1) % pattern else FULL for i in range(layers))
    types = tuple(types)
    if len(types) != layers or not set(types) <= {SLIDING, FULL}:
        raise ValueError(f"layer_types must list {SLIDING!r} or {FULL!r} for each of the "
                         f"{layers} layers, got {list(types)}")
    return types


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    query_pre_attn_scalar: float  # the scores' scale is its -1/2 power
    layer_types: tuple[str, ...]  # SLIDING or FULL per layer
    rms_norm_eps: float = 1e-6
    hidden_activation: str = "gelu_pytorch_tanh"
    rope_theta: float = 10000.0  # full-attention layers
    rope_scaling: RopeScaling | None = None
    rope_local_theta: float = 10000.0  # sliding layers (Gemma 3's rope_local_base_freq)
    rope_local_scaling: RopeScaling | None = None
    sliding_window: int | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    sandwich_norms: bool = True  # Gemma 2 / 3; Gemma 1 is LLaMA's layer
    qk_norm: bool = False  # Gemma 3
    attention_bias: bool = False
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 8192
    model_type: str = "gemma2"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    @property
    def num_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> "GemmaConfig":
        model_type = hf.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"unsupported model_type {model_type!r} for gemma; supported: "
                             f"{', '.join(MODEL_TYPES)}")
        if hf.get("use_bidirectional_attention"):
            raise ValueError(f"{model_type}: use_bidirectional_attention=true (an encoder such as "
                             "EmbeddingGemma) is not supported; flax_adapters runs causal LMs")
        defaults = _DEFAULTS[model_type]
        heads, layers = hf["num_attention_heads"], hf["num_hidden_layers"]
        kv = kv_heads(hf, defaults["num_key_value_heads"])
        head_dim = hf.get("head_dim") or 256  # transformers' default, not hidden / heads
        if model_type == "gemma":
            # transformers reads the published "gelu" as the tanh GELU it was trained with.
            act = hf.get("hidden_act") or "gelu_pytorch_tanh"
            act = "gelu_pytorch_tanh" if act == "gelu" else act
        else:
            act = hf.get("hidden_activation") or "gelu_pytorch_tanh"
        if act not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden activation {act!r} for {model_type}; "
                             f"supported: {sorted(ACTIVATIONS)}")
        field = lambda key: hf.get(key, defaults[key])  # noqa: E731
        types = _layer_types(hf, model_type, layers)
        window = field("sliding_window")
        if SLIDING in types and not (isinstance(window, int) and window > 0):
            raise ValueError(f"{model_type}: layer_types has sliding layers but sliding_window "
                             f"is {window!r}; give the window's length (a positive integer)")
        for key in ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"):
            value = field(key)
            if value is not None and not value > 0:
                raise ValueError(f"{model_type}: {key} must be positive (or null for the "
                                 f"soft-caps), got {value!r}")
        rope = _rope_by_layer_type(hf, model_type)
        theta, scaling = _rope(rope[FULL], model_type)
        local_theta, local_scaling = _rope(rope[SLIDING], model_type)
        scalar = field("query_pre_attn_scalar") if model_type != "gemma" else head_dim
        eos = hf.get("eos_token_id")
        return cls(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"], num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
            query_pre_attn_scalar=float(scalar), layer_types=types,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), hidden_activation=act,
            rope_theta=theta, rope_scaling=scaling, rope_local_theta=local_theta,
            rope_local_scaling=local_scaling,
            sliding_window=int(window) if SLIDING in types else None,
            attn_logit_softcapping=(field("attn_logit_softcapping") if model_type == "gemma2"
                                    else None),
            final_logit_softcapping=field("final_logit_softcapping"),
            sandwich_norms=model_type != "gemma", qk_norm=model_type == "gemma3_text",
            attention_bias=bool(hf.get("attention_bias", False)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 8192)),
            model_type=model_type, bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=hf.get("pad_token_id"))


def embedding_scale(hidden_size: int) -> float:
    """What Gemma multiplies its token embeddings by."""
    return hidden_size ** 0.5


class GemmaRMSNorm(nn.Module):
    """x / rms(x) * (1 + scale) in float32, then cast; `scale` starts at 0."""

    eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * (1.0 + scale.astype(jnp.float32))).astype(self.dtype)


class Attention(nn.Module):
    cfg: GemmaConfig
    dtype: Dtype
    param_dtype: Dtype
    settings: sites.Settings
    layer_type: str

    @nn.compact
    def __call__(self, x_btd, positions_bt, mask_bts, layer_cache, index, deterministic):
        cfg = self.cfg
        h, k, n = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        dense = lambda feats, axes, name: Linear(  # noqa: E731
            feats, axes, cfg.attention_bias, self.dtype, self.param_dtype, self.settings,
            name=name)
        b, t, _ = x_btd.shape
        q_bthn = dense(h * n, ("embed", "heads"), "q_proj")(x_btd, deterministic).reshape(
            b, t, h, n)
        k_btkn = dense(k * n, ("embed", "kv_heads"), "k_proj")(x_btd, deterministic).reshape(
            b, t, k, n)
        v_btkn = dense(k * n, ("embed", "kv_heads"), "v_proj")(x_btd, deterministic).reshape(
            b, t, k, n)
        if cfg.qk_norm:
            q_bthn = GemmaRMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype,
                                  name="q_norm")(q_bthn)
            k_btkn = GemmaRMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype,
                                  name="k_norm")(k_btkn)

        sliding = self.layer_type == SLIDING
        inv_freq = (rope_inv_freq(n, cfg.rope_local_theta, cfg.rope_local_scaling) if sliding
                    else rope_inv_freq(n, cfg.rope_theta, cfg.rope_scaling))
        q_btkgn = apply_rope(q_bthn, positions_bt, inv_freq).reshape(b, t, k, cfg.num_groups, n)
        k_btkn = apply_rope(k_btkn, positions_bt, inv_freq)

        out_btkgn, layer_cache = attend(
            self, q_btkgn, k_btkn, v_btkn, mask_bts, layer_cache, index,
            scale=cfg.query_pre_attn_scalar ** -0.5, softcap=cfg.attn_logit_softcapping,
            sliding_window=cfg.sliding_window if sliding else None)
        out = dense(cfg.hidden_size, ("heads", "embed"), "o_proj")(
            out_btkgn.reshape(b, t, h * n), deterministic)
        return out, layer_cache


class MLP(nn.Module):
    cfg: GemmaConfig
    dtype: Dtype
    param_dtype: Dtype
    settings: sites.Settings

    @nn.compact
    def __call__(self, x_btd, deterministic):
        cfg = self.cfg
        dense = lambda feats, axes, name: Linear(  # noqa: E731
            feats, axes, False, self.dtype, self.param_dtype, self.settings, name=name)
        gate_btf = dense(cfg.intermediate_size, ("embed", "mlp"), "gate_proj")(x_btd, deterministic)
        up_btf = dense(cfg.intermediate_size, ("embed", "mlp"), "up_proj")(x_btd, deterministic)
        return dense(cfg.hidden_size, ("mlp", "embed"), "down_proj")(
            ACTIVATIONS[cfg.hidden_activation](gate_btf) * up_btf, deterministic)


class DecoderLayer(nn.Module):
    cfg: GemmaConfig
    dtype: Dtype
    param_dtype: Dtype
    settings: sites.Settings
    layer_type: str = FULL

    @nn.compact
    def __call__(self, h_btd, positions_bt, masks, layer_cache, index, deterministic):
        cfg, args = self.cfg, (self.cfg, self.dtype, self.param_dtype, self.settings)
        def norm(name):
            return GemmaRMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype, name=name)
        attn, layer_cache = Attention(*args, self.layer_type, name="self_attn")(
            norm("input_layernorm")(h_btd), positions_bt, masks[self.layer_type], layer_cache,
            index, deterministic)
        mlp = MLP(*args, name="mlp")
        if not cfg.sandwich_norms:  # Gemma 1: post_attention_layernorm is the MLP's input norm
            h_btd = h_btd + attn
            return h_btd + mlp(norm("post_attention_layernorm")(h_btd), deterministic), layer_cache
        h_btd = h_btd + norm("post_attention_layernorm")(attn)
        out = mlp(norm("pre_feedforward_layernorm")(h_btd), deterministic)
        return h_btd + norm("post_feedforward_layernorm")(out), layer_cache


class GemmaForCausalLM(nn.Module):
    """Causal LM with the interface of LlamaForCausalLM:
    `__call__(tokens, valid=None, positions=None, cache=None)` -> (float32
    logits (b, t, v), new cache or None)."""

    cfg: GemmaConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    settings: sites.Settings = sites.Settings()
    remat: bool = False

    @nn.compact
    def __call__(self, tokens_bt, valid_bt=None, positions_bt=None, cache: Cache | None = None,
                 deterministic: bool = True, logits_at_ba: jax.Array | None = None):
        cfg = self.cfg
        embedding = token_embedding(self, cfg.vocab_size, cfg.hidden_size)
        x = embed_inputs(self, embedding, tokens_bt, valid_bt, positions_bt, cache,
                         embed_scale=embedding_scale(cfg.hidden_size))
        masks = {FULL: x.mask_bts}  # per layer type, as transformers' causal_mask_mapping
        if SLIDING in cfg.layer_types:
            masks[SLIDING] = sliding_window_mask(x, cfg.sliding_window)
        h_btd, new_cache = decoder_stack(
            self, DecoderLayer, (cfg, self.dtype, self.param_dtype, self.settings), x, x.h_btd,
            (x.positions_bt, masks), deterministic, self.remat,
            layer_attrs=lambda i: {"layer_type": cfg.layer_types[i]})
        h_btd = real_outputs(h_btd, x, logits_at_ba)
        h_btd = GemmaRMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype, name="norm")(h_btd)
        logits = output_logits(self, h_btd, embedding, cfg.tie_word_embeddings)
        if cfg.final_logit_softcapping is not None:
            cap = cfg.final_logit_softcapping
            logits = jnp.tanh(logits / cap) * cap
        return logits, new_cache
