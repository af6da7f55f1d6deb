"""Phi-3 (Abdin et al. 2024, arXiv:2404.14219) as a Flax causal LM: model_type
phi3, i.e. Phi-3-mini / -medium, Phi-3.5-mini and Phi-4-mini (Phi-3-small is
another architecture, `phi3small`, with no transformers modeling file).

Follows transformers' `modeling_phi3.py` operation for operation: LLaMA's
pre-norm layer (RMSNorm in float32) with two fused projections,

    qkv_proj      (d -> (h + 2k) * n), its output laid out [q (h*n) | k (k*n) | v (k*n)]
    gate_up_proj  (d -> 2f), the first half the gate, the second the up:
                  down_proj(up * act(gate))

grouped-query attention, half-split rotary embeddings on the first
`partial_rotary_factor` of each head (Phi-4-mini: 0.75), the rest passing
through, and an optional sliding window (Phi-3-mini-4k: 2047; a key is
seen while query - key < window, as transformers' masking_utils). A
prefix's slots count as the slots before the sequence and leave the window
too, as PEFT's prefix does in transformers' cache.

RoPE: 'default', or 'longrope' (older configs: 'su', 'yarn', which
transformers' Phi3Config renames to it; transformers 5.23 then fails on 'su'
for want of original_max_position_embeddings in the rope dict, we read it as
meant). Other types are refused, as Phi3Config does. LongRoPE as transformers'
`_compute_longrope_parameters` and `dynamic_rope_update`: the inverse
frequencies are divided by `long_factor` when the batch's largest position
+ 1 exceeds `original_max_position_embeddings`, else by `short_factor`,
chosen per call for every position; cos and sin are multiplied by the
attention factor (given, or sqrt(1 + ln(s) / ln(original)) with s =
`factor`, else max_position_embeddings / original, 1 when s <= 1), for short
and long contexts alike. A KV cache that could cross the original length is
refused: transformers' `generate` recomputes the whole cache with the long
factors at that step (Phi3ForCausalLM.prepare_inputs_for_generation), which
our decoding loop does not.

Parameter names mirror Hugging Face's
(`model.layers.3.self_attn.qkv_proj.weight` is
`layers_3/self_attn/qkv_proj/kernel` transposed). A PEFT LoRA on `qkv_proj`
or `gate_up_proj` is a LoRA on that fused Linear. PEFT has no default
LoRA or IA3 targets for phi3 (peft/utils/constants.py) and refuses a config
without them; so do we: give target_modules (e.g. ["qkv_proj",
"gate_up_proj"]).

Not modelled: resid_pdrop, embd_pdrop and attention_dropout (dropout; the
frozen base runs deterministically, and the published configs set 0).

Axis legend: b batch, t new tokens, s key slots, d model, h query heads,
k kv heads, g query heads per kv head, n head dim, f MLP width, v vocab.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_adapters.activations import ACTIVATIONS
from flax_adapters.adapters import sites
from flax_adapters.adapters.targeting import Presets
from flax_adapters.models.config import kv_heads
from flax_adapters.models.decoder import (Cache, attend, decoder_stack, embed_inputs,
                                          output_logits, real_outputs, token_embedding)
from flax_adapters.models.layers import Linear, RMSNorm, apply_partial_rope, apply_rope

Dtype = Any

HF_NAMES = {"layers": "model.layers", "embed_tokens": "model.embed_tokens.weight",
            "norm": "model.norm", "lm_head": "lm_head.weight", "base_prefix": "model."}
# The adapter methods' default targets on this family (adapters/targeting.py). No
# LoRA or IA3 entry: PEFT has no phi3 mapping and refuses a config without targets.
# LLM-Adapters has none either; the bottleneck presets follow its LLaMA placement
# under the fused names (series before the MLP's input projection and after its
# output one; parallel beside the attention's input projection, as on BLOOM's fused
# query_key_value).
_NO_PEFT_DEFAULT = "PEFT has none for phi3 either"
PRESETS = Presets(
    targets={"bottleneck": ("gate_up_proj", "down_proj"), "adapterp": ("down_proj",),
             "parallel": ("qkv_proj",)},
    series_placement={"gate_up_proj": "input", "down_proj": "output"},
    notes={"lora": f"{_NO_PEFT_DEFAULT}; e.g. target_modules=['qkv_proj', 'gate_up_proj']",
           **dict.fromkeys(("ia3", "ia3_feedforward"), (
               f"{_NO_PEFT_DEFAULT}; e.g. target_modules=['qkv_proj', 'down_proj'] and "
               "feedforward_modules=['down_proj']"))})

ROPE_TYPES = {"default": "default", "longrope": "longrope", "su": "longrope",
              "yarn": "longrope"}


@dataclasses.dataclass(frozen=True)
class LongRope:
    """LongRoPE's per-frequency divisors (rotary_ndims / 2 each) and the factor
    cos and sin are multiplied by."""

    short_factor: tuple[float, ...]
    long_factor: tuple[float, ...]
    original_max_position_embeddings: int
    attention_factor: float


@dataclasses.dataclass(frozen=True)
class Phi3Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rotary_ndims: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    longrope: LongRope | None = None
    hidden_act: str = "silu"
    sliding_window: int | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    model_type: str = "phi3"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    @property
    def num_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> "Phi3Config":
        d, heads = hf["hidden_size"], hf["num_attention_heads"]
        kv = kv_heads(hf)
        if not hf.get("head_dim") and d % heads:
            raise ValueError(f"hidden_size={d} is not a multiple of num_attention_heads={heads}")
        head_dim = hf.get("head_dim") or d // heads
        act = hf.get("hidden_act", "silu")
        if act not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {act!r} for phi3; supported: "
                             f"{sorted(ACTIVATIONS)}")
        # transformers >= 5 writes rope_parameters; older configs rope_scaling (which
        # Phi3Config prefers when both are set), rope_theta and partial_rotary_factor.
        rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"unsupported rope_scaling / rope_parameters rope_type "
                             f"{rope_type!r} for phi3; supported: {', '.join(ROPE_TYPES)} "
                             "(transformers' Phi3Config takes these only)")
        pct = float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
        rotary = int(head_dim * pct)
        if rotary % 2 or not 0 < rotary <= head_dim:
            raise ValueError(f"partial_rotary_factor={pct} gives {rotary} rotary dims of a "
                             f"head of {head_dim}; they must be even and in (0, {head_dim}]")
        max_pos = int(hf.get("max_position_embeddings", 4096))
        longrope = None
        if ROPE_TYPES[rope_type] == "longrope":
            longrope = _longrope(rope, rotary, max_pos,
                                 int(hf.get("original_max_position_embeddings", 4096)))
        window = hf.get("sliding_window")
        if window is not None and int(window) <= 0:
            raise ValueError(f"sliding_window={window} must be a positive number of tokens "
                             "or null")
        eos = hf.get("eos_token_id")
        return cls(
            vocab_size=hf["vocab_size"], hidden_size=d,
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=heads,
            num_key_value_heads=kv, head_dim=head_dim, rotary_ndims=rotary,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            longrope=longrope, hidden_act=act,
            sliding_window=None if window is None else int(window),
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=hf.get("pad_token_id"))


def _longrope(rope: Mapping[str, Any], rotary: int, max_pos: int, original: int) -> LongRope:
    """`rope_scaling` of type longrope; `original` is the config's top-level
    original_max_position_embeddings (Phi3Config's, default 4096, overrides
    the one in rope_scaling)."""
    factors = {}
    for field in ("short_factor", "long_factor"):
        value = rope.get(field)
        if not isinstance(value, (list, tuple)) or len(value) != rotary // 2:
            raise ValueError(f"rope_scaling {field} must be a list of {rotary // 2} numbers "
                             f"(rotary dims / 2) for longrope, got {value!r}")
        factors[field] = tuple(float(x) for x in value)
    factor = rope.get("factor")
    factor = max_pos / original if factor is None else float(factor)
    attention = rope.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return LongRope(factors["short_factor"], factors["long_factor"], original, float(attention))


def rope_frequencies(cfg: Phi3Config, positions_bt: jax.Array) -> tuple[jax.Array, float]:
    """(inverse frequencies (rotary_ndims / 2,), the factor on cos and sin)."""
    exponent = jnp.arange(0, cfg.rotary_ndims, 2, dtype=jnp.float32) / cfg.rotary_ndims
    if cfg.longrope is None:
        return 1.0 / (cfg.rope_theta ** exponent), 1.0
    lr = cfg.longrope
    # One choice for the whole batch, as transformers' torch.max(position_ids) + 1.
    long = jnp.max(positions_bt) + 1 > lr.original_max_position_embeddings
    ext = jnp.where(long, jnp.asarray(lr.long_factor, jnp.float32),
                    jnp.asarray(lr.short_factor, jnp.float32))
    return 1.0 / (ext * cfg.rope_theta ** exponent), lr.attention_factor


def split_qkv(qkv: jax.Array, q_width: int, kv_width: int) -> tuple[jax.Array, ...]:
    """qkv_proj's output cut as transformers slices it: [q | k | v]."""
    return (qkv[..., :q_width], qkv[..., q_width:q_width + kv_width],
            qkv[..., q_width + kv_width:])


def split_gate_up(gate_up: jax.Array) -> tuple[jax.Array, jax.Array]:
    """gate_up_proj's output as torch's chunk(2): (gate, up)."""
    f = gate_up.shape[-1] // 2
    return gate_up[..., :f], gate_up[..., f:]


class Phi3Attention(nn.Module):
    cfg: Phi3Config
    dtype: Dtype
    param_dtype: Dtype
    settings: sites.Settings

    @nn.compact
    def __call__(self, x_btd, positions_bt, mask_bts, layer_cache, index, deterministic):
        cfg = self.cfg
        b, t, _ = x_btd.shape
        h, k, n = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        dense = lambda feats, axes, name: Linear(  # noqa: E731
            feats, axes, False, self.dtype, self.param_dtype, self.settings, name=name)
        qkv = dense((h + 2 * k) * n, ("embed", "heads"), "qkv_proj")(x_btd, deterministic)
        q_flat, k_flat, v_flat = split_qkv(qkv, h * n, k * n)
        inv_freq, scale = rope_frequencies(cfg, positions_bt)
        rope = apply_rope if scale == 1.0 else (  # LongRoPE's factor on cos and sin
            lambda x, p, f: apply_rope(x, p, f) * jnp.asarray(scale, x.dtype))
        q_bthn = apply_partial_rope(q_flat.reshape(b, t, h, n), positions_bt, inv_freq, rope)
        k_btkn = apply_partial_rope(k_flat.reshape(b, t, k, n), positions_bt, inv_freq, rope)
        # The window also covers a prefix's slots, as PEFT's prefix in transformers' cache.
        out_btkgn, layer_cache = attend(self, q_bthn.reshape(b, t, k, h // k, n), k_btkn,
                                        v_flat.reshape(b, t, k, n), mask_bts, layer_cache, index,
                                        sliding_window=cfg.sliding_window)
        out = dense(cfg.hidden_size, ("heads", "embed"), "o_proj")(
            out_btkgn.reshape(b, t, h * n), deterministic)
        return out, layer_cache


class Phi3MLP(nn.Module):
    cfg: Phi3Config
    dtype: Dtype
    param_dtype: Dtype
    settings: sites.Settings

    @nn.compact
    def __call__(self, x_btd, deterministic):
        cfg = self.cfg
        dense = lambda feats, axes, name: Linear(  # noqa: E731
            feats, axes, False, self.dtype, self.param_dtype, self.settings, name=name)
        gate, up = split_gate_up(dense(2 * cfg.intermediate_size, ("embed", "mlp"),
                                       "gate_up_proj")(x_btd, deterministic))
        return dense(cfg.hidden_size, ("mlp", "embed"), "down_proj")(
            up * ACTIVATIONS[cfg.hidden_act](gate), deterministic)


class Phi3DecoderLayer(nn.Module):
    cfg: Phi3Config
    dtype: Dtype
    param_dtype: Dtype
    settings: sites.Settings

    @nn.compact
    def __call__(self, h_btd, positions_bt, mask_bts, layer_cache, index, deterministic):
        cfg, args = self.cfg, (self.cfg, self.dtype, self.param_dtype, self.settings)
        norm = lambda name: RMSNorm(  # noqa: E731
            cfg.rms_norm_eps, self.dtype, self.param_dtype, name=name)
        attn, layer_cache = Phi3Attention(*args, name="self_attn")(
            norm("input_layernorm")(h_btd), positions_bt, mask_bts, layer_cache, index,
            deterministic)
        h_btd = h_btd + attn
        h_btd = h_btd + Phi3MLP(*args, name="mlp")(norm("post_attention_layernorm")(h_btd),
                                                  deterministic)
        return h_btd, layer_cache


class Phi3ForCausalLM(nn.Module):
    """Causal LM with the interface of LlamaForCausalLM:
    `__call__(tokens, valid=None, positions=None, cache=None)` -> (float32
    logits (b, t, v), new cache or None)."""

    cfg: Phi3Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    settings: sites.Settings = sites.Settings()
    remat: bool = False

    @nn.compact
    def __call__(self, tokens_bt, valid_bt=None, positions_bt=None, cache: Cache | None = None,
                 deterministic: bool = True, logits_at_ba: jax.Array | None = None):
        cfg = self.cfg
        if cfg.longrope is not None and cache is not None:
            slots, original = cache["valid"].shape[1], cfg.longrope.original_max_position_embeddings
            if slots > original:
                raise ValueError(
                    f"a KV cache of {slots} slots on this longrope phi3 model could cross "
                    f"original_max_position_embeddings={original}, where transformers switches "
                    "every position to long_factor and recomputes the cache; cached decoding "
                    f"past it is not supported: keep prompt + new tokens within {original} "
                    "(full forward passes of any length are)")
        embedding = token_embedding(self, cfg.vocab_size, cfg.hidden_size)
        x = embed_inputs(self, embedding, tokens_bt, valid_bt, positions_bt, cache,
                         cfg.sliding_window)
        h_btd, new_cache = decoder_stack(
            self, Phi3DecoderLayer, (cfg, self.dtype, self.param_dtype, self.settings), x,
            x.h_btd, (x.positions_bt, x.mask_bts), deterministic, self.remat)
        h_btd = real_outputs(h_btd, x, logits_at_ba)
        h_btd = RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype, name="norm")(h_btd)
        return output_logits(self, h_btd, embedding, cfg.tie_word_embeddings), new_cache
